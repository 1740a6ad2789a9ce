"""How much of its sparse memories (docs/sparse-memory.md) a trained language model reads on its
own validation data.

For each training run directory (``tokenformer train``'s ``out_dir``, or a study's
``out_dir/runs/<variant>/lr-<lr>/seed-<s>``) the script loads the newest complete checkpoint (or
a checkpoint given instead, of the run's last step): the model, its tokenizer and its training
config, with the moving average of the weights where the run kept one (the weights its
validation loss is of). It rebuilds the run's validation batches
from that config (the same fixed windows its validation loss used) and runs
``tokenformer.memory_usage`` over the first ``--batches`` of them (default: all ``eval_batches``).
Per memory table: its value tokens, the tokens selected at least once, their share, and the KL
divergence in nats of the selection counts from uniform (0 when every token is selected equally
often); then each table's mean share over the runs given. fp32 on the CPU, one thread.

    python benchmarks/memory_usage.py RUN_DIR [RUN_DIR ...] [--batches N] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # this checkout's code, whichever tokenformer is installed

from tokenformer import SparsePattention, io, memory_usage  # noqa: E402
from tokenformer.data import Tokenizer, windows_to_batch  # noqa: E402
from tokenformer.experiments import runner  # noqa: E402
from tokenformer.train import TrainConfig, load_checkpoint  # noqa: E402
from tokenformer.train.checkpoint import (  # noqa: E402
    CHECKPOINTS,
    MANIFEST,
    checkpoint_step,
    is_sharded,
    latest_checkpoint,
    read_train_config,
    reading,
)
from tokenformer.train.metrics import standard_error  # noqa: E402
from tokenformer.train.tasks import make_task  # noqa: E402

HEADERS = ["run", "table", "tokens", "selected", "share", "KL from uniform (nats)"]


@dataclass
class RunUsage:
    """``memory_usage`` of one run on its validation batches, and what was measured."""

    run: str
    step: int
    averaged: bool  # the moving average of the weights, not the live ones
    batches: int
    batch_size: int
    seq_len: int
    usage: dict[str, dict[str, Any]]


def finished_checkpoint(run: Path) -> Path:
    """The newest complete checkpoint of the run directory ``run`` (or ``run`` itself, a
    checkpoint), refused unless the run trained to its ``max_steps``."""
    allowed = (
        "a training run directory (tokenformer train's out_dir or a study's runs/<variant>/lr-<lr>/seed-<s>) "
        "or a checkpoint of one"
    )
    if (run / MANIFEST).is_file():
        checkpoint = run
    elif (run / CHECKPOINTS).is_dir():
        checkpoint = latest_checkpoint(run)
        if checkpoint is None:
            raise SystemExit(f"run directory {str(run)!r} has no complete checkpoint; allowed: {allowed}")
    else:
        raise SystemExit(f"{str(run)!r} has no {CHECKPOINTS}/ folder and is no checkpoint; allowed: {allowed}")
    max_steps = read_train_config(checkpoint)["max_steps"]
    if checkpoint_step(checkpoint) < max_steps:
        raise SystemExit(
            f"run {str(run)!r} is not finished: checkpoint {checkpoint.name} is at step "
            f"{checkpoint_step(checkpoint)} of max_steps={max_steps}; allowed: a run that trained to its max_steps"
        )
    if is_sharded(checkpoint):
        raise SystemExit(
            f"checkpoint {str(checkpoint)!r} is sharded; allowed: a whole one "
            f"(tokenformer consolidate --checkpoint {checkpoint} --out DIR writes it)"
        )
    return checkpoint


def validation_batches(config: TrainConfig, tokenizer: Tokenizer, batches: int | None, run: Path) -> list[torch.Tensor]:
    """The input ids of the first ``batches`` (default: all) of the run's validation batches:
    its task's fixed windows, ``batch_size`` at a time, as its validation loss reads them."""
    if config.task != "lm":
        raise SystemExit(f"run {str(run)!r} trained task={config.task!r}; allowed: lm (a language model)")
    windows = make_task(config, tokenizer)[0].eval_windows
    available = -(-len(windows) // config.batch_size)
    if batches is None:
        batches = available
    if not 1 <= batches <= available:
        raise SystemExit(
            f"--batches {batches} is not a number of validation batches run {str(run)!r} has; allowed: 1 to "
            f"{available} (its eval_batches={config.eval_batches} of batch_size={config.batch_size} windows)"
        )
    starts = range(0, batches * config.batch_size, config.batch_size)
    return [windows_to_batch(windows[start : start + config.batch_size])[0] for start in starts]


def measure(run_dir: str, batches: int | None = None) -> RunUsage:
    """``memory_usage`` of the finished run ``run_dir`` on its first ``batches`` validation batches."""
    run = Path(run_dir).expanduser()
    with reading(run):  # a run that is still being written keeps the checkpoint picked until it is read
        path = finished_checkpoint(run)
        checkpoint = load_checkpoint(path)
    model = checkpoint.model
    if not any(isinstance(module, SparsePattention) for module in model.modules()):
        layers = getattr(model.config, "memory_layers", None)
        raise SystemExit(
            f"run {str(run)!r} trained a model without a sparse memory (memory_layers={layers!r}); "
            "allowed: a run whose model has memory layers (model_overrides memory_layers, e.g. [1], or a "
            "*-memory preset)"
        )
    if checkpoint.ema is not None:
        model.load_state_dict(checkpoint.ema, strict=True)
    config = TrainConfig.from_dict(checkpoint.trainer_state["train_config"])
    ids = validation_batches(config, Tokenizer.from_json(checkpoint.tokenizer_json), batches, run)
    with torch.no_grad():
        usage = memory_usage(model, ids)
    return RunUsage(
        run_dir, checkpoint_step(path), checkpoint.ema is not None, len(ids), config.batch_size, config.seq_len, usage
    )


def usage_rows(runs: list[RunUsage]) -> list[list[object]]:
    return [
        [f"`{r.run}`", f"`{table}`", s["tokens"], s["selected"], f"{s['share']:.4f}", f"{s['kl_uniform']:.4f}"]
        for r in runs
        for table, s in r.usage.items()
    ]


def mean_rows(runs: list[RunUsage]) -> list[list[object]]:
    """Each table's mean share over the runs that have it (± standard error with two or more)."""
    shares: dict[str, list[float]] = {}
    for r in runs:
        for table, s in r.usage.items():
            shares.setdefault(table, []).append(s["share"])
    rows = []
    for table, values in shares.items():
        spread = f" ± {standard_error(values):.4f}" if len(values) > 1 else ""
        rows.append([f"`{table}`", len(values), f"{statistics.fmean(values):.4f}{spread}"])
    return rows


def report(runs: list[RunUsage], command: str) -> str:
    measured = [
        f"- `{r.run}`: step {r.step}, {'moving average of the' if r.averaged else 'live'} weights, "
        f"{r.batches} validation batch(es) of {r.batch_size} x {r.seq_len} tokens"
        for r in runs
    ]
    return "\n".join(
        [
            "# Sparse memory usage on validation batches",
            "",
            f"Command (from the repository root, at commit {runner.source_version()}):",
            "",
            f"    {command}",
            "",
            "Each run's newest checkpoint, on the first batches of its own validation windows:",
            "",
            *measured,
            "",
            "`share`: the fraction of the table's value tokens selected at least once; `KL from uniform`: of "
            "the selection counts, 0 when every token is selected equally often.",
            "",
            runner.markdown_table(HEADERS, usage_rows(runs)),
            "",
            "Mean share over the runs:",
            "",
            runner.markdown_table(["table", "runs", "mean share"], mean_rows(runs)),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training run directories")
    parser.add_argument(
        "--batches", type=int, default=None, help="validation batches per run (default: all the run's eval_batches)"
    )
    parser.add_argument("--out", default=None, help="write the markdown report here")
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)  # denormals slow CPU kernels
    torch.set_num_threads(1)
    runs = [measure(run, args.batches) for run in args.runs]
    program = "python " + os.path.relpath(__file__, ROOT)
    text = report(runs, runner.command_line(program, sys.argv[1:] if argv is None else argv))
    print(text)
    if args.out:
        io.atomic_write_text(Path(args.out), text)
    return text


if __name__ == "__main__":
    main()
