"""What a scaling plan's runs say: the analysis (recomputed from the stored per-seed results), the
plots and the Markdown report.

Each arm keeps the learning rate with the best mean final validation loss over the seeds. Arms
are compared seed by seed, each at its own best rate: differences of final validation loss
(mean and standard error across seeds), and the compute and training wall time at which an
arm first reaches the same seed's baseline final loss.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from ... import io
from ...flops import count_parameters, training_flops_per_token
from .. import runner
from .plan import ScalingPlan

# (arm that should reach the target, arm whose final validation loss is the target)
COMPARISONS = (
    ("tokenformer_grown", "tokenformer_scratch"),
    ("tokenformer_grown", "transformer_scratch"),
    ("tokenformer_grown", "transformer_standard"),
    ("tokenformer_grown", "transformer_grown"),
    ("tokenformer_grown", "transformer_stacked"),
    ("tokenformer_grown", "tokenformer_shaped"),
    ("transformer_grown", "transformer_scratch"),
    ("transformer_stacked", "transformer_scratch"),
)
EQUAL_COMPUTE_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
ABLATION_LABELS = {
    "recipe": "zero keys, old tokens trained, schedule continued (the recipe)",
    "random_keys": "random new keys",
    "old_frozen": "old tokens frozen (old_scale=0)",
    "lr_rewarmup": "learning rate warmed up again after growth",
}
PLOTS = (
    ("flops", "cumulative training FLOPs", "loss_vs_flops.png"),
    ("wall_time", "training wall time (s)", "loss_vs_wall.png"),
)


# -- curves -------------------------------------------------------------------------------------


def crossing(curve: list[dict[str, float]], target: float, key: str = "flops") -> float | None:
    """``key`` (FLOPs, wall time) at which the validation loss first reaches ``target``, linear
    between evaluations; None if it never does."""
    previous = None
    for point in curve:
        if point["val_loss"] <= target:
            if previous is None:
                return point[key]
            fraction = (previous["val_loss"] - target) / (previous["val_loss"] - point["val_loss"])
            return previous[key] + fraction * (point[key] - previous[key])
        previous = point
    return None


def loss_at_flops(curve: list[dict[str, float]], flops: float) -> float | None:
    """Validation loss at ``flops``, linear between evaluations; None outside the curve."""
    for a, b in zip(curve, curve[1:], strict=False):
        if a["flops"] <= flops <= b["flops"]:
            if b["flops"] == a["flops"]:
                return b["val_loss"]
            return a["val_loss"] + (flops - a["flops"]) / (b["flops"] - a["flops"]) * (b["val_loss"] - a["val_loss"])
    return None


def growth_jumps(result: dict[str, Any]) -> list[tuple[int, float, float]]:
    """(step, validation loss before, right after) of each growth of a run: the two evaluations
    recorded at the growth step."""
    jumps = []
    for step in result["growth_steps"]:
        points = [p for p in result["curve"] if p["step"] == step]
        if len(points) >= 2:
            jumps.append((step, points[0]["val_loss"], points[1]["val_loss"]))
    return jumps


def batch_paired(arm: dict[str, Any], baseline: dict[str, Any]) -> tuple[float, float] | None:
    """Mean and standard error of ``arm - baseline`` final validation loss, batch by batch.

    Both were evaluated on the same windows, so the batch-to-batch spread of the data cancels:
    what is left is the evaluation noise of one run's difference (not the seed's).
    """
    a, b = arm["curve"][-1].get("val_batch_losses"), baseline["curve"][-1].get("val_batch_losses")
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return None
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    return statistics.fmean(diffs), runner.standard_error(diffs)


def mean_curve(curves: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Point by point mean over the seeds' curves (the k-th evaluation at a step matched with the
    k-th of every other seed); points some seed lacks are left out."""

    def keyed(curve):
        seen: dict[int, int] = {}
        out = {}
        for point in curve:
            seen[point["step"]] = seen.get(point["step"], 0) + 1
            out[(point["step"], seen[point["step"]])] = point
        return out

    points = [keyed(c) for c in curves]
    common = sorted(set.intersection(*(set(p) for p in points)))
    return [
        {
            "step": key[0],
            **{k: statistics.fmean(p[key][k] for p in points) for k in ("val_loss", "flops", "wall_time")},
        }
        for key in common
    ]


