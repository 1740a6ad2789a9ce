"""Recipe studies: variants of one training recipe, each over a learning-rate grid and seeds,
compared with a baseline paired by seed.

A study plan (``configs/studies/*.yaml``) holds its own fields and a ``train:`` section that *is*
a :class:`~tokenformer.train.TrainConfig` (the shared recipe). Each variant changes model fields
(``model_overrides``, merged into the recipe's) and training options (``train``); with
``matched_linear`` it is the Transformer (``projection: linear``) parameter-matched to the
recipe's TokenFormer shape: ``true`` (or ``mlp``) keeps d_model and puts the difference into
the MLP, ``standard`` takes the usual shape (MLP 4 x d_model, d_model and heads chosen to match;
:meth:`~tokenformer.config.BlockConfig.standard_linear`). The variant's own ``model_overrides``
apply on top of the matched shape (its ``out_scale``, or another ``n_heads``). Every (variant,
learning rate, seed) is a run of its own in ``<out_dir>/runs/<variant>/lr-<lr>/seed-<seed>``,
trained with that seed (model init and batches), on the same data, tokens and validation
windows as every other run.

Each run stores its final validation metrics and, for a task with a test split (an image
classifier), its test metrics (``test_metrics.json`` and the confusion matrix in its run
directory too). The plan's ``metric`` decides: for each variant the report takes the learning
rate with the best mean of it over the seeds (lowest for a loss, highest for an accuracy; and
says when the rate lies at an edge of the grid), then compares the variant with the baseline at
their own best rates: the difference of the metric, paired by seed, with its standard error
across seeds. Outputs in ``out_dir``: ``results.json``, ``report.md`` and ``curves.png``. A study
started again skips finished runs and resumes unfinished ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import io
from ..config import shape_changes
from ..families import family_of
from ..flops import count_parameters
from ..train import TrainConfig
from ..train.config import VISION_FIELDS
from ..validation import dataclass_from_dict, invalid, is_number
from . import runner

PLOT = "curves.png"
# What a study can compare runs on, and whether lower is better.
METRICS = {"val_loss": True, "val_accuracy": False, "test_loss": True, "test_accuracy": False}
METRIC_NAMES = {
    "val_loss": "final validation loss",
    "val_accuracy": "final validation accuracy",
    "test_loss": "test loss",
    "test_accuracy": "test accuracy",
}


def _plan_error(name: str, value: Any, allowed: str) -> ValueError:
    return invalid("study field", name, value, allowed)


@dataclass
class Variant:
    """One recipe: what it changes on the study's ``train`` section.

    Args:
        name: Its name in directories and tables (letters, digits, ``-``, ``_``, ``.``).
        description: What it changes, in words (the report's second column).
        model_overrides: Model config fields merged into ``train.model_overrides``.
        train: TrainConfig options changed for this variant (not ``lr``, ``seed`` or ``out_dir``);
            a group of options (``vision``) is merged into the recipe's, and its options may
            also be given ungrouped (``crop_padding: 2``).
        matched_linear: The Transformer parameter-matched to the recipe's TokenFormer shape:
            ``true`` or ``"mlp"`` (same d_model, the difference in the MLP), ``"standard"`` (the
            usual shape, MLP 4 x d_model), ``false`` (no matching).
        lr_grid: This variant's learning rates (default: the study's).
        min_lr_ratio: This variant's floor of the cosine schedule (default: the study's).
    """

    name: str
    description: str = ""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    matched_linear: bool | str = False
    lr_grid: list[float] | None = None
    min_lr_ratio: float | None = None


@dataclass
class StudyPlan:
    """A recipe study; every field is validated on construction, every run's options too.

    Args:
        out_dir: Where the runs, results, report and plot go.
        variants: The recipes compared (at least two).
        baseline: The variant every other is compared with, paired by seed.
        lr_grid: Peak learning rates every variant trains at (unless it has its own grid).
        seeds: Seeds every (variant, learning rate) trains with.
        min_lr_ratio: The cosine schedule's floor as a fraction of the peak rate.
        metric: What chooses each variant's rate and what the variants are compared on:
            ``val_loss`` (final validation loss), ``val_accuracy``, ``test_loss`` or
            ``test_accuracy`` (the test split after training; tasks with one: image
            classifiers). Lower is better for a loss, higher for an accuracy.
        train: The shared recipe: options of ``tokenformer train`` (``lr``, ``min_lr``, ``seed``
            and ``out_dir`` are set per run).
        compare: Further pairs ``[variant, other]`` compared like a variant with the baseline
            (each at its best rate, paired by seed).
    """

    out_dir: str
    variants: list[Variant]
    baseline: str
    lr_grid: list[float]
    seeds: list[int] = field(default_factory=lambda: [1337])
    min_lr_ratio: float = 0.1
    metric: str = "val_loss"
    train: TrainConfig = field(default_factory=TrainConfig)
    compare: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        if not isinstance(self.variants, list) or len(self.variants) < 2:
            raise _plan_error("variants", self.variants, "a list of at least two variants")
        self.variants = [v if isinstance(v, Variant) else _variant(i, v) for i, v in enumerate(self.variants)]
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise _plan_error("variants", names, "distinct names")
        if self.baseline not in names:
            raise _plan_error("baseline", self.baseline, f"one of the variants: {', '.join(names)}")
        runner.check_lr_grid("lr_grid", self.lr_grid, "study field")
        runner.check_seeds("seeds", self.seeds, "study field")
        _check_ratio("min_lr_ratio", self.min_lr_ratio)
        if self.metric not in METRICS:
            raise _plan_error("metric", self.metric, ", ".join(METRICS))
        pairs_ok = isinstance(self.compare, list) and all(
            isinstance(p, list) and len(p) == 2 and p[0] != p[1] and all(n in names for n in p) for p in self.compare
        )
        if not pairs_ok:
            allowed = f"a list of pairs [a, b] of distinct variants: {', '.join(names)}"
            raise _plan_error("compare", self.compare, allowed)
        for variant in self.variants:  # every run's options, checked before hours of training
            self.run_config(variant, self.grid(variant)[0], self.seeds[0])

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    def grid(self, variant: Variant) -> list[float]:
        return variant.lr_grid or self.lr_grid

    def model_overrides(self, variant: Variant) -> dict[str, Any]:
        recipe = self.train.model_overrides
        if variant.matched_linear:
            # Matched to the recipe's TokenFormer; the variant's own fields apply on top (out_scale, n_heads).
            tokenformer = dataclasses.replace(self.train, resume=None).model_config()
            if variant.matched_linear == "standard":
                matched = tokenformer.standard_linear()
            else:
                matched = tokenformer.parameter_matched_linear()
            recipe = {**recipe, **shape_changes(matched, tokenformer)}
        return {**recipe, **variant.model_overrides}

    def run_dir(self, variant: Variant, lr: float, seed: int) -> Path:
        return Path(self.out_dir) / "runs" / variant.name / runner.lr_name(lr) / runner.seed_name(seed)

    def min_lr_ratio_of(self, variant: Variant) -> float:
        return self.min_lr_ratio if variant.min_lr_ratio is None else variant.min_lr_ratio

    def run_config(self, variant: Variant, lr: float, seed: int) -> TrainConfig:
        recipe, changes = self.train.to_dict(), dict(variant.train)
        ungrouped = {name: changes.pop(name) for name in VISION_FIELDS if name in changes}  # crop_padding: 2
        if ungrouped:
            changes["vision"] = {**ungrouped, **changes.get("vision", {})}
        changes = {  # a group of options (vision) changes only the options it names
            name: {**recipe[name], **value} if isinstance(recipe.get(name), dict) else value
            for name, value in changes.items()
        }
        options = {
            **recipe,
            **changes,
            "model_overrides": self.model_overrides(variant),
            "lr": lr,
            "min_lr": lr * self.min_lr_ratio_of(variant),
            "seed": seed,
            "out_dir": str(self.run_dir(variant, lr, seed)),
            "resume": "auto",
            "progress": False,
            "keep_last": 1,
        }
        return TrainConfig.from_dict(options)

    def jobs(self) -> list[dict[str, Any]]:
        """Every run, seeds outermost: each variant's first seed over its grid comes first."""
        return [
            {
                "variant": v.name,
                "lr": lr,
                "seed": seed,
                "metric": self.metric,
                "config": self.run_config(v, lr, seed).to_dict(),
            }
            for seed in self.seeds
            for v in self.variants
            for lr in self.grid(v)
        ]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudyPlan:
        missing = [name for name in ("out_dir", "variants", "baseline", "lr_grid") if name not in data]
        if missing:
            raise ValueError(f"study plan is missing required field(s) {missing}")
        return dataclass_from_dict(cls, data, "study field")


