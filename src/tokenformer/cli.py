"""The ``tokenformer`` command line.

Each subcommand is a plain function (or, for ``train``, the :class:`TrainConfig` dataclass);
jsonargparse builds its flags, ``--config`` YAML support and ``--help`` with every default from
the signature and docstring. A new subcommand is one more entry in :data:`COMMANDS`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from jsonargparse import ActionConfigFile, ArgumentParser

from .config import PRESETS, TokenformerConfig
from .flops import count_parameters, training_flops_per_token
from .vision import VISION_PRESETS, VisionConfig, count_vision_parameters


def presets() -> None:
    """List the named model presets: language models (parameters, training FLOPs per token), then vision models."""
    print(
        f"{'preset':<12} {'layers':>6} {'d':>5} {'qkv':>5} {'proj':>5} {'ffn':>6} "
        f"{'params':>10} {'non-emb':>10} {'train GFLOP/tok':>16}"
    )
    for name in PRESETS:
        c = TokenformerConfig.from_preset(name)
        print(
            f"{name:<12} {c.n_layers:>6} {c.d_model:>5} {c.qkv_tokens:>5} {c.proj_tokens:>5} {c.ffn_tokens:>6} "
            f"{count_parameters(c) / 1e6:>9.2f}M {count_parameters(c, non_embedding=True) / 1e6:>9.2f}M "
            f"{training_flops_per_token(c) / 1e9:>16.3f}"
        )
    print(f"\n{'vision preset':<14} {'image':>9} {'patch':>5} {'tokens':>6} {'layers':>6} {'d':>5} {'params':>10}")
    for name in VISION_PRESETS:
        v = VisionConfig.from_preset(name)
        image = f"{v.in_channels}x{v.image_size}x{v.image_size}"
        print(
            f"{name:<14} {image:>9} {v.patch_size:>5} {v.seq_len:>6} {v.n_layers:>6} {v.d_model:>5} "
            f"{count_vision_parameters(v) / 1e6:>9.2f}M"
        )


def train(config) -> None:
    """Train a TokenFormer language model or, with ``--task vision``, image classifier (from
    scratch, or resumed from a checkpoint). A classifier is tested on the test split at the end."""
    from .train import Trainer
    from .train.parallel import close_distributed
    from .train.vision import CONFUSION_PNG, ImageClassificationTask

    try:
        trainer = Trainer(config)
        say = print if trainer.dist.is_main else lambda *_: None  # under torchrun, rank 0 speaks for all
        if trainer.resumed_from is not None:
            say(f"resumed from {trainer.resumed_from} at step {trainer.state.step}")
        try:
            trainer.fit()
        finally:
            trainer.close()
        last = trainer.state.val_history[-1] if trainer.state.val_history else None
        if last is not None:
            say(f"step {last['step']}: {describe_validation(last)}")
        if isinstance(trainer.task, ImageClassificationTask):
            result = trainer.task.test(trainer.evaluated_model, trainer.run_dir)
            say(
                f"test accuracy {result.accuracy:.4f} (loss {result.loss:.4f}) over {result.count} images; "
                f"confusion matrix: {trainer.run_dir / CONFUSION_PNG}"
            )
        say(f"checkpoint: {trainer.last_checkpoint}")
    finally:
        close_distributed()


def describe_validation(metrics: dict[str, float]) -> str:
    """The validation loss with the task's own measure: perplexity, or accuracy."""
    text = f"validation loss {metrics['val_loss']:.6f}"
    if "val_ppl" in metrics:
        return text + f" (perplexity {metrics['val_ppl']:.2f})"
    return text + f" (accuracy {metrics['val_accuracy']:.4f})"


