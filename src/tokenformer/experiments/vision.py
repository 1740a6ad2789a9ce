"""Fashion-MNIST: TokenFormer-ViT against the parameter-matched linear ViT, and grown against scratch.

Every arm trains through the library's Trainer (same loop, checkpoints, schedule as
``tokenformer train --task vision``) in a process of its own with ``--threads`` intra-op threads
(default one); ``--workers`` arms run at a time (default one after another). Phases:

* grid: each of the two main arms trains ``--grid_epochs`` at every rate of ``--lrs``; the rate
  with the best validation accuracy (held-out 5% of the training split) is kept per arm.
* main: tokenformer (``--model``) and linear (``projection: linear``, MLP width chosen to match
  the parameter count) for ``--epochs`` each, at their own best grid rate. With
  ``--final_val_fraction`` below the grid's 0.05 they hold out fewer images and train on the rest
  (the rates chosen, the grid's validation images become training images; epochs count the
  images each arm trains on).
* growth: ``grown`` (the model grown to the ``--grow_to`` token counts halfway, validated right
  before and right after growth) and ``scratch`` (those counts from the start) for
  ``--grow_epochs``, both at the tokenformer arm's rate.

With ``--seeds 0,1,2`` the main and growth pairs run once per seed (the grid runs the first seed
only) and the report adds each arm's mean test accuracy with its standard error and the paired
difference per seed: single runs of this size differ by a few tenths of a point between seeds.

Each arm reports validation and test accuracy (10,000 test images), its wall-clock from start to
test result, and the median training throughput over its logging windows. Every arm is a run
directory in ``--out_dir`` (:mod:`~tokenformer.experiments.runner`): a rerun skips finished arms,
and an interrupted arm resumes from its last checkpoint. The training options are ``tokenformer
train``'s, by the same names. Usage::

    python -m tokenformer.experiments.vision --out_dir runs/vision-bench --report benchmarks/results/vision_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from ..train.vision import held_out_count
from . import runner

TRAIN_SPLIT = 60000  # Fashion-MNIST's training split
GRID_VAL_FRACTION = 0.05  # the grid (and, by default, every arm) holds out 3,000 of them for validation
MAIN_ARMS = ("tokenformer", "linear")
GROWTH_ARMS = ("grown", "scratch")
PAIRS = ("main", "growth")
TARGET_ACCURACY, TARGET_SECONDS = 0.90, 15 * 60
PROGRAM = "python -m tokenformer.experiments.vision"


# -- options ------------------------------------------------------------------------------------


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"--seeds must be distinct non-negative integers, got {text!r}")
    return seeds


def parse_lrs(text: str) -> list[float]:
    try:
        lrs = [float(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lrs must be comma-separated learning rates, got {text!r}") from None
    if len(set(lrs)) != len(lrs) or min(lrs) <= 0:
        raise argparse.ArgumentTypeError(f"--lrs must be distinct learning rates > 0, got {text!r}")
    return lrs


def parse_grow_to(text: str) -> dict[str, int]:
    """``qkv_tokens=96,ffn_tokens=512`` -> ``{"qkv_tokens": 96, "ffn_tokens": 512}``."""
    try:
        sizes = {name.strip(): int(count) for name, count in (item.split("=") for item in text.split(","))}
    except ValueError:
        sizes = {}
    if not sizes or min(sizes.values()) < 1:
        raise argparse.ArgumentTypeError(
            f"--grow_to must be comma-separated KIND_tokens=COUNT with counts >= 1, e.g. "
            f"qkv_tokens=96,ffn_tokens=512; got {text!r}"
        )
    return sizes


def parse_pairs(text: str) -> list[str]:
    pairs = text.split(",")
    if not pairs or any(p not in PAIRS for p in pairs) or len(set(pairs)) != len(pairs):
        raise argparse.ArgumentTypeError(f"--pairs must be main, growth or main,growth; got {text!r}")
    return pairs


def parse_overrides(text: str) -> dict[str, Any]:
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError:
        overrides = None
    if not isinstance(overrides, dict):
        raise argparse.ArgumentTypeError(
            f"--model_overrides must be a JSON object of VisionConfig fields, e.g. '{{\"n_layers\": 6}}'; got {text!r}"
        )
    return overrides


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of epochs > 0, got {text!r}")
    return value


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows the defaults that are values (not an absent option or an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The options; each also answers to its former spelling with hyphens (``--batch-size``)."""
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0], formatter_class=_Help)

    def add(name: str, *aliases: str, **kwargs: Any) -> None:
        spellings = [f"--{name}", *(f"--{a}" for a in aliases)]
        hyphens = f"--{name.replace('_', '-')}"
        if hyphens not in spellings:
            spellings.append(hyphens)
        parser.add_argument(*spellings, dest=name, **kwargs)

    add("out_dir", "out", default="runs/vision-bench", help="run directories of the arms (each with result.json)")
    add("report", default=None, help="the Markdown report (default: OUT_DIR/report.md)")
    add("model", "preset", default="fmnist-0.3M", help="vision preset of every arm")
    add(
        "model_overrides",
        type=parse_overrides,
        default="{}",
        help="JSON object of VisionConfig fields to change on the preset for every arm, e.g. '{\"n_layers\": 6}'",
    )
    add("lrs", type=parse_lrs, default="1e-3,2e-3,4e-3", help="learning-rate grid, comma-separated")
    add("grid_epochs", type=positive, default=1.0, help="epochs of every grid run")
    add("epochs", type=positive, default=9.0, help="epochs of the main pair")
    add("grow_epochs", type=positive, default=3.0, help="epochs of the growth pair")
    add(
        "grow_to",
        type=parse_grow_to,
        default="qkv_tokens=96,proj_tokens=96,ffn_tokens=512",
        help="token counts the grown arm grows to halfway (and the scratch arm starts with)",
    )
    add("batch_size", type=int, default=128, help="images per optimizer step")
    add("warmup_steps", type=int, default=200, help="at most a tenth of the run")
    add("weight_decay", type=float, default=0.05, help="AdamW decoupled weight decay")
    add("label_smoothing", type=float, default=0.0, help="train against targets smoothed by this share")
    add("grad_clip", type=float, default=1.0, help="clip the global gradient norm to this value (0: off)")
    add(
        "final_val_fraction",
        type=float,
        default=GRID_VAL_FRACTION,
        help="share of the training split the main pair holds out for validation (the grid and the growth pair "
        f"hold out {GRID_VAL_FRACTION:g} always): below it, the main pair trains on the images the grid "
        "validated on",
    )
    add("crop_padding", type=int, default=0, help="augmentation: pad and crop randomly by this many pixels")
    add("hflip", action="store_true", help="augmentation: mirror half the training images")
    add(
        "erase_prob",
        type=float,
        default=0.0,
        help="random erasing: share of training images that get a noise rectangle",
    )
    add("ema_decay", type=float, default=0.0, help="evaluate and test a moving average of the weights (0: off)")
    add("workers", "jobs", type=positive_int, default=1, help="arms run at a time, each in its own process")
    add("threads", type=int, default=1, help="intra-op threads of each arm")
    add("device", default="cpu", help="device of every arm: cpu, cuda, cuda:1, ...")
    add("data_path", default=None, help="directory of the Fashion-MNIST IDX files (default: the system's)")
    add(
        "compile",
        action="store_true",
        help="train the main and growth arms through torch.compile (compile time counts in their wall-clock; "
        "the grid, which compares accuracy only, runs eagerly)",
    )
    add(
        "pairs", type=parse_pairs, default="main,growth", help="which pairs to run after the grid: main, growth or both"
    )
    add(
        "seeds",
        type=parse_seeds,
        default="0",
        help="comma-separated seeds: the main and growth pairs run once per seed (the grid, the first)",
    )
    return parser


