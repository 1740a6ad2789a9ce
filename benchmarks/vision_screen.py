"""Screen changes to the Fashion-MNIST recipe: many TokenFormer-ViT runs at once, a table of means.

The base recipe is the vision benchmark's (``vision_fmnist.py``: the same flags, the same
defaults, the same training through the library's Trainer); a variants file names what each
variant changes on it. ``--workers`` processes share the runs: worker ``i`` of ``K`` takes every
``K``-th run, every variant's first seed before any second seed, and starts no run that its
longest so far would carry past ``--deadline`` seconds. On a GPU the runs of a model this small
are bound by the CPU's launches, so a dozen processes share one GPU well.

A variants file is a JSON list of objects: ``name`` (required, one ``base``: the unchanged recipe,
against which the others are paired by seed), ``lr`` (default: the first of ``--lrs``),
``epochs`` (default ``--epochs``), ``model`` (model fields merged into ``--model-overrides``),
``options`` (benchmark flags by their names, e.g. ``batch_size``, ``weight_decay``; or
``TrainConfig`` fields, e.g. ``min_lr``; ``val_fraction`` holds out that share for validation and
trains on the rest, epochs counted in the images trained on). Every run's options are checked
before the first starts.

Results: ``OUT/results.jsonl``, a line per finished run (a rerun skips them; an interrupted run
resumes from its checkpoint), and ``OUT/summary.md``: per variant the mean test accuracy, each
seed's, and the difference to ``base`` paired by seed. Usage::

    python benchmarks/vision_screen.py --variants benchmarks/vision_screen_variants.json --seeds 10,11 \\
        --workers 15 --device cuda --out runs/screen --weight-decay 0.1 --label-smoothing 0.1 \\
        --ema-decay 0.999 --epochs 14 \\
        --model-overrides '{"patch_shift": 3, "drop_path": 0.1, "lsa": true, "patch_bias": true}'
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import markdown_table
from vision_fmnist import GRID_VAL_FRACTION, arm_options, run_arm
from vision_fmnist import build_parser as benchmark_parser

from tokenformer import io
from tokenformer.train.metrics import standard_error

VARIANT_KEYS = ("name", "lr", "epochs", "model", "options")
RESULTS, SUMMARY = "results.jsonl", "summary.md"


def build_parser() -> argparse.ArgumentParser:
    parser = benchmark_parser()
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--variants", required=True, help="JSON file: a list of variants (see the module's help)")
    parser.add_argument("--workers", type=int, default=1, help="runs at a time, each in its own process")
    parser.add_argument("--device", default="cpu", help="device of every run: cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds from the start after which no run begins that would not end in time",
    )
    parser.add_argument(
        "--data-path", default=None, help="directory of the Fashion-MNIST IDX files (default: the system's)"
    )
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--until", type=float, help=argparse.SUPPRESS)
    return parser


def load_variants(path: str | Path) -> list[dict]:
    variants = json.loads(Path(path).read_text())
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        raise ValueError(f"{path}: a variants file is a JSON list of objects")
    names = [v.get("name") for v in variants]
    for variant in variants:
        unknown = sorted(set(variant) - set(VARIANT_KEYS))
        if unknown or not isinstance(variant.get("name"), str):
            raise ValueError(
                f"{path}: variant {variant.get('name')!r} has keys {unknown or 'but no name'}; "
                f"allowed: {', '.join(VARIANT_KEYS)} (name required)"
            )
    if len(set(names)) != len(names) or "base" not in names:
        raise ValueError(
            f"{path}: variant names must be distinct and include 'base' (the unchanged recipe); got {names}"
        )
    return variants


def run_options(variant: dict, seed: int, args: argparse.Namespace, out: Path) -> dict:
    """The Trainer options of one run: the benchmark's tokenformer arm with the variant's changes."""
    changes = dict(variant.get("options", {}))
    val_fraction = changes.pop("val_fraction", GRID_VAL_FRACTION)
    flags = {
        key: changes.pop(key) for key in list(changes) if key in vars(args) and key not in ("device", "seeds", "out")
    }
    run_args = argparse.Namespace(
        **{**vars(args), **flags, "model_overrides": {**args.model_overrides, **variant.get("model", {})}}
    )
    lr = variant.get("lr", float(args.lrs.split(",")[0]))
    options = arm_options(
        "tokenformer",
        lr,
        variant.get("epochs", args.epochs),
        run_args,
        {},
        out / f"{variant['name']}-seed{seed}",
        run_args.compile,
        seed,
        val_fraction,
    )
    return {**options, "device": args.device, "data_path": args.data_path, **changes}


def jobs(variants: list[dict], args: argparse.Namespace, out: Path) -> list[tuple[dict, int, dict]]:
    return [(variant, seed, run_options(variant, seed, args, out)) for seed in args.seeds for variant in variants]


def finished(out: Path) -> list[dict]:
    path = out / RESULTS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def work(index: int, args: argparse.Namespace, out: Path) -> None:
    done = {(r["variant"], r["seed"]) for r in finished(out)}
    longest = 0.0
    for variant, seed, options in jobs(load_variants(args.variants), args, out)[index :: args.workers]:
        if (variant["name"], seed) in done:
            continue
        if args.until is not None and time.time() + 1.05 * longest > args.until:
            print(
                f"vision_screen: worker {index} skips {variant['name']} seed {seed}: it would end after the deadline",
                flush=True,
            )
            continue
        start = time.time()
        result_path = out / f"{variant['name']}-seed{seed}.json"
        run_arm("tokenformer", options, {}, result_path)
        longest = max(longest, time.time() - start)
        record = {
            "variant": variant["name"],
            "epochs": variant.get("epochs", args.epochs),
            **json.loads(result_path.read_text()),
        }
        with open(out / RESULTS, "a") as results:  # one write per line: whole lines only, whichever worker ends first
            results.write(json.dumps(record) + "\n")


def summary(records: list[dict], order: list[str]) -> str:
    runs: dict[str, dict[int, dict]] = {}
    for record in records:
        runs.setdefault(record["variant"], {})[record["seed"]] = record
    base = runs.get("base", {})
    rows = []
    for name in [n for n in order if n in runs]:
        seeds = sorted(runs[name])
        tests = [runs[name][s]["test_accuracy"] for s in seeds]
        paired = [100 * (runs[name][s]["test_accuracy"] - base[s]["test_accuracy"]) for s in seeds if s in base]
        diff = ""
        if name != "base" and paired:
            diff = (
                f"{statistics.mean(paired):+.2f}"
                + (f" (s.e. {standard_error(paired):.2f})" if len(paired) > 1 else "")
                + f", {len(paired)} seed(s)"
            )
        first = runs[name][seeds[0]]
        rows.append(
            [
                name,
                f"{first['parameters']:,}",
                first["steps"],
                ", ".join(map(str, seeds)),
                f"{100 * statistics.mean(tests):.2f}",
                " / ".join(f"{100 * t:.2f}" for t in tests),
                diff,
                f"{100 * statistics.mean(runs[name][s]['val_accuracy'] for s in seeds):.2f}",
                f"{statistics.mean(runs[name][s]['wall_s'] for s in seeds):.0f}",
            ]
        )
    headers = [
        "variant",
        "parameters",
        "steps",
        "seeds",
        "mean test acc (%)",
        "per seed",
        "paired vs base (points)",
        "mean val acc (%)",
        "mean wall-clock (s)",
    ]
    return markdown_table(headers, rows) + "\n"


def main() -> None:
    args = build_parser().parse_args()
    out = Path(args.out)
    if args.worker is not None:
        work(args.worker, args, out)
        return
    try:
        from tokenformer.train import TrainConfig

        variants = load_variants(args.variants)
        for _, _, options in jobs(variants, args, out):
            TrainConfig.from_dict(options)
    except (OSError, TypeError, ValueError) as error:
        raise SystemExit(f"vision_screen.py: {error}") from None
    if args.workers < 1:
        raise SystemExit(f"vision_screen.py: --workers must be a positive integer, got {args.workers}")
    out.mkdir(parents=True, exist_ok=True)
    until = [] if args.deadline is None else ["--until", str(time.time() + args.deadline)]
    workers = [
        subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--worker", str(i), *until])
        for i in range(args.workers)
    ]
    failed = [i for i, worker in enumerate(workers) if worker.wait() != 0]
    text = summary(finished(out), [v["name"] for v in variants])
    io.atomic_write_text(out / SUMMARY, text)
    print(text)
    if failed:
        raise SystemExit(
            f"vision_screen.py: worker(s) {failed} failed; their finished runs are in {out / RESULTS}, "
            "a rerun does the rest"
        )


if __name__ == "__main__":
    main()
