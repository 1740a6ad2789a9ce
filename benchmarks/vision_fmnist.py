"""Fashion-MNIST: TokenFormer-ViT against the parameter-matched linear ViT, and grown against scratch.

Every arm trains through the library's Trainer (same loop, checkpoints, schedule as
``tokenformer train --task vision``) with one intra-op thread; arms run two at a time as separate
processes, so the two arms of a pair share the machine under the same load. Phases:

* ``grid``: each of the two main arms trains ``--grid-epochs`` at every rate of ``--lrs``; the
  rate with the best validation accuracy (held-out 5% of the training split) is kept per arm.
* ``main``: tokenformer (``fmnist-0.3M``) and linear (``projection: linear``, MLP width chosen
  to match the parameter count) for ``--epochs``, then ``grown`` (``fmnist-0.3M`` grown to the
  ``--grow-to`` token counts halfway) and ``scratch`` (those counts from the start) for
  ``--grow-epochs``, both at the tokenformer arm's rate.

Each arm reports test accuracy (10,000 test images) and its wall-clock; the script writes a
Markdown report. Usage::

    python benchmarks/vision_fmnist.py --out runs/vision-bench --report benchmarks/results/vision_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

PRESET = "fmnist-0.3M"
TRAIN_IMAGES = 57000  # the 60,000 training images less the 5% held out for validation


def arm_options(arm: str, lr: float, epochs: float, batch_size: int, grow_to: dict[str, int], out_dir: Path) -> dict:
    from tokenformer.vision import VisionConfig

    steps = max(1, round(epochs * TRAIN_IMAGES / batch_size))
    overrides: dict = {}
    if arm == "linear":
        matched = VisionConfig.from_preset(PRESET).parameter_matched_linear()
        overrides = {"projection": "linear", "ffn_tokens": matched.ffn_tokens}
    elif arm == "scratch":
        overrides = dict(grow_to)
    return dict(
        task="vision", model=PRESET, model_overrides=overrides, dataset="fashion-mnist", batch_size=batch_size,
        max_steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=min(200, steps // 10), weight_decay=0.05,
        eval_interval=max(1, steps // 2), ckpt_interval=max(1, steps // 4), keep_last=1, threads=1, device="cpu",
        out_dir=str(out_dir), resume="auto", progress=False, seed=0,
    )


def run_arm(arm: str, options: dict, grow_to: dict[str, int], result_path: Path) -> None:
    """One arm in this process: train (growing halfway for ``grown``), then test."""
    from tokenformer.train import Trainer, TrainConfig

    config = TrainConfig(**options)
    start = time.perf_counter()
    trainer = Trainer(config)
    try:
        if arm == "grown":
            half = config.max_steps // 2
            trainer.fit(half)
            if not trainer.state.growth_history:
                trainer.grow(**grow_to)
        trainer.fit()
    finally:
        trainer.close()
    trained = time.perf_counter() - start
    result = trainer.task.test(trainer.model, trainer.run_dir)
    wall = time.perf_counter() - start
    val = trainer.state.val_history[-1]
    parameters = sum(p.numel() for p in trainer.model.parameters())
    record = dict(
        arm=arm, lr=config.lr, steps=config.max_steps, images=trainer.state.tokens, flops=trainer.state.flops,
        parameters=parameters, val_accuracy=val["val_accuracy"], val_loss=val["val_loss"],
        test_accuracy=result.accuracy, test_loss=result.loss, train_s=trained, wall_s=wall,
        resumed=trainer.resumed_from is not None, growth=trainer.state.growth_history,
    )
    result_path.write_text(json.dumps(record, indent=2) + "\n")


def run_pair(jobs: list[tuple[str, dict, Path]], grow_to: dict[str, int]) -> tuple[list[dict], tuple[float, float]]:
    """Run the arms side by side, one process each; the load average before and after."""
    load_before = os.getloadavg()[0]
    procs = []
    for arm, options, result_path in jobs:
        if result_path.is_file():
            continue
        spec = json.dumps({"arm": arm, "options": options, "grow_to": grow_to, "result": str(result_path)})
        procs.append(subprocess.Popen([sys.executable, __file__, "--arm-json", spec]))
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"an arm failed with exit status {proc.returncode}")
    return [json.loads(p.read_text()) for _, _, p in jobs], (load_before, os.getloadavg()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/vision-bench", help="run directories and per-arm results")
    parser.add_argument("--report", default="benchmarks/results/vision_cpu.md")
    parser.add_argument("--lrs", default="1e-3,2e-3,4e-3", help="learning-rate grid, comma-separated")
    parser.add_argument("--grid-epochs", type=float, default=0.5)
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--grow-epochs", type=float, default=2.0)
    parser.add_argument("--grow-to", default="qkv_tokens=96,proj_tokens=96,ffn_tokens=512")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--pairs", default="main,growth", help="which pairs to run after the grid: main, growth or both")
    parser.add_argument("--arm-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm_json:
        spec = json.loads(args.arm_json)
        run_arm(spec["arm"], spec["options"], spec["grow_to"], Path(spec["result"]))
        return
    grow_to = {k: int(v) for k, v in (item.split("=") for item in args.grow_to.split(","))}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lrs = [float(x) for x in args.lrs.split(",")]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    def job(arm: str, lr: float, epochs: float, tag: str) -> tuple[str, dict, Path]:
        return arm, arm_options(arm, lr, epochs, args.batch_size, grow_to, out / tag), out / f"{tag}.json"

    grid: dict[str, list[dict]] = {"tokenformer": [], "linear": []}
    loads = []
    for lr in lrs if len(lrs) > 1 else []:
        pair = [job(arm, lr, args.grid_epochs, f"grid-{arm}-lr{lr:g}") for arm in grid]
        results, load = run_pair(pair, grow_to)
        loads.append(load)
        for record in results:
            grid[record["arm"]].append(record)
    best = {arm: max(records, key=lambda r: r["val_accuracy"])["lr"] if records else lrs[0] for arm, records in grid.items()}
    pairs = args.pairs.split(",")
    main_pair, growth_pair = [], []
    if "main" in pairs:
        main_pair, load = run_pair([job(arm, best[arm], args.epochs, arm) for arm in ("tokenformer", "linear")], grow_to)
        loads.append(load)
    if "growth" in pairs:
        growth_pair, load = run_pair([job(arm, best["tokenformer"], args.grow_epochs, arm) for arm in ("grown", "scratch")], grow_to)
        loads.append(load)
    command = "python benchmarks/vision_fmnist.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "arm_json"
    )
    report = render(args, command, started, grid, main_pair, growth_pair, loads)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(report)
    print(report)


def render(args, command, started, grid, main_pair, growth_pair, loads) -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    lines = [
        "# Fashion-MNIST on CPU: TokenFormer-ViT vs the linear ViT, grown vs scratch",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, fp32, one intra-op thread per arm, "
        f"two arms at a time side by side. Started {started}. The machine is shared: 1-minute load average "
        f"before/after each pair: " + ", ".join(f"{a:.1f}/{b:.1f}" for a, b in loads) + ".",
        "",
        f"Command: `{command}`",
        "",
        f"Data: 57,000 training images (3,000 held out, evenly spaced, for validation), test on the 10,000 "
        f"test images; batch {args.batch_size}, AdamW (weight decay 0.05), warmup then cosine to lr/10, no augmentation.",
        "",
    ]
    if grid["tokenformer"]:
        lines += [
            f"## Learning-rate grid ({args.grid_epochs:g} epoch per rate, validation accuracy)",
            "",
            "| arm | " + " | ".join(f"lr {r['lr']:g}" for r in grid["tokenformer"]) + " |",
            "|---|" + "---|" * len(grid["tokenformer"]),
        ]
        for arm, records in grid.items():
            lines.append(f"| {arm} | " + " | ".join(f"{r['val_accuracy']:.4f}" for r in records) + " |")
        lines += ["", f"## Same epochs ({args.epochs:g}), each at its best grid rate", ""]
    else:
        lines += [
            f"No learning-rate grid: both arms use lr {args.lrs}, untuned for either, so the comparison "
            "can favour whichever architecture that rate suits.",
            "",
            f"## Same epochs ({args.epochs:g}), same learning rate",
            "",
        ]
    if main_pair:
        lines += main_section(main_pair)
    if growth_pair:
        lines += [
            f"## Grown vs scratch, same steps ({args.grow_epochs:g} epochs), the tokenformer arm's rate",
            "",
            f"`grown`: {PRESET} trained half the steps, then grown to {args.grow_to} (function-preserving, "
            f"optimizer moments carried), then the other half; `scratch`: those counts from the start.",
            "",
        ]
        lines += table(growth_pair)
    return "\n".join(lines) + "\n"


def main_section(pair: list[dict]) -> list[str]:
    base = next(r for r in pair if r["arm"] == "linear")
    tf = next(r for r in pair if r["arm"] == "tokenformer")
    return table(pair) + [
        "",
        f"TokenFormer − linear test accuracy: {100 * (tf['test_accuracy'] - base['test_accuracy']):+.2f} points; "
        f"wall-clock ratio tokenformer/linear: {tf['wall_s'] / base['wall_s']:.2f}.",
        f"Target (>= 90% test accuracy in <= 15 minutes on 2 cores) for the small model: "
        f"{'reached' if tf['test_accuracy'] >= 0.9 and tf['wall_s'] <= 900 else 'not reached'} "
        f"({100 * tf['test_accuracy']:.2f}% in {tf['wall_s'] / 60:.1f} min on one core).",
        "",
    ]


def table(records: list[dict]) -> list[str]:
    rows = [
        "| arm | parameters | lr | steps | images | train TFLOP | val acc | test acc | test loss | img/s (fit, with evals) | wall-clock (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        rows.append(
            f"| {r['arm']} | {r['parameters']:,} | {r['lr']:g} | {r['steps']} | {r['images']:,} | {r['flops'] / 1e12:.1f} | "
            f"{r['val_accuracy']:.4f} | {r['test_accuracy']:.4f} | {r['test_loss']:.4f} | {r['images'] / r['train_s']:.0f} | {r['wall_s']:.0f} |"
        )
    return rows


if __name__ == "__main__":
    main()