def grow(
    checkpoint: str,
    out: str,
    qkv_tokens: int | None = None,
    proj_tokens: int | None = None,
    ffn_tokens: int | None = None,
    layers: list[int] | None = None,
    key_init: Literal["zeros", "random"] = "zeros",
    evaluate: bool = True,
    device: str = "auto",
) -> None:
    """Append parameter tokens to a trained checkpoint; write the grown checkpoint, optimizer state carried.

    Args:
        checkpoint: A training checkpoint, or a run directory (its newest complete checkpoint).
        out: Directory for the grown checkpoint (must not exist); continue with ``train --resume OUT``.
        qkv_tokens: New total of query/key/value parameter tokens (null: unchanged).
        proj_tokens: New total of output-projection parameter tokens (null: unchanged).
        ffn_tokens: New total of feed-forward parameter tokens (null: unchanged).
        layers: Grow only these layers (null: all).
        key_init: ``zeros`` keeps the function exactly; ``random`` initialises new keys like the released GPU code.
        evaluate: Print the validation loss before and right after growth.
        device: ``auto``, ``cpu``, ``cuda``, ...
    """
    from .train import TrainConfig, Trainer, resolve_checkpoint
    from .train.checkpoint import read_train_config

    source = resolve_checkpoint(checkpoint)
    config = TrainConfig.from_dict(
        {**read_train_config(source), "resume": str(source), "device": device, "progress": False, "strategy": "single"}
    )
    trainer = Trainer(config)
    before = trainer.evaluate() if evaluate else None
    record = trainer.grow(
        qkv_tokens=qkv_tokens, proj_tokens=proj_tokens, ffn_tokens=ffn_tokens, layers=layers, key_init=key_init
    )
    after = trainer.evaluate() if evaluate else None
    path = trainer.save_checkpoint(out)
    parameters = sum(p.numel() for p in trainer.model.parameters())
    print(
        f"grew {source} at step {trainer.state.step}: {record.before[0]} -> {record.after[0]} tokens per layer "
        f"({parameters / 1e6:.2f}M parameters, function preserving: {record.function_preserving})"
    )
    if before is not None:
        print(f"before growth: {describe_validation(before)}; right after: {describe_validation(after)}")
    print(f"grown checkpoint: {path}")


def consolidate(checkpoint: str, out: str) -> None:
    """Turn a sharded checkpoint (``--strategy fsdp``) into a single-file one, or a single-file one into a sharded one.

    Args:
        checkpoint: A training checkpoint, or a run directory (its newest complete checkpoint).
        out: Directory for the converted checkpoint (must not exist).
    """
    from .train import TrainConfig, load_checkpoint, resolve_checkpoint
    from .train.checkpoint import load_sharded_state, save_checkpoint
    from .train.trainer import make_optimizer

    source = resolve_checkpoint(checkpoint)
    loaded = load_checkpoint(source)
    optimizer = make_optimizer(loaded.model, TrainConfig.from_dict(loaded.trainer_state["train_config"]))
    if loaded.sharded:
        load_sharded_state(source, loaded.model, optimizer)
        path = save_checkpoint(out, loaded.model, optimizer, loaded.trainer_state, loaded.tokenizer_json, loaded.rng)
    else:
        optimizer.load_state_dict(loaded.optimizer_state)
        path = save_checkpoint(
            out, loaded.model, optimizer, loaded.trainer_state, loaded.tokenizer_json, loaded.rng, sharded=True
        )
    kind = "single-file" if loaded.sharded else "sharded"
    print(f"wrote {source} at step {loaded.trainer_state['step']} as a {kind} checkpoint: {path}")
    if loaded.ema is not None:
        print(
            "note: the moving average of the weights (ema.safetensors) is not carried over: "
            "a sharded checkpoint cannot hold it"
        )


def generate(
    model: str,
    prompt: str = "",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    seed: int = 0,
    tokenizer: str | None = None,
    device: str = "auto",
) -> str:
    """Continue a prompt with a trained model (KV-cached sampling) and print the text.

    Args:
        model: A checkpoint, a run directory (newest checkpoint) or a model directory (config.json + model.safetensors).
        prompt: Text to continue; empty starts from the end-of-text token.
        max_new_tokens: Tokens to generate.
        temperature: Sampling temperature; 0 is greedy.
        top_k: Sample among the k most likely tokens (null: all).
        top_p: Nucleus sampling mass (null: off).
        seed: Seed of the sampler.
        tokenizer: A tokenizer.json (default: the one saved with the model).
        device: ``auto``, ``cpu``, ``cuda``, ...
    """
    import torch

    from .train.trainer import resolve_device

    target = resolve_device(device)
    net, tok, _ = load_for_inference(model, tokenizer, target)
    ids = tok.encode(prompt) if prompt else ([tok.eos_id] if tok.eos_id is not None else [])
    if not ids:
        raise ValueError("the prompt is empty and the tokenizer has no end-of-text token to start from; pass --prompt")
    generator = torch.Generator(device=target).manual_seed(seed)
    out = net.generate(
        torch.tensor([ids], device=target),
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
    )
    text = tok.decode(out[0, len(ids) :].tolist())
    print(prompt + text)
    return prompt + text