def _check_ratio(name: str, ratio: Any) -> None:
    if not (is_number(ratio) and 0 <= ratio <= 1):
        raise _plan_error(name, ratio, "a number in [0, 1]")


def _variant(index: int, data: Any) -> Variant:
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise _plan_error(f"variants[{index}]", data, "a mapping with at least a name")
    variant = dataclass_from_dict(Variant, data, f"variants[{index}] field")
    if not variant.name or not all(c.isalnum() or c in "-_." for c in variant.name):
        raise _plan_error(f"variants[{index}].name", variant.name, "letters, digits, '-', '_' and '.'")
    forbidden = sorted({"lr", "min_lr", "seed", "out_dir", "resume", "model_overrides"} & set(variant.train))
    if forbidden:
        raise _plan_error(f"variants[{index}].train", variant.train, f"TrainConfig options other than {forbidden}")
    if not (isinstance(variant.matched_linear, bool) or variant.matched_linear in ("mlp", "standard")):
        raise _plan_error(f"variants[{index}].matched_linear", variant.matched_linear, "false, true, mlp or standard")
    if variant.lr_grid is not None:
        runner.check_lr_grid(f"variants[{index}].lr_grid", variant.lr_grid, "study field")
    if variant.min_lr_ratio is not None:
        _check_ratio(f"variants[{index}].min_lr_ratio", variant.min_lr_ratio)
    return variant


