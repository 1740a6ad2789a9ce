"""Fashion-MNIST: TokenFormer-ViT against the parameter-matched linear ViT, and grown against scratch.

Every arm trains through the library's Trainer (same loop, checkpoints, schedule as
``tokenformer train --task vision``) in its own process with ``--threads`` intra-op threads
(default one); ``--jobs`` arms run at a time (default one after another). Phases:

* grid: each of the two main arms trains ``--grid-epochs`` at every rate of ``--lrs``; the rate
  with the best validation accuracy (held-out 5% of the training split) is kept per arm.
* main: tokenformer (``--preset``) and linear (``projection: linear``, MLP width chosen to match
  the parameter count) for ``--epochs`` each, at their own best grid rate. With
  ``--final-val-fraction`` below the grid's 0.05 they hold out fewer images and train on the rest
  (the rates chosen, the grid's validation images become training images; epochs count the
  images each arm trains on).
* growth: ``grown`` (the preset grown to the ``--grow-to`` token counts halfway, validated right
  before and right after growth) and ``scratch`` (those counts from the start) for
  ``--grow-epochs``, both at the tokenformer arm's rate.

With ``--seeds 0,1,2`` the main and growth pairs run once per seed (the grid runs the first seed
only) and the report adds each arm's mean test accuracy with its standard error and the paired
difference per seed: single runs of this size differ by a few tenths of a point between seeds.

Each arm reports validation and test accuracy (10,000 test images), its wall-clock from start to
test result, and the median training throughput over its logging windows. Results of finished
arms are kept in ``--out``: a rerun skips them, and an interrupted arm resumes from its last
checkpoint. Usage::

    python benchmarks/vision_fmnist.py --out runs/vision-bench --report benchmarks/results/vision_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import markdown_table, source_version, write_report

from tokenformer.train.metrics import standard_error
from tokenformer.train.vision import held_out_count

TRAIN_SPLIT = 60000  # Fashion-MNIST's training split
GRID_VAL_FRACTION = 0.05  # the grid (and, by default, every arm) holds out 3,000 of them for validation
MAIN_ARMS = ("tokenformer", "linear")
TARGET_ACCURACY, TARGET_SECONDS = 0.90, 15 * 60


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"--seeds must be distinct non-negative integers, got {text!r}")
    return seeds


def held_out(val_fraction: float) -> int:
    """Validation images the trainer holds out of the training split."""
    return held_out_count(TRAIN_SPLIT, val_fraction)


def arm_options(
    arm: str,
    lr: float,
    epochs: float,
    args: argparse.Namespace,
    grow_to: dict[str, int],
    out_dir: Path,
    compiled: bool = False,
    seed: int = 0,
    val_fraction: float = GRID_VAL_FRACTION,
) -> dict:
    from tokenformer.vision import VisionConfig

    steps = max(1, round(epochs * (TRAIN_SPLIT - held_out(val_fraction)) / args.batch_size))
    overrides = dict(args.model_overrides)
    if arm == "linear":
        matched = VisionConfig.from_preset(args.preset, **overrides).parameter_matched_linear()
        overrides.update(projection="linear", ffn_tokens=matched.ffn_tokens)
    elif arm == "scratch":
        overrides.update(grow_to)
    return dict(
        task="vision",
        model=args.preset,
        model_overrides=overrides,
        dataset="fashion-mnist",
        batch_size=args.batch_size,
        max_steps=steps,
        lr=lr,
        min_lr=lr / 10,
        warmup_steps=min(args.warmup_steps, steps // 10),
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        grad_clip=args.grad_clip,
        val_fraction=val_fraction,
        crop_padding=args.crop_padding,
        hflip=args.hflip,
        erase_prob=args.erase_prob,
        ema_decay=args.ema_decay,
        eval_interval=max(1, steps // 4),
        ckpt_interval=max(1, steps // 4),
        log_interval=20,
        keep_last=1,
        threads=args.threads,
        device="cpu",
        out_dir=str(out_dir),
        resume="auto",
        progress=False,
        seed=seed,
        compile=compiled,
    )


def run_arm(arm: str, options: dict, grow_to: dict[str, int], result_path: Path) -> None:
    """One arm in this process: train (growing halfway for ``grown``), then test."""
    from tokenformer.train import TrainConfig, Trainer

    started, load_before = time.strftime("%H:%M", time.gmtime()), os.getloadavg()[0]
    config = TrainConfig.from_dict(options)
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer = Trainer(config)
    growth = None
    try:
        if arm == "grown":
            half = config.max_steps // 2
            trainer.fit(half)
            if not trainer.state.growth_history:
                before = trainer.state.val_history[-1]  # fit validates at its last step
                trainer.grow(**grow_to)
                after = trainer.evaluate()
                growth = {"step": half, "before": before, "after": after}
        trainer.fit()
    finally:
        trainer.close()
    trained = time.perf_counter() - start
    result = trainer.task.test(trainer.evaluated_model, trainer.run_dir)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    # With ema_decay the test used the averaged weights; the live ones' accuracy, after the clock stopped.
    raw = (
        trainer.task.classification.evaluate(trainer.model, trainer.task.test_batches).accuracy
        if trainer.ema is not None
        else None
    )
    val = trainer.state.val_history[-1]
    rates = [
        row["tokens_per_s"]
        for row in map(json.loads, (trainer.run_dir / "metrics.jsonl").read_text().splitlines())
        if row.get("kind") == "train"
    ]
    record = dict(
        arm=arm,
        seed=config.seed,
        lr=config.lr,
        steps=config.max_steps,
        images=trainer.state.tokens,
        flops=trainer.state.flops,
        parameters=sum(p.numel() for p in trainer.model.parameters()),
        val_accuracy=val["val_accuracy"],
        val_loss=val["val_loss"],
        test_accuracy=result["test_accuracy"],
        test_loss=result["test_loss"],
        test_accuracy_raw=raw,
        train_s=trained,
        wall_s=wall,
        cpu_s=cpu,
        img_s_median=statistics.median(rates),
        started=started,
        load=(load_before, os.getloadavg()[0]),
        resumed=trainer.resumed_from is not None,
        growth=growth,
    )
    result_path.write_text(json.dumps(record, indent=2) + "\n")


def run_arms(jobs: list[tuple[str, dict, Path]], grow_to: dict[str, int], at_once: int) -> list[dict]:
    """Run the arms, ``at_once`` processes at a time; finished arms (a result file) are skipped."""
    todo = [job for job in jobs if not job[2].is_file()]
    for first in range(0, len(todo), at_once):
        procs = []
        for arm, options, result_path in todo[first : first + at_once]:
            spec = json.dumps({"arm": arm, "options": options, "grow_to": grow_to, "result": str(result_path)})
            procs.append(subprocess.Popen([sys.executable, __file__, "--arm-json", spec]))
        for proc in procs:
            if proc.wait() != 0:
                raise SystemExit(f"an arm failed with exit status {proc.returncode}")
    return [json.loads(path.read_text()) for _, _, path in jobs]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/vision-bench", help="run directories and per-arm results")
    parser.add_argument("--report", default="benchmarks/results/vision_cpu.md")
    parser.add_argument("--preset", default="fmnist-0.3M")
    parser.add_argument(
        "--model-overrides",
        type=json.loads,
        default={},
        help="JSON object of VisionConfig fields to change on the preset for every arm, e.g. '{\"n_layers\": 6}'",
    )
    parser.add_argument("--lrs", default="1e-3,2e-3,4e-3", help="learning-rate grid, comma-separated")
    parser.add_argument("--grid-epochs", type=float, default=1.0)
    parser.add_argument("--epochs", type=float, default=9.0)
    parser.add_argument("--grow-epochs", type=float, default=3.0)
    parser.add_argument("--grow-to", default="qkv_tokens=96,proj_tokens=96,ffn_tokens=512")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup-steps", type=int, default=200, help="at most a tenth of the run")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument(
        "--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this value (0: off)"
    )
    parser.add_argument(
        "--final-val-fraction",
        type=float,
        default=GRID_VAL_FRACTION,
        help="share of the training split the main pair holds out for validation (the grid and the growth pair "
        f"hold out {GRID_VAL_FRACTION:g} always): below it, the main pair trains on the images the grid "
        "validated on",
    )
    parser.add_argument("--crop-padding", type=int, default=0)
    parser.add_argument("--hflip", action="store_true")
    parser.add_argument(
        "--erase-prob",
        type=float,
        default=0.0,
        help="random erasing: share of training images that get a noise rectangle",
    )
    parser.add_argument(
        "--ema-decay",
        type=float,
        default=0.0,
        help="evaluate and test a moving average of the weights with this decay (0: off)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="arms run at a time")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of each arm")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="train the main and growth arms through torch.compile (compile time counts in their wall-clock; "
        "the grid, which compares accuracy only, runs eagerly)",
    )
    parser.add_argument(
        "--pairs", default="main,growth", help="which pairs to run after the grid: main, growth or both"
    )
    parser.add_argument(
        "--seeds",
        type=parse_seeds,
        default=[0],
        help="comma-separated seeds: the main and growth pairs run once per seed (the grid, the first)",
    )
    parser.add_argument("--arm-json", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.arm_json:
        spec = json.loads(args.arm_json)
        run_arm(spec["arm"], spec["options"], spec["grow_to"], Path(spec["result"]))
        return
    grow_to = {k: int(v) for k, v in (item.split("=") for item in args.grow_to.split(","))}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lrs = [float(x) for x in args.lrs.split(",")]
    try:  # every arm's options, checked before the first arm starts
        from tokenformer.train import TrainConfig

        TrainConfig.from_dict(
            arm_options(
                "tokenformer",
                lrs[0],
                args.epochs,
                args,
                grow_to,
                out / "check",
                args.compile,
                args.seeds[0],
                args.final_val_fraction,
            )
        )
    except (TypeError, ValueError) as error:
        raise SystemExit(f"vision_fmnist.py: {error}") from None
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    # Every arm is a new process that imports the tree as it is then: name the commit at launch.
    launched_at = source_version()
    if launched_at.endswith("-dirty"):
        print(
            f"note: uncommitted changes in the tree ({launched_at}); the report cannot name the code that ran",
            file=sys.stderr,
        )

    def job(
        arm: str,
        lr: float,
        epochs: float,
        tag: str,
        compiled: bool = args.compile,
        seed: int = args.seeds[0],
        val_fraction: float = GRID_VAL_FRACTION,
    ) -> tuple[str, dict, Path]:
        tag = tag if seed == 0 else f"{tag}-seed{seed}"  # seed 0 keeps the names of single-seed runs
        return (
            arm,
            arm_options(arm, lr, epochs, args, grow_to, out / tag, compiled, seed, val_fraction),
            out / f"{tag}.json",
        )

    grid = {arm: [] for arm in MAIN_ARMS}
    if len(lrs) > 1:
        for record in run_arms(
            [job(arm, lr, args.grid_epochs, f"grid-{arm}-lr{lr:g}", compiled=False) for lr in lrs for arm in MAIN_ARMS],
            grow_to,
            args.jobs,
        ):
            grid[record["arm"]].append(record)
    best = {
        arm: max(records, key=lambda r: r["val_accuracy"])["lr"] if records else lrs[0] for arm, records in grid.items()
    }
    pairs = args.pairs.split(",")
    main_pair = (
        run_arms(
            [
                job(arm, best[arm], args.epochs, arm, seed=seed, val_fraction=args.final_val_fraction)
                for seed in args.seeds
                for arm in MAIN_ARMS
            ],
            grow_to,
            args.jobs,
        )
        if "main" in pairs
        else []
    )
    growth_pair = (
        run_arms(
            [
                job(arm, best["tokenformer"], args.grow_epochs, arm, seed=seed)
                for seed in args.seeds
                for arm in ("grown", "scratch")
            ],
            grow_to,
            args.jobs,
        )
        if "growth" in pairs
        else []
    )
    report = write_report(
        args.report,
        "Fashion-MNIST on CPU: TokenFormer-ViT vs the linear ViT, grown vs scratch",
        torch.device("cpu"),
        "wall",
        render(args, started, grid, main_pair, growth_pair),
        launched_at,
    )
    print(report)


def data_split(args: argparse.Namespace) -> str:
    def split(val_fraction: float) -> str:
        val = held_out(val_fraction)
        return f"{TRAIN_SPLIT - val:,} training images ({val:,} held out, evenly spaced, for validation)"

    if args.final_val_fraction == GRID_VAL_FRACTION:
        return split(GRID_VAL_FRACTION)
    return (
        f"the grid and the growth pair {split(GRID_VAL_FRACTION)}; the main pair, its rates chosen, "
        f"{split(args.final_val_fraction)}"
    )


def recipe(args: argparse.Namespace) -> str:
    augment = [f"random crop (padding {args.crop_padding})"] * bool(args.crop_padding) + [
        "horizontal flip"
    ] * args.hflip
    augment += [f"random erasing (probability {args.erase_prob:g})"] * bool(args.erase_prob)
    return (
        f"batch {args.batch_size}, AdamW (weight decay {args.weight_decay:g}), "
        f"linear warmup over min({args.warmup_steps}, a tenth of the steps) then cosine to lr/10, "
        f"label smoothing {args.label_smoothing:g}, "
        + (f"gradient norm clipped to {args.grad_clip:g}, " if args.grad_clip else "no gradient clipping, ")
        + f"augmentation: {', '.join(augment) or 'none'}"
        + (
            f"; validation and test use the moving average of the weights (decay {args.ema_decay:g})"
            if args.ema_decay
            else ""
        )
        + ("; the main and growth arms trained through `torch.compile` (the grid eagerly)" if args.compile else "")
    )


def render(args, started, grid, main_pair, growth_pair) -> str:
    lines = [
        f"Started {started}. Each arm ran in its own process with {args.threads} intra-op thread(s) "
        f"(`threads: {args.threads}`), "
        f"{args.jobs} arm(s) at a time; the time each arm started and the 1-minute load average of the machine "
        "before/after it are in the tables.",
        "",
        f"Data: {data_split(args)}, test on the 10,000 test images. Recipe for every arm: {recipe(args)}."
        + (
            f" Model fields changed on `{args.preset}` for every arm: `{json.dumps(args.model_overrides)}`."
            if args.model_overrides
            else ""
        ),
        "",
        "`img/s` is the median over the logging windows (20 steps) of training images per second, "
        "validation and checkpoints left out; `wall-clock` is the whole arm from building the trainer to "
        "the test result (data loading, validation, checkpoints and the test pass included); `CPU` is the "
        "CPU time of the arm's process over the same span: with one thread, the time it spent on a core, "
        "which other jobs on the machine do not lengthen (they still slow it through shared caches and memory); "
        "with more threads, their summed time.",
        "",
    ]
    if grid["tokenformer"]:
        lines += [f"## Learning-rate grid ({args.grid_epochs:g} epoch(s) per rate, validation accuracy)", ""]
        rates = [r["lr"] for r in grid["tokenformer"]]
        lines += [
            markdown_table(
                ["arm", *(f"lr {lr:g}" for lr in rates)],
                [[arm, *(f"{r['val_accuracy']:.4f}" for r in records)] for arm, records in grid.items()],
            ),
            "",
        ]
        lines += [f"## Same epochs ({args.epochs:g}), each arm at its best grid rate", ""]
    else:
        lines += [
            f"No learning-rate grid: every arm uses lr {args.lrs}, tuned for neither.",
            "",
            f"## Same epochs ({args.epochs:g}), same learning rate",
            "",
        ]
    if main_pair:
        lines += main_section(main_pair, args.threads)
    if growth_pair:
        lines += [
            f"## Grown vs scratch, same steps ({args.grow_epochs:g} epochs), the tokenformer arm's rate",
            "",
            f"`grown`: {args.preset} trained half the steps, then grown to {args.grow_to} (function-preserving, "
            f"AdamW moments carried), then the other half; `scratch`: those counts from the start.",
            "",
            table(growth_pair),
            "",
        ]
        lines += seed_summary(growth_pair, "grown", "scratch")
        for grown in (r for r in growth_pair if r["arm"] == "grown" and r["growth"]):
            before, after = grown["growth"]["before"], grown["growth"]["after"]
            seed = f" (seed {grown.get('seed', 0)})" if len(args.seeds) > 1 else ""
            lines += [
                f"Validation right before growth{seed} (step {grown['growth']['step']}): "
                f"accuracy {before['val_accuracy']:.4f}, loss {before['val_loss']:.6f}; "
                f"right after: accuracy {after['val_accuracy']:.4f}, loss {after['val_loss']:.6f}.",
                "",
            ]
    return "\n".join(lines)


def main_section(pair: list[dict], threads: int) -> list[str]:
    tfs = [r for r in pair if r["arm"] == "tokenformer"]
    if len(tfs) == 1:
        base = next(r for r in pair if r["arm"] == "linear")
        tf = tfs[0]
        reached = tf["test_accuracy"] >= TARGET_ACCURACY and tf["wall_s"] <= TARGET_SECONDS
        return [
            table(pair),
            "",
            f"TokenFormer − linear test accuracy: {100 * (tf['test_accuracy'] - base['test_accuracy']):+.2f} points; "
            f"tokenformer/linear: img/s median {tf['img_s_median'] / base['img_s_median']:.2f}x, "
            f"wall-clock {tf['wall_s'] / base['wall_s']:.2f}x.",
            "",
            f"Target for the small model (>= {TARGET_ACCURACY:.0%} test accuracy in <= {TARGET_SECONDS // 60} minutes "
            f"on 2 cores): {'reached' if reached else 'not reached'} with {threads} thread(s): "
            f"{100 * tf['test_accuracy']:.2f}% in {tf['wall_s'] / 60:.1f} min "
            f"of wall-clock ({tf['cpu_s'] / 60:.1f} min of CPU time).",
            "",
        ]
    mean = statistics.mean(r["test_accuracy"] for r in tfs)
    slowest = max(r["wall_s"] for r in tfs)
    each = sum(r["test_accuracy"] >= TARGET_ACCURACY and r["wall_s"] <= TARGET_SECONDS for r in tfs)
    reached = mean >= TARGET_ACCURACY and slowest <= TARGET_SECONDS
    rate = statistics.median(r["img_s_median"] for r in tfs) / statistics.median(
        r["img_s_median"] for r in pair if r["arm"] == "linear"
    )
    return [
        table(pair),
        "",
        *seed_summary(pair, "tokenformer", "linear"),
        f"tokenformer/linear: img/s (median over seeds of each arm's median) {rate:.2f}x.",
        "",
        f"Target for the small model (>= {TARGET_ACCURACY:.0%} test accuracy in <= {TARGET_SECONDS // 60} minutes "
        f"on 2 cores), judged on the mean over seeds: {'reached' if reached else 'not reached'} "
        f"with {threads} thread(s): {100 * mean:.2f}% on average, the slowest seed in {slowest / 60:.1f} min "
        f"of wall-clock; {each} of {len(tfs)} seeds reached it alone.",
        "",
    ]


def seed_summary(records: list[dict], arm: str, baseline: str) -> list[str]:
    """Mean test accuracy of both arms over seeds, with standard errors, and their paired difference."""
    by_seed = {
        name: {r.get("seed", 0): r["test_accuracy"] for r in records if r["arm"] == name} for name in (arm, baseline)
    }
    seeds = sorted(by_seed[arm])
    if len(seeds) < 2:
        return []
    diffs = [by_seed[arm][s] - by_seed[baseline][s] for s in seeds]
    means = ", ".join(
        f"{name} {100 * statistics.mean(values.values()):.2f}% (s.e. {100 * standard_error(list(values.values())):.2f})"
        for name, values in by_seed.items()
    )
    return [
        f"Over {len(seeds)} seeds ({', '.join(map(str, seeds))}), mean test accuracy: {means}. "
        f"{arm} − {baseline}, paired by seed: {', '.join(f'{100 * d:+.2f}' for d in diffs)}; "
        f"mean {100 * statistics.mean(diffs):+.2f} points (s.e. {100 * standard_error(diffs):.2f}).",
        "",
    ]


def table(records: list[dict]) -> str:
    headers = [
        "arm",
        "seed",
        "parameters",
        "lr",
        "steps",
        "images",
        "train TFLOP",
        "val acc",
        "test acc",
        "test loss",
        "img/s (median)",
        "wall-clock (s)",
        "CPU (s)",
        "started (UTC)",
        "load before/after",
    ]
    rows = [
        [
            r["arm"],
            r.get("seed", 0),
            f"{r['parameters']:,}",
            f"{r['lr']:g}",
            r["steps"],
            f"{r['images']:,}",
            f"{r['flops'] / 1e12:.1f}",
            f"{r['val_accuracy']:.4f}",
            f"{r['test_accuracy']:.4f}",
            f"{r['test_loss']:.4f}",
            f"{r['img_s_median']:.0f}",
            f"{r['wall_s']:.0f}",
            f"{r['cpu_s']:.0f}",
            r["started"],
            "{:.1f}/{:.1f}".format(*r["load"]),
        ]
        for r in records
    ]
    text = markdown_table(headers, rows)
    raw = [
        f"{r['arm']} (seed {r.get('seed', 0)}) {r['test_accuracy_raw']:.4f}"
        for r in records
        if r.get("test_accuracy_raw") is not None
    ]
    return text + ("\n\nTest accuracy of the live (not averaged) weights: " + ", ".join(raw) + "." if raw else "")


if __name__ == "__main__":
    main()