def evaluate(
    model: str,
    data: str | list[str] | None = None,
    split: Literal["train", "val"] = "val",
    seq_len: int | None = None,
    batch_size: int = 8,
    max_windows: int | None = None,
    tokenizer: str | None = None,
    precision: Literal["fp32", "bf16-mixed"] = "fp32",
    device: str = "auto",
    harness: bool = False,
    tasks: list[str] | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    include_path: str | None = None,
) -> dict[str, Any]:
    """Perplexity of a model on its training corpus's split, or on other text; or lm-eval tasks with --harness.

    Args:
        model: A checkpoint, a run directory (newest checkpoint) or a model directory.
        data: Text files, directories, globs, ``kjv`` or ``hf:NAME`` to evaluate on, whole
            (null: the ``split`` of the corpus the checkpoint was trained on).
        split: Split of the training corpus when ``data`` is null.
        seq_len: Window length (default: the training seq_len, else the model's max_seq_len).
        batch_size: Windows per forward pass.
        max_windows: Evaluate at most this many windows, spread evenly (null: all).
        tokenizer: A tokenizer.json (default: the one saved with the model).
        precision: ``fp32`` or ``bf16-mixed``.
        device: ``auto``, ``cpu``, ``cuda``, ...
        harness: Run lm-evaluation-harness tasks instead (needs the ``[eval]`` extra).
        tasks: lm-eval task names with --harness, e.g. ``[piqa,arc_easy]``; the paper's six:
            lambada_openai, hellaswag, piqa, arc_easy, arc_challenge, winogrande.
        num_fewshot: Few-shot examples per task with --harness (null: the task's default).
        limit: Evaluate at most this many examples per task (a fraction if < 1) with --harness.
        include_path: A folder of extra lm-eval task YAML files with --harness.
    """
    import contextlib

    import torch

    if harness:
        if not tasks:
            raise ValueError("--harness needs --tasks, e.g. --tasks '[piqa,arc_easy]'")
        from .interop.harness import evaluate as run_harness
        from .interop.harness import table
        from .train.trainer import resolve_device

        results = run_harness(
            model_directory(model),
            tasks,
            tokenizer=tokenizer,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            limit=limit,
            device=str(resolve_device(device)),
            include_path=include_path,
        )
        print(table(results))
        return results

    from .data import even_windows, load_documents
    from .train import TrainConfig, evaluate_windows, prepare_data
    from .train.trainer import resolve_device

    target = resolve_device(device)
    net, tok, saved = load_for_inference(model, tokenizer, target)
    seq_len = seq_len or (saved["seq_len"] if saved else net.config.max_seq_len)
    if data is None:
        if saved is None:
            raise ValueError(f"{model} is not a training checkpoint, so it has no corpus of its own; pass --data")
        shards, _ = prepare_data(TrainConfig.from_dict({**saved, "resume": None}), tok)
        windows = shards.even_windows(split, seq_len, max_windows)
        what = f"the {split} split of {saved['data']}"
    else:
        docs = load_documents(data)
        eos = [tok.eos_id] if tok.eos_id is not None else []
        arrays = [np.asarray(tok.encode_long(d.text) + eos) for d in docs]
        windows = even_windows(arrays, seq_len, max_windows)
        what = f"{len(docs)} document(s)"
    autocast = (
        torch.autocast(target.type, dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    )
    net.eval()
    with autocast:
        metrics = evaluate_windows(net, windows, batch_size, target)
    print(
        f"perplexity {metrics['val_ppl']:.3f} "
        f"(loss {metrics['val_loss']:.4f} nats/token over {metrics['val_tokens']} tokens of {what})"
    )
    return metrics


def convert(
    src: str,
    dst: str,
    from_hub: bool = False,
    revision: str | None = None,
    preset: str | None = None,
    n_heads: int | None = None,
    tokenizer: str | None = None,
    overwrite: bool = False,
) -> None:
    """Convert a released checkpoint (GPT-NeoX layout pytorch_model.bin) into a model directory of ours.

    Args:
        src: a pytorch_model.bin or a directory holding one; with --from_hub, a hub id
            (Haiyang-W/TokenFormer-150M) or a released size (150M, 450M, 900M, 1.5B).
        dst: the directory to write (config.json + model.safetensors [+ tokenizer files]).
        from_hub: download src from the Hugging Face hub (needs network access).
        revision: hub revision (branch, tag or commit) with --from_hub.
        preset: the config preset; default: the released size downloaded, else read from the tensor shapes.
        n_heads: head count when no released preset has the checkpoint's width and depth.
        tokenizer: a tokenizer.json to store beside the model; default with --from_hub: GPT-NeoX-20B's.
        overwrite: replace a model already in dst.
    """
    from .interop.convert import convert_from_hub, convert_released

    if from_hub:
        path = convert_from_hub(
            src, dst, preset, revision=revision, n_heads=n_heads, tokenizer=tokenizer, overwrite=overwrite
        )
    else:
        path = convert_released(src, dst, preset, n_heads=n_heads, tokenizer=tokenizer, overwrite=overwrite)
    print(f"wrote {path}")


def model_directory(path: str) -> Path:
    """The folder with config.json + model.safetensors: a model directory as given, a training
    checkpoint (verified against its manifest) or a run directory's newest complete checkpoint."""
    from .train.checkpoint import CHECKPOINTS, MANIFEST, is_sharded, resolve_checkpoint, verify_checkpoint

    directory = Path(path).expanduser()
    if (directory / MANIFEST).is_file() or (directory / CHECKPOINTS).is_dir():
        directory = resolve_checkpoint(directory)
        verify_checkpoint(directory)
        if is_sharded(directory):
            raise ValueError(
                f"{directory} is a sharded checkpoint; write it whole first: "
                f"tokenformer consolidate --checkpoint {directory} --out DIR"
            )
    return directory


def load_for_inference(path: str, tokenizer: str | None, device) -> tuple[Any, Any, dict | None]:
    """Model, tokenizer and (for a training checkpoint) its training config, from a directory."""
    from .data import load_tokenizer
    from .families import load_model
    from .train.checkpoint import MANIFEST, read_train_config

    directory = model_directory(path)
    saved = read_train_config(directory) if (directory / MANIFEST).is_file() else None
    net = load_model(directory, device)
    tokenizer_path = Path(tokenizer) if tokenizer else directory / "tokenizer.json"
    if not tokenizer_path.exists():
        raise FileNotFoundError(f"{directory} has no tokenizer.json; pass --tokenizer PATH")
    return net, load_tokenizer(tokenizer_path), saved


def scale(plan: str, out_dir: str | None = None) -> None:
    """Run a scaling plan: grown TokenFormer against from-scratch and grown Transformer baselines.

    Writes results.json, report.md and plots into the plan's out_dir; rerunning an interrupted
    plan continues where it stopped (finished runs are kept, unfinished ones resume).

    Args:
        plan: A plan YAML (configs/scaling/*.yaml).
        out_dir: Run directory (default: the plan's out_dir).
    """
    from .experiments.scaling import load_plan, main_table, run_plan

    command = " ".join(["tokenformer", "scale", plan] + (["--out_dir", out_dir] if out_dir else []))
    results = run_plan(load_plan(plan, out_dir), command)
    print(main_table(results))
    print(f"report: {Path(results['plan']['out_dir']) / 'report.md'}")


def study(plan: str, out_dir: str | None = None, workers: int = 1) -> None:
    """Run a recipe study: variants of one recipe over a learning-rate grid and seeds, paired by seed.

    Writes results.json, report.md and curves.png into the plan's out_dir; rerunning an
    interrupted study continues where it stopped (finished runs are kept, unfinished ones resume).

    Args:
        plan: A study plan YAML (configs/studies/*.yaml).
        out_dir: Run directory (default: the plan's out_dir).
        workers: Runs trained at a time, each in its own process (with the plan's threads each).
    """
    from .experiments.study import load_plan, run_study

    command = " ".join(["tokenformer", "study", plan] + (["--out_dir", out_dir] if out_dir else []))
    results = run_study(load_plan(plan, out_dir), command, workers)
    print(f"report: {Path(results['plan']['out_dir']) / 'report.md'}")


COMMANDS: dict[str, Callable[..., Any] | type] = {
    "presets": presets,
    "train": train,
    "grow": grow,
    "consolidate": consolidate,
    "generate": generate,
    "eval": evaluate,
    "convert": convert,
    "scale": scale,
    "study": study,
}
# Subcommands whose required arguments are positional (`tokenformer scale PLAN.yaml`).
POSITIONAL = ("scale", "study")


def build_parser() -> ArgumentParser:
    from .train import TrainConfig

    parser = ArgumentParser(
        prog="tokenformer", description="TokenFormer: train, grow, evaluate and sample language models."
    )
    subcommands = parser.add_subcommands()
    for name, command in COMMANDS.items():
        sub = ArgumentParser(description=(command.__doc__ or "").split("\n\n")[0])
        sub.add_argument("--config", action=ActionConfigFile, help="A YAML file of options; later flags override it.")
        if command is train:
            sub.add_class_arguments(TrainConfig, None, as_group=False)
        else:
            sub.add_function_arguments(command, None, as_group=False, as_positional=name in POSITIONAL)
        subcommands.add_subcommand(name, sub, help=(command.__doc__ or "").split("\n")[0])
    return parser


def main(argv: list[str] | None = None) -> None:
    import torch

    from .train import CheckpointError, TrainConfig, TrainingDiverged

    torch.set_flush_denormal(True)  # CPU training and inference are several times slower without it
    parser = build_parser()
    args = parser.parse_args(argv)
    name = args.subcommand
    options = {k: v for k, v in args[name].items() if k != "config"}
    try:
        if name == "train":
            train(TrainConfig(**options))
        else:
            COMMANDS[name](**options)
    except (
        ValueError,
        FileNotFoundError,
        FileExistsError,
        ConnectionError,
        CheckpointError,
        TrainingDiverged,
        ImportError,
        RuntimeError,
    ) as exc:
        print(f"tokenformer {name}: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