def load_plan(path: str | Path, out_dir: str | None = None) -> StudyPlan:
    """Read and validate a YAML study plan; ``out_dir`` overrides the plan's."""
    return StudyPlan.from_dict(runner.read_plan(path, out_dir, "study plan"))


# -- running ------------------------------------------------------------------------------------


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (variant, learning rate, seed) to the end, resuming, and test it where the task
    has a test split; its stored result if it finished before."""
    import torch

    from ..train import Trainer

    torch.set_flush_denormal(True)
    config = TrainConfig.from_dict(job["config"])

    def train() -> dict[str, Any]:
        trainer = Trainer(config)
        try:
            trainer.fit()
        finally:
            trainer.close()
        final = trainer.state.val_history[-1]
        test = trainer.task.test(trainer.evaluated_model, trainer.run_dir, write=True) or {}
        model_config = trainer.model.config
        result = {
            "variant": job["variant"],
            "lr": job["lr"],
            "seed": job["seed"],
            "final_val_loss": final["val_loss"],
            "final_val_loss_se": final.get("val_loss_se"),
            "val_batch_losses": final.get("val_batch_losses"),
            **({"final_val_accuracy": final["val_accuracy"]} if "val_accuracy" in final else {}),
            **{name: value for name, value in test.items() if name.startswith("test_") and is_number(value)},
            "curve": [
                {k: p[k] for k in ("step", "tokens", "flops", "val_loss", "val_accuracy") if k in p}
                for p in trainer.state.val_history
            ],
            "tokens": trainer.state.tokens,
            "flops": trainer.state.flops,
            "wall_time": trainer.state.wall_time,
            "parameters": family_of(model_config).count_parameters(model_config),
            "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": runner.source_version(),
        }
        if hasattr(model_config, "vocab_size"):  # a model with a word embedding
            result["non_embedding_parameters"] = count_parameters(model_config, non_embedding=True)
        metric_value(result, job["metric"])  # a metric the task does not report fails here, before it is stored
        return result

    return runner.cached_run(config.out_dir, train)


def metric_key(metric: str) -> str:
    """Where a run's result holds ``metric``: the final validation metrics are ``final_val_*``."""
    return f"final_{metric}" if metric.startswith("val_") else metric


def metric_value(run: dict[str, Any], metric: str) -> float:
    """A run's value of the study's metric; an error naming the metrics the run has if it lacks it."""
    key = metric_key(metric)
    if key not in run:
        have = [m for m in METRICS if metric_key(m) in run]
        raise _plan_error(
            "metric",
            metric,
            f"a metric that run {run['variant']} lr {run['lr']:g} seed {run['seed']} reports: {', '.join(have)} "
            "(test metrics need a task with a test split, such as task: vision)",
        )
    return run[key]