def held_out(val_fraction: float) -> int:
    """Validation images the trainer holds out of the training split."""
    return held_out_count(TRAIN_SPLIT, val_fraction)


def steps_for_epochs(epochs: float, batch_size: int, val_fraction: float = GRID_VAL_FRACTION) -> int:
    """Optimizer steps of ``epochs`` passes over the training images left after the held-out ones."""
    return max(1, round(epochs * (TRAIN_SPLIT - held_out(val_fraction)) / batch_size))


def arm_options(
    arm: str,
    lr: float,
    epochs: float,
    args: argparse.Namespace,
    out_dir: str | Path,
    compiled: bool = False,
    seed: int = 0,
    val_fraction: float = GRID_VAL_FRACTION,
) -> dict[str, Any]:
    """The ``tokenformer train`` options of one arm."""
    from ..vision import VisionConfig

    steps = steps_for_epochs(epochs, args.batch_size, val_fraction)
    overrides = dict(args.model_overrides)
    if arm == "linear":
        matched = VisionConfig.from_preset(args.model, **overrides).parameter_matched_linear()
        overrides.update(projection="linear", ffn_tokens=matched.ffn_tokens)
    elif arm == "scratch":
        overrides.update(args.grow_to)
    return dict(
        task="vision",
        model=args.model,
        model_overrides=overrides,
        vision=dict(
            dataset="fashion-mnist",
            data_path=args.data_path,
            label_smoothing=args.label_smoothing,
            crop_padding=args.crop_padding,
            hflip=args.hflip,
            erase_prob=args.erase_prob,
        ),
        batch_size=args.batch_size,
        max_steps=steps,
        lr=lr,
        min_lr=lr / 10,
        warmup_steps=min(args.warmup_steps, steps // 10),
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        val_fraction=val_fraction,
        ema_decay=args.ema_decay,
        eval_interval=max(1, steps // 4),
        ckpt_interval=max(1, steps // 4),
        log_interval=20,
        keep_last=1,
        threads=args.threads,
        device=args.device,
        out_dir=str(out_dir),
        resume="auto",
        progress=False,
        seed=seed,
        compile=compiled,
    )


# -- one arm ------------------------------------------------------------------------------------


def run_arm(job: dict[str, Any]) -> dict[str, Any]:
    """One arm to its result (stored in its run directory; the stored one if it finished before)."""
    return runner.cached_run(job["options"]["out_dir"], lambda: train_arm(job["arm"], job["options"], job["grow_to"]))


def train_arm(arm: str, options: dict[str, Any], grow_to: dict[str, int]) -> dict[str, Any]:
    """Train one arm (growing halfway for ``grown``), then test it."""
    import torch

    from ..train import TrainConfig, Trainer, read_metrics

    torch.set_flush_denormal(True)
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
    raw = trainer.task.evaluate_test(trainer.model).accuracy if trainer.ema is not None else None
    val = trainer.state.val_history[-1]
    rates = [
        row["tokens_per_s"] for row in read_metrics(trainer.run_dir / "metrics.jsonl") if row.get("kind") == "train"
    ]
    return dict(
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


# -- the experiment -----------------------------------------------------------------------------


def check(args: argparse.Namespace) -> None:
    """Every arm's training options, checked before the first arm starts (ValueError names the bad one)."""
    from ..train import TrainConfig

    for arm in (*MAIN_ARMS, *GROWTH_ARMS):
        for lr in args.lrs:
            options = arm_options(
                arm, lr, args.epochs, args, "check", args.compile, args.seeds[0], args.final_val_fraction
            )
            TrainConfig.from_dict(options)


def grid_best(grid: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Each arm's rate of the grid with the best validation accuracy."""
    return {
        arm: runner.best_lr({r["lr"]: {r["seed"]: r["val_accuracy"]} for r in records}, lower_is_better=False)
        for arm, records in grid.items()
    }


def run(args: argparse.Namespace, command: str) -> str:
    """Run (or continue) the grid and the pairs that ``args`` ask for; write and return the report."""
    out = Path(args.out_dir)
    seeds = args.seeds

    def job(
        arm: str, lr: float, epochs: float, tag: str, compiled: bool, seed: int, val_fraction: float
    ) -> dict[str, Any]:
        tag = tag if seed == 0 else f"{tag}-seed{seed}"  # seed 0 keeps the names of single-seed runs
        options = arm_options(arm, lr, epochs, args, out / tag, compiled, seed, val_fraction)
        return {"arm": arm, "options": options, "grow_to": args.grow_to}

    check(args)
    out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    # Every arm is a new process that imports the tree as it is then: name the commit at launch.
    launched_at = runner.source_version()
    if launched_at.endswith("-dirty"):
        print(
            f"note: uncommitted changes in the tree ({launched_at}); the report cannot name the code that ran",
            file=sys.stderr,
        )

    def arms(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The results of the arms, training those not finished before: each in a process of its
        own, also with one worker (timings must not depend on what an earlier arm compiled or left
        behind)."""
        todo = [job for job in jobs if runner.read_result(job["options"]["out_dir"]) is None]
        runner.run_jobs(run_arm, todo, args.workers, isolate=True)
        return [runner.read_result(job["options"]["out_dir"]) for job in jobs]

    grid: dict[str, list[dict[str, Any]]] = {arm: [] for arm in MAIN_ARMS}
    best = {arm: args.lrs[0] for arm in MAIN_ARMS}
    if len(args.lrs) > 1:
        grid_jobs = [
            job(arm, lr, args.grid_epochs, f"grid-{arm}-{runner.lr_name(lr)}", False, seeds[0], GRID_VAL_FRACTION)
            for lr in args.lrs
            for arm in MAIN_ARMS
        ]
        for record in arms(grid_jobs):
            grid[record["arm"]].append(record)
        best = grid_best(grid)
    pair_jobs = []
    if "main" in args.pairs:
        pair_jobs += [
            job(arm, best[arm], args.epochs, arm, args.compile, seed, args.final_val_fraction)
            for seed in seeds
            for arm in MAIN_ARMS
        ]
    if "growth" in args.pairs:
        pair_jobs += [
            job(arm, best["tokenformer"], args.grow_epochs, arm, args.compile, seed, GRID_VAL_FRACTION)
            for seed in seeds
            for arm in GROWTH_ARMS
        ]
    records = arms(pair_jobs)
    main_pair = [r for r in records if r["arm"] in MAIN_ARMS]
    growth_pair = [r for r in records if r["arm"] in GROWTH_ARMS]
    where = "CPU" if args.device == "cpu" else args.device
    return runner.write_report(
        args.report or out / "report.md",
        f"Fashion-MNIST on {where}: TokenFormer-ViT vs the linear ViT, grown vs scratch",
        render(args, started, grid, main_pair, growth_pair),
        command,
        args.device,
        launched_at,
    )


def main(argv: list[str] | None = None) -> None:
    import torch

    torch.set_flush_denormal(True)
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        check(args)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"{PROGRAM}: {error}") from None
    print(run(args, runner.command_line(PROGRAM, argv)))


# -- the report ---------------------------------------------------------------------------------


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


def render(
    args: argparse.Namespace,
    started: str,
    grid: dict[str, list[dict[str, Any]]],
    main_pair: list[dict[str, Any]],
    growth_pair: list[dict[str, Any]],
) -> str:
    lines = [
        f"Started {started}. Each arm ran in its own process with {args.threads} intra-op thread(s) "
        f"(`threads: {args.threads}`), "
        f"{args.workers} arm(s) at a time; the time each arm started and the 1-minute load average of the machine "
        "before/after it are in the tables.",
        "",
        f"Data: {data_split(args)}, test on the 10,000 test images. Recipe for every arm: {recipe(args)}."
        + (
            f" Model fields changed on `{args.model}` for every arm: `{json.dumps(args.model_overrides)}`."
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
        best = grid_best(grid)
        lines += [
            runner.markdown_table(
                ["arm", *(f"lr {lr:g}" for lr in rates), "best lr"],
                [
                    [
                        arm,
                        *(f"{r['val_accuracy']:.4f}" for r in records),
                        f"{best[arm]:g}" + (" *" if runner.at_edge(best[arm], rates) else ""),
                    ]
                    for arm, records in grid.items()
                ],
            ),
            "",
            "Each arm trains the main pair at its best rate (* at an edge of the grid: not bracketed by it).",
            "",
        ]
        lines += [f"## Same epochs ({args.epochs:g}), each arm at its best grid rate", ""]
    else:
        lines += [
            f"No learning-rate grid: every arm uses lr {','.join(f'{lr:g}' for lr in args.lrs)}, tuned for neither.",
            "",
            f"## Same epochs ({args.epochs:g}), same learning rate",
            "",
        ]
    if main_pair:
        lines += main_section(main_pair, args.threads)
    if growth_pair:
        grow_to = ",".join(f"{kind}={count}" for kind, count in args.grow_to.items())
        lines += [
            f"## Grown vs scratch, same steps ({args.grow_epochs:g} epochs), the tokenformer arm's rate",
            "",
            f"`grown`: {args.model} trained half the steps, then grown to {grow_to} (function-preserving, "
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


def main_section(pair: list[dict[str, Any]], threads: int) -> list[str]:
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


def seed_summary(records: list[dict[str, Any]], arm: str, baseline: str) -> list[str]:
    """Mean test accuracy of both arms over seeds, with standard errors, and their paired difference."""
    by_seed = {
        name: {r.get("seed", 0): r["test_accuracy"] for r in records if r["arm"] == name} for name in (arm, baseline)
    }
    diff = runner.paired(by_seed[arm], by_seed[baseline])
    if diff is None or len(by_seed[arm]) < 2:
        return []
    seeds = sorted(set(by_seed[arm]) & set(by_seed[baseline]))
    means = ", ".join(
        f"{name} {100 * statistics.mean(values.values()):.2f}% "
        f"(s.e. {100 * runner.standard_error(list(values.values())):.2f})"
        for name, values in by_seed.items()
    )
    return [
        f"Over {len(seeds)} seeds ({', '.join(map(str, seeds))}), mean test accuracy: {means}. "
        f"{arm} − {baseline}, paired by seed: {', '.join(f'{100 * d:+.2f}' for d in diff['diffs'])}; "
        f"mean {100 * diff['mean']:+.2f} points (s.e. {100 * diff['se']:.2f}).",
        "",
    ]


def table(records: list[dict[str, Any]]) -> str:
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
    text = runner.markdown_table(headers, rows)
    raw = [
        f"{r['arm']} (seed {r.get('seed', 0)}) {r['test_accuracy_raw']:.4f}"
        for r in records
        if r.get("test_accuracy_raw") is not None
    ]
    return text + ("\n\nTest accuracy of the live (not averaged) weights: " + ", ".join(raw) + "." if raw else "")


if __name__ == "__main__":
    # The arms' worker processes import this module by its name; so does the command.
    from tokenformer.experiments.vision import main as run_main

    run_main()
