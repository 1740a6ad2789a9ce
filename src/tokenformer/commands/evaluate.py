"""``tokenformer eval``: perplexity on text, or lm-evaluation-harness tasks."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from .generate import load_for_inference, model_directory


def evaluate(
    model: str,
    data: str | list[str] | None = None,
    split: Literal["train", "val"] = "val",
    seq_len: int | None = None,
    batch_size: int = 8,
    max_windows: int | None = None,
    tokenizer: str | None = None,
    precision: Literal["fp32", "bf16-mixed"] = "fp32",
    int8: bool = False,
    device: str = "auto",
    harness: bool = False,
    tasks: list[str] | str | None = None,
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
        int8: Evaluate the model with its parameter tokens (and Linear weights) stored as int8
            (``tokenformer.quantize_int8``): how much quantization costs.
        device: ``auto``, ``cpu``, ``cuda``, ...
        harness: Run lm-evaluation-harness tasks instead (needs the ``[eval]`` extra).
        tasks: lm-eval task names with --harness, comma-separated like lm-eval's
            (``piqa,arc_easy``) or a list (``[piqa,arc_easy]``); the paper's six:
            lambada_openai, hellaswag, piqa, arc_easy, arc_challenge, winogrande.
        num_fewshot: Few-shot examples per task with --harness (null: the task's default).
        limit: Evaluate at most this many examples per task (a fraction if < 1) with --harness.
        include_path: A folder of extra lm-eval task YAML files with --harness.
    """
    import contextlib

    import torch

    from ..validation import check_option, is_int

    check_option("batch_size", batch_size, lambda v: is_int(v) and v >= 1, "a positive integer")
    if int8 and harness:
        raise ValueError("--int8 is for perplexity: lm-eval (--harness) loads the model itself; allowed: --int8 false")
    for name, value in (("seq_len", seq_len), ("max_windows", max_windows)):
        check_option(name, value, lambda v: v is None or (is_int(v) and v >= 1), "a positive integer or null")
    if harness:
        tasks = task_names(tasks)
        from ..interop.harness import evaluate as run_harness
        from ..interop.harness import table
        from ..train.checkpoint import reading
        from ..train.trainer import resolve_device

        with reading(model):  # lm-eval reads the checkpoint by its path: kept while it runs
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

    from ..data import even_windows, load_documents
    from ..data.cache import cache_for_checkpoint
    from ..train import TrainConfig, evaluate_windows, prepare_data
    from ..train.trainer import resolve_device

    target = resolve_device(device)
    net, tok, saved = load_for_inference(model, tokenizer, target)
    if int8:
        from ..quantization import quantize_int8

        quantize_int8(net)
    if seq_len is None:
        seq_len = saved["seq_len"] if saved else net.config.max_seq_len
    if data is None:
        if saved is None:
            raise ValueError(f"{model} is not a training checkpoint, so it has no corpus of its own; pass --data")
        cache_dir = cache_for_checkpoint(saved.get("cache_dir"))
        shards, _ = prepare_data(TrainConfig.from_dict({**saved, "resume": None, "cache_dir": cache_dir}), tok)
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
        f"(loss {metrics['val_loss']:.4f} nats/token over {metrics['val_tokens']} tokens of {what}"
        f"{', int8 weights' if int8 else ''})"
    )
    return metrics


def task_names(tasks: list[str] | str | None) -> list[str]:
    """lm-eval task names from ``a,b``, ``[a, b]`` or a mix (``[a,b, c]``), in order, each once."""
    names = [name.strip() for item in ([tasks] if isinstance(tasks, str) else tasks or []) for name in item.split(",")]
    names = list(dict.fromkeys(name for name in names if name))
    if not names:
        raise ValueError(f"--harness needs --tasks: lm-eval task names, e.g. --tasks piqa,arc_easy; got {tasks!r}")
    return names