def run_study(plan: StudyPlan, command: str = "", workers: int = 1) -> dict[str, Any]:
    """Run (or continue) every run of the study, ``workers`` at a time, then write the outputs."""
    out = Path(plan.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    io.atomic_write_text(out / "plan.yaml", yaml.safe_dump(plan.to_dict(), sort_keys=False))
    jobs = plan.jobs()
    todo = [job for job in jobs if runner.read_result(job["config"]["out_dir"]) is None]
    print(f"study {out}: {len(jobs) - len(todo)} of {len(jobs)} runs finished, {len(todo)} to go", flush=True)
    if workers > 1 and len(todo) > 1:
        runner.prepare_data(TrainConfig.from_dict(todo[0]["config"]))
    runner.run_jobs(run_job, todo, workers)
    runs = [runner.read_result(job["config"]["out_dir"]) for job in jobs]
    results = {
        "command": command,
        "commit": runner.source_version(),
        "machine": runner.machine(plan.train.threads, plan.train.device, plan.train.precision),
        "plan": plan.to_dict(),
        "runs": runs,
        "analysis": analyse(plan, runs),
    }
    io.atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    plot_curves(results, out / PLOT)
    io.atomic_write_text(out / "report.md", report(results))
    return results


# -- analysis -----------------------------------------------------------------------------------


def analyse(plan: StudyPlan, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: its best rate on the plan's metric, the metric per seed there, and paired
    differences with the baseline, all recomputed from the stored runs."""
    lower_is_better = METRICS[plan.metric]
    values: dict[str, dict[float, dict[int, float]]] = {}
    for run in runs:
        values.setdefault(run["variant"], {}).setdefault(run["lr"], {})[run["seed"]] = metric_value(run, plan.metric)
    variants = {}
    for variant in plan.variants:
        by_lr = values.get(variant.name)
        if not by_lr:
            continue
        best = runner.best_lr(by_lr, lower_is_better)
        per_seed = by_lr[best]
        at_best = [r for r in runs if r["variant"] == variant.name and r["lr"] == best]
        variants[variant.name] = {
            "best_lr": best,
            "best_lr_at_edge": runner.at_edge(best, plan.grid(variant)),
            "per_seed": {str(seed): value for seed, value in sorted(per_seed.items())},
            "mean": statistics.fmean(per_seed.values()),
            "se": runner.standard_error(list(per_seed.values())),
            "grid": {runner.lr_name(lr): statistics.fmean(seeds.values()) for lr, seeds in sorted(by_lr.items())},
            "metrics": {
                m: statistics.fmean(r[metric_key(m)] for r in at_best)
                for m in METRICS
                if all(metric_key(m) in r for r in at_best)
            },
        }
    base = variants.get(plan.baseline)
    for name, entry in variants.items():
        if base is not None and name != plan.baseline:
            entry["vs_baseline"] = runner.paired(
                {int(s): v for s, v in entry["per_seed"].items()},
                {int(s): v for s, v in base["per_seed"].items()},
            )
    comparisons = [
        {"variant": a, "other": b, **diff}
        for a, b in plan.compare
        if a in variants
        and b in variants
        and (
            diff := runner.paired(
                {int(s): v for s, v in variants[a]["per_seed"].items()},
                {int(s): v for s, v in variants[b]["per_seed"].items()},
            )
        )
        is not None
    ]
    return {"baseline": plan.baseline, "metric": plan.metric, "variants": variants, "comparisons": comparisons}


# -- outputs ------------------------------------------------------------------------------------


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """Validation loss against training tokens, each variant at its best rate (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, entry in results["analysis"]["variants"].items():
        curves = [r["curve"] for r in results["runs"] if r["variant"] == name and r["lr"] == entry["best_lr"]]
        steps = sorted(set.intersection(*({p["step"] for p in c} for c in curves)))
        mean = [statistics.fmean(next(p["val_loss"] for p in c if p["step"] == s) for c in curves) for s in steps]
        tokens = [next(p["tokens"] for p in curves[0] if p["step"] == s) for s in steps]
        ax.plot(tokens, mean, "-", label=f"{name} (lr {entry['best_lr']:g})")
    ax.set_xlabel("training tokens (images for an image classifier)")
    ax.set_ylabel("validation loss (nats per token or image), mean over seeds")
    ax.set_ylim(top=min(ax.get_ylim()[1], 7.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    io.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


def recipe(plan: StudyPlan) -> str:
    """The shared recipe in words: the options that differ from ``tokenformer train``'s defaults."""
    defaults, options = TrainConfig().to_dict(), plan.train.to_dict()
    per_run = ("lr", "min_lr", "seed", "out_dir", "resume", "progress", "keep_last")
    changed = []
    for name, value in options.items():
        if name in per_run:
            continue
        if isinstance(value, dict) and isinstance(defaults[name], dict) and name != "model_overrides":
            value = {k: v for k, v in value.items() if v != defaults[name].get(k)}  # a group: what it changes
            if value:
                changed.append((name, value))
        elif value != defaults[name]:
            changed.append((name, value))
    text = [f"`{name}: {value if isinstance(value, str) else json.dumps(value)}`" for name, value in changed]
    return ", ".join(text) or "the defaults"


FAMILY_NAMES = {"pattention": "TokenFormer", "linear": "Transformer"}


def variants_per_family(plan: StudyPlan) -> dict[str, int]:
    """How many variants each model family (TokenFormer, Transformer) has in the plan: a fair
    comparison gives the baseline's family the same search as the model's."""
    counts: dict[str, int] = {}
    for variant in plan.variants:
        config = plan.run_config(variant, plan.grid(variant)[0], plan.seeds[0]).model_config()
        family = FAMILY_NAMES.get(getattr(config, "projection", ""), type(config).__name__)
        counts[family] = counts.get(family, 0) + 1
    return counts


def _commits(results: dict[str, Any]) -> str:
    """Which commits the runs trained at, and the report's own."""
    runs = results["runs"]
    trained = sorted({r["commit"] for r in runs if r.get("commit")})
    unknown = sum(1 for r in runs if not r.get("commit"))
    text = f"Runs trained at commit {', '.join(trained)}" if trained else "Runs trained at unrecorded commits"
    if trained and unknown:
        text += f" ({unknown} of {len(runs)} runs, older, did not record theirs)"
    return text + f"; report written at commit {results.get('commit', 'unrecorded')}."


def _size_table(results: dict[str, Any]) -> list[str]:
    """Each variant's parameters and training FLOPs per token (per image for vision) at its best rate."""
    rows = []
    for variant, entry in results["analysis"]["variants"].items():
        runs = [r for r in results["runs"] if r["variant"] == variant and r["lr"] == entry["best_lr"]]
        if not runs:
            continue
        run = runs[0]
        parameters, non_embedding = run.get("parameters"), run.get("non_embedding_parameters")
        per_token = run["flops"] / run["tokens"] if run.get("flops") and run.get("tokens") else None
        if parameters is None and per_token is None:
            continue
        rows.append(
            [
                f"`{variant}`",
                f"{parameters:,}" if parameters is not None else "—",
                f"{non_embedding:,}" if non_embedding is not None else "—",
                f"{per_token / 1e6:.2f}M" if per_token else "—",
            ]
        )
    if not rows:
        return []
    item = "image" if results["plan"].get("train", {}).get("task") == "vision" else "token"
    headers = ["variant", "parameters", "non-embedding", f"training FLOPs per {item}"]
    return [
        "## Size and compute",
        "",
        "At each variant's best rate: training FLOPs (`tokenformer.flops`, 3 x the forward matmuls) over the "
        f"{item}s trained on.",
        "",
        runner.markdown_table(headers, rows),
        "",
    ]


def report(results: dict[str, Any]) -> str:
    plan = StudyPlan.from_dict(results["plan"])
    analysis = results["analysis"]
    m = results["machine"]
    base = plan.baseline
    metric = analysis.get("metric", "val_loss")
    name = METRIC_NAMES[metric]
    lines = [
        "# Recipe study",
        "",
        f"Command: `{results['command']}`",
        "",
        _commits(results),
        "",
        f"Machine: {m['processor']}, {m['cpu_count']} CPUs ({m['platform']}), torch {m['torch']}, "
        f"{m['threads']} thread(s) per run, device {m['device']}, {m['precision']}.",
        "",
        f"Recipe shared by every run (the `tokenformer train` options not at their defaults): {recipe(plan)}; "
        f"each run's peak rate from the grid, cosine to {plan.min_lr_ratio:g} x it unless a variant says otherwise. "
        f"Validation: the same held-out data for every run that holds out the same share. Seeds: "
        f"{', '.join(map(str, plan.seeds))} (each seed sets the model init and the batches).",
        "",
        "Variants per model family: "
        + ", ".join(f"{family} {n}" for family, n in variants_per_family(plan).items())
        + f"; learning rates per variant: {', '.join(sorted({str(len(plan.grid(v))) for v in plan.variants}))}.",
        "",
        f"## {name[0].upper() + name[1:]}, each variant at its best learning rate",
        "",
        f"Best rate: the {'lowest' if METRICS[metric] else 'highest'} mean {name} over the seeds (* at an edge of "
        f"the grid). Difference to `{base}`: paired by seed, each at its own best rate; s.e. across seeds.",
        "",
    ]
    if metric.startswith("test_"):
        lines += [
            "The rates were chosen on the test split: these figures screen recipes; they do not measure "
            "accuracy on unseen data.",
            "",
        ]
    rows = []
    for variant in plan.variants:
        entry = analysis["variants"].get(variant.name)
        if entry is None:
            continue
        per_seed = " / ".join(f"{v:.4f}" for v in entry["per_seed"].values())
        diff = entry.get("vs_baseline")
        diff_text = "—"
        if diff is not None:
            diff_text = f"{diff['mean']:+.4f}" + (f" ± {diff['se']:.4f}" if diff["n"] > 1 else "") + f" (n={diff['n']})"
        rows.append(
            [
                f"`{variant.name}`",
                variant.description or "—",
                f"{entry['best_lr']:g}" + ("*" if entry["best_lr_at_edge"] else ""),
                f"{entry['mean']:.4f}" + (f" ± {entry['se']:.4f}" if not math.isnan(entry["se"]) else ""),
                per_seed,
                diff_text,
            ]
        )
    headers = ["variant", "what changes", "best lr", f"mean {name} ± s.e.", "per seed", f"− {base} (paired)"]
    lines += [runner.markdown_table(headers, rows), ""]
    if analysis.get("comparisons"):
        lines += [f"## Further differences of the {name}", "", "Paired by seed, each variant at its own best rate.", ""]
        pair_rows = [
            [f"`{c['variant']}`", f"`{c['other']}`", f"{c['mean']:+.4f}", runner.fmt(c["se"]), str(c["n"])]
            + [" / ".join(f"{d:+.4f}" for d in c["diffs"])]
            for c in analysis["comparisons"]
        ]
        lines += [
            runner.markdown_table(["variant", "other", "difference", "s.e.", "seeds", "per seed"], pair_rows),
            "",
        ]
    grid = sorted({lr for v in plan.variants for lr in plan.grid(v)})
    lines += _size_table(results)
    lines += [f"## Learning-rate grid (mean {name} over seeds)", ""]
    grid_rows = []
    for variant in plan.variants:
        entry = analysis["variants"].get(variant.name)
        if entry is not None:
            cells = [runner.fmt(entry["grid"].get(runner.lr_name(lr))) for lr in grid]
            grid_rows.append([f"`{variant.name}`", *cells])
    lines += [runner.markdown_table(["variant", *(f"lr {lr:g}" for lr in grid)], grid_rows), ""]
    shown = [m for m in METRICS if any(m in e["metrics"] for e in analysis["variants"].values())]
    if shown != ["val_loss"]:
        lines += ["## Every final metric at the best rate (mean over seeds)", ""]
        metric_rows = [
            [f"`{variant}`", *(runner.fmt(entry["metrics"].get(m)) for m in shown)]
            for variant, entry in analysis["variants"].items()
        ]
        lines += [runner.markdown_table(["variant", *(METRIC_NAMES[m] for m in shown)], metric_rows), ""]
    lines += ["## Curves", "", f"![validation loss against tokens]({PLOT})", ""]
    return "\n".join(lines)