# -- analysis -----------------------------------------------------------------------------------


def standard_error(values: list[float]) -> float | None:
    """Standard error of the mean across seeds; None below two (JSON has no NaN)."""
    return runner.standard_error(values) if len(values) > 1 else None


def spread(values: list[float]) -> dict[str, float] | None:
    """Mean, standard error across seeds, minimum and maximum; None without values."""
    if not values:
        return None
    return {
        "mean": statistics.fmean(values),
        "se": standard_error(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def by_arm(runs: list[dict[str, Any]]) -> dict[str, dict[float, dict[int, dict[str, Any]]]]:
    """The runs as ``{arm: {lr: {seed: result}}}``."""
    table: dict[str, dict[float, dict[int, dict[str, Any]]]] = {}
    for run in runs:
        table.setdefault(run["arm"], {}).setdefault(run["lr"], {})[run["seed"]] = run
    return table


def best_runs(runs: list[dict[str, Any]], analysis: dict[str, Any]) -> dict[str, dict[int, dict[str, Any]]]:
    """Each analysed arm's runs at its best learning rate, by seed."""
    table = by_arm(runs)
    return {arm: table[arm][entry["best_lr"]] for arm, entry in analysis["arms"].items()}


def analyse(plan: ScalingPlan, runs: list[dict[str, Any]], ablation: list[dict[str, Any]]) -> dict[str, Any]:
    """Every figure of the report, from the stored per-seed results."""
    table = by_arm(runs)
    arms = {}
    for arm in plan.arms:
        if arm not in table:
            continue
        losses = {lr: {s: r["final_val_loss"] for s, r in seeds.items()} for lr, seeds in table[arm].items()}
        best = runner.best_lr(losses)
        at_best = dict(sorted(table[arm][best].items()))
        finals = [r["final_val_loss"] for r in at_best.values()]
        loads = [r.get("load_average") or {} for r in at_best.values()]
        arms[arm] = {
            "best_lr": best,
            "best_lr_at_edge": runner.at_edge(best, plan.lr_grid),
            "final_val_loss": {str(s): r["final_val_loss"] for s, r in at_best.items()},
            "mean": statistics.fmean(finals),
            "se": standard_error(finals),
            "grid": {runner.lr_name(lr): statistics.fmean(seeds.values()) for lr, seeds in sorted(losses.items())},
            "stage_parameters": next(iter(at_best.values()))["stage_parameters"],
            **final_shape(plan, arm, next(iter(at_best.values()))),
            "flops": statistics.fmean(r["flops"] for r in at_best.values()),
            "wall_time": spread([r["wall_time"] for r in at_best.values()]),
            "load_average": {
                when: spread([load[when] for load in loads if load.get(when) is not None]) for when in ("start", "end")
            },
            "growth": _growth(list(at_best.values())),
        }
    analysis = {"arms": arms}
    best = best_runs(runs, analysis)
    analysis["paired_differences"] = paired_differences(best)
    analysis["comparisons"] = comparisons(best)
    analysis["equal_compute"] = equal_compute(best)
    analysis["ablation"] = analyse_ablation(ablation) if ablation else None
    return analysis


def final_shape(plan: ScalingPlan, arm: str, result: dict[str, Any]) -> dict[str, Any]:
    """Non-embedding parameters and training FLOPs per token of an arm's final model. The
    vocabulary is the run's: its parameters less the non-embedding ones, per embedding column."""
    config = plan.model_config(plan.arm_models(arm)[-1])
    non_embedding = count_parameters(config, non_embedding=True)
    vocab = (result["stage_parameters"][-1] - non_embedding) // config.d_model
    return {
        "non_embedding_parameters": non_embedding,
        "flops_per_token": training_flops_per_token(config.replace(vocab_size=vocab), plan.train.seq_len),
    }


def _growth(seeds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    jumps = [growth_jumps(r) for r in seeds]
    rows = []
    for i, (step, _, _) in enumerate(jumps[0]):
        at = [j[i] for j in jumps if len(j) > i and j[i][0] == step]
        rows.append(
            {
                "step": step,
                "before": statistics.fmean(b for _, b, _ in at),
                "after": statistics.fmean(a for _, _, a in at),
                "max_abs_change": max(abs(a - b) for _, b, a in at),
                "n": len(at),
            }
        )
    return rows


def paired_differences(best: dict[str, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every pair of arms, each at its own best rate: the difference of final validation loss,
    paired by seed (mean and standard error across seeds), and the s.e. of that mean that the
    evaluation batches alone account for."""
    arms, rows = list(best), []
    for i, arm in enumerate(arms):
        for other in arms[i + 1 :]:
            paired = runner.paired(
                {s: r["final_val_loss"] for s, r in best[arm].items()},
                {s: r["final_val_loss"] for s, r in best[other].items()},
            )
            if paired is None:
                continue
            seeds = sorted(set(best[arm]) & set(best[other]))
            batch = [batch_paired(best[arm][s], best[other][s]) for s in seeds]
            eval_se = None if None in batch else math.sqrt(sum(se**2 for _, se in batch)) / len(batch)
            rows.append(
                {
                    "arm": arm,
                    "baseline": other,
                    "difference": paired["mean"],
                    "se": standard_error(paired["diffs"]),
                    "n": paired["n"],
                    "per_seed": {str(s): d for s, d in zip(seeds, paired["diffs"], strict=True)},
                    "eval_batch_se": eval_se,
                }
            )
    return rows


def comparisons(
    best: dict[str, dict[int, dict[str, Any]]], pairs: tuple[tuple[str, str], ...] = COMPARISONS
) -> list[dict[str, Any]]:
    """FLOPs and training wall time to target: for each seed, where the arm first reaches the same
    seed's baseline final validation loss, over the baseline's total; summarised across seeds.
    ``pairs``: the (arm, baseline) pairs compared, where both are in ``best``."""
    rows = []
    for arm, baseline in pairs:
        if arm not in best or baseline not in best:
            continue
        per_seed = {}
        for seed in sorted(set(best[arm]) & set(best[baseline])):
            mine, base = best[arm][seed], best[baseline][seed]
            target = base["final_val_loss"]
            flops = crossing(mine["curve"], target, "flops")
            wall = crossing(mine["curve"], target, "wall_time")
            per_seed[str(seed)] = {
                "target_val_loss": target,
                "flops_to_target": flops,
                "baseline_flops": base["flops"],
                "ratio": None if flops is None else flops / base["flops"],
                "wall_to_target": wall,
                "baseline_wall_time": base["wall_time"],
                "wall_ratio": None if wall is None or base["wall_time"] <= 0 else wall / base["wall_time"],
            }
        rows.append(
            {
                "arm": arm,
                "baseline": baseline,
                "per_seed": per_seed,
                "n": len(per_seed),
                "reached": sum(p["ratio"] is not None for p in per_seed.values()),
                "target_val_loss": statistics.fmean(p["target_val_loss"] for p in per_seed.values()),
                "ratio": spread([p["ratio"] for p in per_seed.values() if p["ratio"] is not None]),
                "wall_ratio": spread([p["wall_ratio"] for p in per_seed.values() if p["wall_ratio"] is not None]),
            }
        )
    return rows


def equal_compute(best: dict[str, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Mean validation loss over the seeds at fractions of the smallest arm's compute."""
    budget = min(statistics.fmean(r["flops"] for r in seeds.values()) for seeds in best.values())
    rows = []
    for fraction in EQUAL_COMPUTE_FRACTIONS:
        losses = {}
        for arm, seeds in best.items():
            at = [loss_at_flops(r["curve"], fraction * budget) for r in seeds.values()]
            losses[arm] = None if None in at else statistics.fmean(at)
        rows.append({"flops": fraction * budget, "fraction": fraction, "val_loss": losses})
    return rows


def analyse_ablation(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant of the first growth step: losses before, right after and at the end (mean over
    the seeds), and the final difference to the recipe, paired by seed."""
    variants: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results:
        variants.setdefault(r["variant"], {})[r["seed"]] = r
    recipe = {s: r["final_val_loss"] for s, r in variants.get("recipe", {}).items()}
    summary = {}
    for name, seeds in variants.items():
        finals = {s: r["final_val_loss"] for s, r in sorted(seeds.items())}
        summary[name] = {
            "before": statistics.fmean(r["loss_before_growth"] for r in seeds.values()),
            "after": statistics.fmean(r["loss_after_growth"] for r in seeds.values()),
            "final": spread(list(finals.values())),
            "final_val_loss": {str(s): v for s, v in finals.items()},
            "vs_recipe": None if name == "recipe" else _paired(finals, recipe),
        }
    first = results[0]
    return {"lr": first["lr"], "steps": first["steps"], "variants": summary}


def _paired(values: dict[int, float], baseline: dict[int, float]) -> dict[str, Any] | None:
    paired = runner.paired(values, baseline)
    return paired and {**paired, "se": standard_error(paired["diffs"])}


# -- outputs ------------------------------------------------------------------------------------


def plot_curves(results: dict[str, Any], out: Path) -> list[Path]:
    """Validation loss against FLOPs and against wall time, each arm at its best rate, mean over
    the seeds; squares mark the growth steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_runs(results["runs"], results["analysis"])
    paths = []
    for key, label, name in PLOTS:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for arm, seeds in best.items():
            curve = mean_curve([r["curve"] for r in seeds.values()])
            lr = results["analysis"]["arms"][arm]["best_lr"]
            (line,) = ax.plot(
                [p[key] for p in curve], [p["val_loss"] for p in curve], "o-", markersize=3, label=f"{arm} (lr {lr:g})"
            )
            growth = set(next(iter(seeds.values()))["growth_steps"])
            grown = [p for p in curve if p["step"] in growth]
            ax.plot(
                [p[key] for p in grown],
                [p["val_loss"] for p in grown],
                "s",
                color=line.get_color(),
                markersize=7,
                fillstyle="none",
            )
        if key == "flops":
            ax.set_xscale("log")
        ax.set_xlabel(label + "; squares: growth")
        ax.set_ylabel(f"validation loss (nats/token), mean over {len(results['plan']['seeds'])} seed(s)")
        ax.grid(alpha=0.3)
        ax.legend()
        path = out / name
        io.atomic_write(path, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
        plt.close(fig)
        paths.append(path)
    return paths


def _pm(mean: float | None, se: float | None, spec: str = ".4f", sign: str = "") -> str:
    if mean is None:
        return "—"
    text = format(mean, sign + spec)
    return text if se is None else f"{text} ± {format(se, spec)}"


def _per_seed(values: dict[str, float], spec: str = ".4f") -> str:
    return " / ".join(format(v, spec) for v in values.values())


def _range(stats: dict[str, float] | None, spec: str) -> str:
    return "—" if stats is None else f"{format(stats['min'], spec)}–{format(stats['max'], spec)}"


def main_table(results: dict[str, Any]) -> str:
    rows = []
    for arm, a in results["analysis"]["arms"].items():
        load = a["load_average"]
        rows.append(
            [
                arm,
                f"{a['best_lr']:g}" + ("*" if a["best_lr_at_edge"] else ""),
                " → ".join(f"{p / 1e6:.3g}M" for p in a["stage_parameters"]),
                f"{a['non_embedding_parameters'] / 1e6:.3g}M",
                f"{a['flops_per_token'] / 1e6:.3g}M",
                _pm(a["mean"], a["se"]),
                _per_seed(a["final_val_loss"]),
                f"{math.exp(a['mean']):.2f}",
                f"{a['flops']:.3e}",
                _pm(a["wall_time"]["mean"], a["wall_time"]["se"], ".1f"),
                " → ".join(runner.fmt(load[w] and load[w]["mean"], ".2f") for w in ("start", "end")),
            ]
        )
    headers = [
        "arm",
        "best lr",
        "parameters",
        "non-embedding (final)",
        "training FLOPs per token (final)",
        "final val loss ± s.e.",
        "per seed",
        "perplexity",
        "FLOPs",
        "train wall time (s)",
        "load avg start → end",
    ]
    return runner.markdown_table(headers, rows)


def report(results: dict[str, Any]) -> str:
    plan = ScalingPlan.from_dict(results["plan"])
    analysis = results["analysis"]
    train, m = plan.train, results["machine"]
    seeds = ", ".join(map(str, plan.seeds))
    at_edge = [arm for arm, a in analysis["arms"].items() if a["best_lr_at_edge"]]
    out = [
        "# Incremental scaling, measured",
        "",
        f"Command: `{results['command']}`" + (f" (at commit {results['commit']})" if results.get("commit") else ""),
        "",
        f"Machine: {m['processor']}, {m['cpu_count']} CPUs ({m['platform']}), torch {m['torch']}, "
        f"{m['threads']} thread(s) per run, device {m['device']}{', ' + m['gpu'] if 'gpu' in m else ''}, "
        f"{m['precision']}; {results['workers']} run(s) at a time"
        + (f", {results['ranks']} ranks ({train.strategy})" if results["ranks"] > 1 else "")
        + ".",
        "",
        f"Data `{train.data}`, {train.tokenizer} tokenizer ({train.vocab_size}), seq_len {train.seq_len}, "
        f"{train.tokens_per_step} tokens per step, {plan.total_steps} steps "
        f"({plan.total_steps * train.tokens_per_step:,} tokens) for every arm, warmup {train.warmup_steps}, cosine to "
        f"{plan.min_lr_ratio:g} x the peak rate. Seeds {seeds}: each (arm, learning rate, seed) is a run of its "
        f"own; the seed sets the model init, the batches and the grown values. Validation: the same "
        f"{train.eval_batches} batches of fixed windows for every run and evaluation. Stages (TokenFormer tokens "
        "qkv/proj/ffn × steps): "
        + ", ".join(
            f"{s.qkv_tokens}/{s.proj_tokens}/{s.ffn_tokens}"
            + ("" if s.n_layers is None else f" in {s.n_layers} layers")
            + f" × {s.steps}"
            for s in plan.stages
        )
        + ". FLOPs: `tokenformer.flops` (matmuls, 3 × forward), summed over every step of every stage. "
        "Wall time: training steps only (validation and checkpoints excluded), every run with the same "
        "thread count; the load average (one minute) is recorded at each run's start and end.",
        "",
        "## Final validation loss (each arm at its best learning rate)",
        "",
        "Best rate: the lowest mean final validation loss over the seeds (* at an edge of the grid). "
        "± s.e.: the standard error of the mean across seeds. Wall time and load average: mean over the seeds.",
        "",
        main_table(results),
        "",
    ]
    if at_edge:
        out += [f"Best rate at an edge of the grid for {', '.join(at_edge)}: widen `lr_grid`.", ""]
    out += [
        "## Differences of final validation loss (paired by seed)",
        "",
        "Each arm at its own best rate; mean over the seeds of (arm − other arm) and its standard error "
        "across seeds. Eval-batch s.e.: the part of that uncertainty the validation batches alone "
        "account for (each seed's difference paired batch by batch).",
        "",
    ]
    rows = [
        [
            d["arm"],
            d["baseline"],
            _pm(d["difference"], d["se"], sign="+") + f" (n={d['n']})",
            _per_seed(d["per_seed"], "+.4f"),
            runner.fmt(d["eval_batch_se"]),
        ]
        for d in analysis["paired_differences"]
    ]
    out += [
        runner.markdown_table(["arm", "other arm", "difference ± s.e.", "per seed", "eval-batch s.e."], rows),
        "",
        "## Validation loss at each growth step",
        "",
        "Mean over the seeds at each arm's best rate. Appending parameter tokens with zero keys and Net2Net "
        "widening keep the function (change 0 up to float rounding); G_stack's copies do not.",
        "",
    ]
    rows = [
        [arm, g["step"], f"{g['before']:.4f}", f"{g['after']:.4f}", f"{g['max_abs_change']:.2e}"]
        for arm, a in analysis["arms"].items()
        for g in a["growth"]
    ]
    out += [
        runner.markdown_table(
            ["arm", "step", "before growth", "right after", "largest absolute change over seeds"], rows
        ),
        "",
        "## FLOPs and wall time to target",
        "",
        "For each seed: the compute (and training wall time) at which the arm's validation loss first reaches "
        "the same seed's baseline final validation loss (linear between evaluations), divided by the "
        "baseline's total. Below 1: the arm needs less for the baseline's quality. Mean ± s.e. and range "
        "over the seeds that reached the target.",
        "",
    ]
    rows = [
        [
            c["arm"],
            c["baseline"],
            f"{c['target_val_loss']:.4f}",
            f"{c['reached']}/{c['n']}",
            "not reached" if c["ratio"] is None else _pm(c["ratio"]["mean"], c["ratio"]["se"], ".3f"),
            _range(c["ratio"], ".3f"),
            "not reached" if c["wall_ratio"] is None else _pm(c["wall_ratio"]["mean"], c["wall_ratio"]["se"], ".3f"),
            _range(c["wall_ratio"], ".3f"),
        ]
        for c in analysis["comparisons"]
    ]
    headers = ["arm", "baseline", "target (mean)", "seeds reached", "FLOPs ratio", "range", "wall ratio", "range"]
    out += [runner.markdown_table(headers, rows), ""]
    arms = list(analysis["arms"])
    out += [
        "## Validation loss at equal compute",
        "",
        "Mean over the seeds, interpolated between evaluations, at fractions of the smallest arm budget; "
        "— before an arm's first evaluation.",
        "",
        runner.markdown_table(
            ["FLOPs", *arms],
            (
                [f"{row['flops']:.3e} ({row['fraction']:.0%})", *(runner.fmt(row["val_loss"][a]) for a in arms)]
                for row in analysis["equal_compute"]
            ),
        ),
        "",
        "## Learning-rate grid (mean final validation loss over the seeds)",
        "",
        runner.markdown_table(
            ["arm", *(f"lr {lr:g}" for lr in plan.lr_grid)],
            (
                [arm, *(runner.fmt(analysis["arms"][arm]["grid"].get(runner.lr_name(lr))) for lr in plan.lr_grid)]
                for arm in arms
            ),
        ),
        "",
    ]
    ablation = analysis["ablation"]
    if ablation:
        out += [
            f"## Ablation of the first growth step (lr {ablation['lr']:g}, {ablation['steps']} steps after growth)",
            "",
            "Every variant starts from the grown arm's stage-1 checkpoint of the same seed. Losses: mean over "
            "the seeds; difference to the recipe paired by seed.",
            "",
        ]
        rows = []
        for name, a in ablation["variants"].items():
            diff = a["vs_recipe"]
            rows.append(
                [
                    ABLATION_LABELS[name],
                    f"{a['before']:.4f}",
                    f"{a['after']:.4f}",
                    _pm(a["final"]["mean"], a["final"]["se"]),
                    _per_seed(a["final_val_loss"]),
                    "—" if diff is None else _pm(diff["mean"], diff["se"], sign="+"),
                ]
            )
        headers = ["variant", "before growth", "right after", "after training ± s.e.", "per seed", "− recipe"]
        out += [runner.markdown_table(headers, rows), ""]
    out += [
        "## Plots",
        "",
        "Mean over the seeds, each arm at its best rate.",
        "",
        "![validation loss against FLOPs](loss_vs_flops.png)",
        "",
        "![validation loss against wall time](loss_vs_wall.png)",
        "",
    ]
    return "\n".join(out)
