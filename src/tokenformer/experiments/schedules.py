"""Growth schedules, searched: which stages let a grown TokenFormer reach a baseline's loss with the
least compute.

A search takes a finished scaling plan (:mod:`tokenformer.experiments.scaling`: its data, recipe,
budget, final size and tuned baselines) and trains its grown TokenFormer again under each
*candidate* schedule. A candidate is a rule, a function of the final size and the budget only, so
that it can be applied unchanged to another plan:

- ``rule``: the stages' shares of the budget, as ``tokenformer train --grow_schedule`` takes it
  (``shares:0.1,0.2,0.7`` or ``equal:K``; :func:`tokenformer.schedule.growth_schedule`);
- ``start_divisor``: the first stage's token counts are the final ones over it (rounded); every
  growth multiplies them by the same factor (``start_divisor ** (1 / (K - 1))``);
- ``start_layers``: the first stage's depth (default: the final depth); the depth grows linearly
  to the final one, new blocks where ``depth_position`` says;
- ``shape``: the final size: ``final``, the base plan's last stage (default), or ``shaped``, its
  ``tokenformer_shape`` (another d_model and token counts: the model grows toward the shape that
  did best from scratch; growth keeps d_model, so every stage has that width).

Every candidate trains at each rate of ``lr_grid`` for each seed (``out_dir/<candidate>`` is a
scaling plan's run directory with the one arm ``tokenformer_grown``). A candidate whose stages are
exactly the base plan's reuses the base plan's runs of the grown arm where they exist. Each
candidate keeps its best rate and is compared, seed by seed, with the base plan's arms at their
best rates: the difference of final validation loss, and the FLOPs and training wall time at
which it first reaches each baseline's final loss, over the baseline's.

Outputs in ``out_dir``: ``results.json`` and ``report.md``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import io
from ..schedule import growth_schedule, parse_rule
from ..validation import dataclass_from_dict, invalid, is_int
from . import runner
from .scaling import ScalingPlan, load_plan
from .scaling.report import _per_seed, _pm, best_runs, comparisons, standard_error
from .scaling.report import analyse as analyse_plan
from .scaling.run import run_job as run_scaling_job

ARM = "tokenformer_grown"
# The base plan's arms every candidate is compared with, where the base plan ran them.
BASELINES = (
    "tokenformer_grown",
    "tokenformer_scratch",
    "transformer_scratch",
    "transformer_standard",
    "tokenformer_shaped",
)
POSITIONS = ("top", "bottom", "interleave")
SHAPES = ("final", "shaped")
WIDTH_KEYS = ("d_model", "n_heads")


@dataclass
class Candidate:
    """One schedule rule (see the module docstring)."""

    name: str
    rule: str
    start_divisor: float = 4.0
    start_layers: int | None = None
    depth_position: str = "top"
    shape: str = "final"
    lr_grid: list[float] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        where = f"candidate {self.name!r}"
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise invalid("candidate field", "name", self.name, "a non-empty name without '/'")
        try:
            parse_rule(self.rule)
        except ValueError as error:
            raise ValueError(f"{where} rule={self.rule!r} is invalid: {error}") from None
        if not (isinstance(self.start_divisor, (int, float)) and self.start_divisor >= 1):
            raise invalid(where, "start_divisor", self.start_divisor, "a number >= 1")
        if self.start_layers is not None and not (is_int(self.start_layers) and self.start_layers >= 1):
            raise invalid(where, "start_layers", self.start_layers, "a positive integer or null")
        if self.depth_position not in POSITIONS:
            raise invalid(where, "depth_position", self.depth_position, ", ".join(POSITIONS))
        if self.shape not in SHAPES:
            raise invalid(where, "shape", self.shape, ", ".join(SHAPES))
        if self.lr_grid is not None:
            runner.check_lr_grid("lr_grid", self.lr_grid, where)


@dataclass
class SchedulePlan:
    """A schedule search.

    Args:
        out_dir: Where each candidate's runs, the results and the report go.
        base_plan: The scaling plan (YAML) whose data, recipe, budget and final size every
            candidate shares.
        baselines: The base plan's finished run directory (its ``results.json``): the arms every
            candidate is compared with.
        candidates: The schedules tried (:class:`Candidate` fields), names unique.
        seeds: Seeds every (candidate, rate) trains with.
        lr_grid: Peak learning rates every candidate trains at (a candidate's own ``lr_grid``
            replaces it).
        workers: Runs trained at a time, each in its own process.
    """

    out_dir: str = "runs/schedule-search"
    base_plan: str = "configs/scaling/cpu.yaml"
    baselines: str = "runs/scaling-cpu"
    candidates: list[Candidate] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [1337])
    lr_grid: list[float] = field(default_factory=lambda: [0.008, 0.016])
    workers: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.candidates, list) or not self.candidates:
            raise invalid("plan field", "candidates", self.candidates, "a non-empty list of schedule rules")
        self.candidates = [
            c if isinstance(c, Candidate) else dataclass_from_dict(Candidate, c, "candidate field")
            for c in self.candidates
        ]
        names = [c.name for c in self.candidates]
        if len(set(names)) != len(names):
            raise invalid("plan field", "candidates", names, "candidates with unique names")
        runner.check_lr_grid("lr_grid", self.lr_grid, "plan field")
        runner.check_seeds("seeds", self.seeds, "plan field")
        if not (is_int(self.workers) and self.workers >= 1):
            raise invalid("plan field", "workers", self.workers, "a positive integer")

    def base(self) -> ScalingPlan:
        return load_plan(self.base_plan)

    def candidate_plan(self, candidate: Candidate, base: ScalingPlan | None = None) -> ScalingPlan:
        """The scaling plan that trains ``candidate``: the base plan's with the candidate's
        schedule, the one grown arm, this search's seeds and rates."""
        base = base or self.base()
        data = base.to_dict()
        data.pop("stages", None)
        data.pop("tokenformer_shape", None)
        if candidate.shape == "shaped":
            width = {k: v for k, v in _shape(candidate, base).items() if k in WIDTH_KEYS}
            data["train"] = {**data["train"], "model_overrides": {**base.train.model_overrides, **width}}
        data.update(
            out_dir=str(Path(self.out_dir) / candidate.name),
            schedule=candidate_schedule(candidate, base),
            arms=[ARM],
            seeds=list(self.seeds),
            lr_grid=list(candidate.lr_grid or self.lr_grid),
            ablation=False,
        )
        return ScalingPlan.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SchedulePlan:
        return dataclass_from_dict(cls, data, "plan field")


