"""``tokenformer study``: run a recipe study."""

from __future__ import annotations

from pathlib import Path


def study(plan: str, out_dir: str | None = None, workers: int = 1) -> None:
    """Run a recipe study: variants of one recipe over a learning-rate grid and seeds, paired by seed.

    Writes results.json, report.md and curves.png into the plan's out_dir; rerunning an
    interrupted study continues where it stopped (finished runs are kept, unfinished ones resume).

    Args:
        plan: A study plan YAML (configs/studies/*.yaml).
        out_dir: Run directory (default: the plan's out_dir).
        workers: Runs trained at a time, each in its own process (with the plan's threads each).
    """
    from ..experiments.study import load_plan, run_study

    command = " ".join(["tokenformer", "study", plan] + (["--out_dir", out_dir] if out_dir else []))
    results = run_study(load_plan(plan, out_dir), command, workers)
    print(f"report: {Path(results['plan']['out_dir']) / 'report.md'}")