def final_size(plan: ScalingPlan) -> dict[str, int]:
    """The size the base plan's grown TokenFormer ends at: token counts and depth."""
    last = plan.stages[-1]
    return {**last.tokens(), "n_layers": last.n_layers or plan.model_config(plan.train.model_overrides).n_layers}


def _shape(candidate: Candidate, base: ScalingPlan) -> dict[str, int]:
    if base.tokenformer_shape is None:
        raise invalid(
            f"candidate {candidate.name!r}",
            "shape",
            candidate.shape,
            f"final (the base plan {base.out_dir} has no tokenformer_shape)",
        )
    return base.tokenformer_shape


def candidate_schedule(candidate: Candidate, base: ScalingPlan) -> dict[str, Any]:
    """``candidate`` as a plan's ``schedule:`` section over ``base``'s budget and final size."""
    target = final_size(base)
    if candidate.shape == "shaped":
        target.update({k: v for k, v in _shape(candidate, base).items() if k not in WIDTH_KEYS})
    start = {
        **{k: max(1, round(v / candidate.start_divisor)) for k, v in target.items() if k != "n_layers"},
        "n_layers": candidate.start_layers or target["n_layers"],
    }
    if start["n_layers"] > target["n_layers"]:
        raise invalid(
            f"candidate {candidate.name!r}",
            "start_layers",
            candidate.start_layers,
            f"at most the final {target['n_layers']}",
        )
    stages = growth_schedule(candidate.rule, start, target, base.total_steps)
    shares = parse_rule(candidate.rule)
    return {
        "total_steps": base.total_steps,
        "depth_position": candidate.depth_position,
        "stages": [{"share": share, **stage.size} for share, stage in zip(shares, stages, strict=True)],
    }


def same_stages(a: ScalingPlan, b: ScalingPlan) -> bool:
    """Whether two plans grow through the same sizes for the same steps (depth spelled out or not)."""

    def stages(plan: ScalingPlan) -> list[tuple]:
        depth = plan.model_config(plan.train.model_overrides).n_layers
        return [(s.qkv_tokens, s.proj_tokens, s.ffn_tokens, s.n_layers or depth, s.steps) for s in plan.stages]

    return stages(a) == stages(b) and a.train.model_overrides == b.train.model_overrides


def load_schedule_plan(path: str | Path, out_dir: str | None = None) -> SchedulePlan:
    """Read and validate a YAML search plan; ``out_dir`` overrides the plan's."""
    return SchedulePlan.from_dict(runner.read_plan(path, out_dir))


def _baseline_results(plan: SchedulePlan) -> dict[str, Any]:
    path = Path(plan.baselines) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"baselines={plan.baselines!r} has no results.json; allowed: the finished run directory of the base plan "
            f"{plan.base_plan} (run `tokenformer scale --config {plan.base_plan}` first)"
        )
    return json.loads(path.read_text())


def reuse_base_runs(plan: SchedulePlan, base: ScalingPlan, candidate_plan: ScalingPlan) -> int:
    """Copy the base plan's grown-arm results into a candidate with exactly its stages (same
    training, so the same runs); returns how many were copied."""
    if not same_stages(base, candidate_plan):
        return 0
    copied = 0
    for lr in candidate_plan.lr_grid:
        for seed in candidate_plan.seeds:
            source = Path(plan.baselines) / "runs" / ARM / runner.lr_name(lr) / runner.seed_name(seed)
            result = runner.read_result(source)
            if result is not None and runner.read_result(candidate_plan.run_dir(ARM, lr, seed)) is None:
                runner.write_result(candidate_plan.run_dir(ARM, lr, seed), {**result, "reused_from": str(source)})
                copied += 1
    return copied


def run_search(plan: SchedulePlan, command: str = "", report_only: bool = False) -> dict[str, Any]:
    """Train every (candidate, rate, seed) not finished yet (with ``report_only``: none), then
    write the results and report."""
    base = plan.base()
    baselines = _baseline_results(plan)
    plans = {c.name: plan.candidate_plan(c, base) for c in plan.candidates}
    jobs = []
    for candidate_plan in plans.values():
        Path(candidate_plan.out_dir).mkdir(parents=True, exist_ok=True)
        io.atomic_write_text(
            Path(candidate_plan.out_dir) / "plan.yaml", yaml.safe_dump(candidate_plan.to_dict(), sort_keys=False)
        )
        reuse_base_runs(plan, base, candidate_plan)
        jobs += [
            {**job, "plan": candidate_plan.to_dict()}
            for job in candidate_plan.jobs()
            if runner.read_result(candidate_plan.run_dir(**job)) is None
        ]
    out = Path(plan.out_dir)
    io.atomic_write_text(out / "plan.yaml", yaml.safe_dump(plan.to_dict(), sort_keys=False))
    if jobs and not report_only:
        print(f"schedule search {out}: {len(jobs)} runs to go", flush=True)
        runner.prepare_data(base.run_config(base.train.model_overrides, plan.lr_grid[0], plan.seeds[0], base.out_dir))
        runner.run_jobs(run_scaling_job, jobs, plan.workers)
    candidates = {}
    for name, candidate_plan in plans.items():
        runs = [r for job in candidate_plan.jobs() if (r := runner.read_result(candidate_plan.run_dir(**job)))]
        candidates[name] = {"plan": candidate_plan.to_dict(), "runs": runs}
    results = {
        "command": command,
        "commit": runner.source_version(),
        "machine": runner.machine(base.train.threads, base.train.device, base.train.precision),
        "workers": plan.workers,
        "plan": plan.to_dict(),
        "base_plan": base.to_dict(),
        "baselines": {"runs": baselines["runs"], "analysis": baselines["analysis"]},
        "candidates": candidates,
    }
    results["analysis"] = analyse(results)
    io.atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    io.atomic_write_text(out / "report.md", report(results))
    return results


# -- analysis -----------------------------------------------------------------------------------


def analyse(results: dict[str, Any]) -> dict[str, Any]:
    """Every candidate at its best rate, and against each baseline arm at its best rate."""
    base_best = best_runs(results["baselines"]["runs"], results["baselines"]["analysis"])
    base_arms = results["baselines"]["analysis"]["arms"]
    out: dict[str, Any] = {
        "baselines": {
            arm: {k: base_arms[arm][k] for k in ("best_lr", "best_lr_at_edge", "mean", "se", "flops", "final_val_loss")}
            for arm in BASELINES
            if arm in base_arms
        },
        "candidates": {},
    }
    for name, entry in results["candidates"].items():
        plan = ScalingPlan.from_dict(entry["plan"])
        complete = [
            r
            for r in entry["runs"]
            if all(any(o["lr"] == r["lr"] and o["seed"] == s for o in entry["runs"]) for s in plan.seeds)
        ]
        if not complete:
            out["candidates"][name] = None
            continue
        arm = analyse_plan(plan, complete, [])["arms"][ARM]
        mine = best_runs(complete, {"arms": {ARM: arm}})[ARM]
        versus = {}
        for baseline in out["baselines"]:
            key = f"{ARM}@{name}"
            both = {key: mine, baseline: base_best[baseline]}
            row = comparisons(both, pairs=((key, baseline),))[0]
            paired = runner.paired(
                {s: r["final_val_loss"] for s, r in mine.items()},
                {s: r["final_val_loss"] for s, r in base_best[baseline].items()},
            )
            versus[baseline] = {
                "difference": None if paired is None else paired["mean"],
                "se": None if paired is None else standard_error(paired["diffs"]),
                "n": 0 if paired is None else paired["n"],
                "reached": row["reached"],
                "seeds": row["n"],
                "ratio": row["ratio"],
                "wall_ratio": row["wall_ratio"],
                "per_seed": {s: p["ratio"] for s, p in row["per_seed"].items()},
            }
        out["candidates"][name] = {
            "best_lr": arm["best_lr"],
            "best_lr_at_edge": arm["best_lr_at_edge"],
            "grid": arm["grid"],
            "mean": arm["mean"],
            "se": arm["se"],
            "final_val_loss": arm["final_val_loss"],
            "flops": arm["flops"],
            "wall_time": arm["wall_time"],
            "stages": [(s["steps"], _size_text(s)) for s in _stages(plan)],
            "versus": versus,
        }
    return out


def _stages(plan: ScalingPlan) -> list[dict[str, Any]]:
    depth = plan.model_config(plan.train.model_overrides).n_layers
    return [{**s.tokens(), "n_layers": s.n_layers or depth, "steps": s.steps} for s in plan.stages]


def _size_text(stage: dict[str, Any]) -> str:
    return f"{stage['qkv_tokens']}/{stage['proj_tokens']}/{stage['ffn_tokens']} x {stage['n_layers']}L"


def _reused_line(results: dict[str, Any]) -> list[str]:
    reused = [
        name
        for name, entry in results["candidates"].items()
        if entry["runs"] and all(r.get("reused_from") for r in entry["runs"])
    ]
    if not reused:
        return []
    names = ", ".join(f"`{n}`" for n in reused)
    return [f"Runs of {names}: the base plan's own runs of the grown arm (the same stages), not trained again.", ""]


def _total_steps(base: dict[str, Any]) -> int:
    return ScalingPlan.from_dict(base).total_steps


def _lr(entry: dict[str, Any]) -> str:
    return f"{entry['best_lr']:g}{'*' if entry['best_lr_at_edge'] else ''}"


def _ratio(entry: dict[str, Any]) -> str:
    stats = entry["ratio"]
    reached = f"{entry['reached']}/{entry['seeds']}"
    if stats is None:
        return f"not reached (0/{entry['seeds']})"
    return f"{_pm(stats['mean'], stats['se'], '.3f')} ({reached})"


def report(results: dict[str, Any]) -> str:
    plan, base, analysis = results["plan"], results["base_plan"], results["analysis"]
    machine = results["machine"]
    lines = [
        "# Growth schedules, searched",
        "",
        f"Command: `{results['command']}` (at commit {results['commit']})",
        "",
        f"Machine: {machine['processor']}, {machine['cpu_count']} CPUs, torch {machine['torch']}, {machine['device']}, "
        f"{machine['precision']}, {machine['threads']} thread(s) per run, "
        f"{results['workers']} run(s) at a time.",
        "",
        f"Base plan: `{plan['base_plan']}` (its data, recipe, budget of {_total_steps(base)} steps and final size); "
        f"baselines: its runs in `{plan['baselines']}`, each arm at its best rate of the base plan's grid. Every "
        f"candidate: the grown TokenFormer under its schedule, seeds {plan['seeds']}, rates {plan['lr_grid']} (or "
        "the candidate's own; * best at an edge of the grid). A candidate's stages: its rule's shares of the budget; "
        "the first stage's token counts are the final ones over `start_divisor`, each growth multiplies them by the "
        "same factor; the depth grows linearly from `start_layers`.",
        "",
        *_reused_line(results),
        "## Candidates",
        "",
    ]
    rows = []
    for c in plan["candidates"]:
        entry = analysis["candidates"].get(c["name"])
        if entry is None:
            rows.append([c["name"], c["rule"], "—", "—", "not finished", "—", "—", "—"])
            continue
        stages = ", ".join(f"{size} × {steps}" for steps, size in entry["stages"])
        rows.append(
            [
                f"{c['name']}",
                f"`{c['rule']}`, /{c['start_divisor']:g}, {c['start_layers'] or 'final'} layers, {c['depth_position']}"
                + (", best shape" if c.get("shape") == "shaped" else ""),
                stages,
                _lr(entry),
                _pm(entry["mean"], entry["se"]),
                _per_seed(entry["final_val_loss"]),
                f"{entry['flops']:.3e}",
                _pm(entry["wall_time"]["mean"], entry["wall_time"]["se"], ".1f"),
            ]
        )
    lines += [
        runner.markdown_table(
            [
                "candidate",
                "rule, start divisor, start depth, new blocks",
                "stages (qkv/proj/ffn x layers × steps)",
                "best lr",
                "final val loss ± s.e.",
                "per seed",
                "FLOPs",
                "train wall (s)",
            ],
            rows,
        ),  # fmt: skip
        "",
        "## The baselines (the base plan's arms at their best rates)",
        "",
        runner.markdown_table(
            ["arm", "best lr", "final val loss ± s.e.", "FLOPs"],
            [
                [
                    arm,
                    f"{e['best_lr']:g}{'*' if e['best_lr_at_edge'] else ''}",
                    _pm(e["mean"], e["se"]),
                    f"{e['flops']:.3e}",
                ]
                for arm, e in analysis["baselines"].items()
            ],
        ),
        "",
        "## Each candidate against each baseline",
        "",
        "Paired by seed, each at its best rate: the final validation loss difference (candidate − baseline), and "
        "the share of the baseline's FLOPs and training wall time at which the candidate first reaches the same "
        "seed's baseline final loss (mean ± s.e. over the seeds that reach it; reached/seeds).",
        "",
    ]
    for arm in analysis["baselines"]:
        rows = []
        for c in plan["candidates"]:
            entry = analysis["candidates"].get(c["name"])
            if entry is None or arm not in entry["versus"]:
                continue
            v = entry["versus"][arm]
            wall = v["wall_ratio"]
            rows.append(
                [
                    c["name"],
                    f"{_pm(v['difference'], v['se'], '.4f', '+')} (n={v['n']})",
                    _ratio(v),
                    "—" if wall is None else _pm(wall["mean"], wall["se"], ".3f"),
                ]
            )
        lines += [
            f"Against `{arm}`:",
            "",
            runner.markdown_table(
                ["candidate", "difference ± s.e.", "FLOPs to its loss", "wall time to its loss"], rows
            ),
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m tokenformer.experiments.schedules PLAN.yaml [--out_dir DIR] [--report_only]``."""
    runner.experiment_main(
        argv, "tokenformer.experiments.schedules",
        __doc__.split("\n\n")[0], "configs/experiments/schedules-cpu.yaml", load_schedule_plan, run_search, report,
    )  # fmt: skip


if __name__ == "__main__":
    main()


__all__ = ["Candidate", "SchedulePlan", "candidate_schedule", "load_schedule_plan", "run_search"]
