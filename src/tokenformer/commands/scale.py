"""``tokenformer scale``: run a scaling plan."""

from __future__ import annotations

from pathlib import Path


def scale(plan: str, out_dir: str | None = None) -> None:
    """Run a scaling plan: grown TokenFormer against from-scratch and grown Transformer baselines.

    Writes results.json, report.md and plots into the plan's out_dir; rerunning an interrupted
    plan continues where it stopped (finished runs are kept, unfinished ones resume).

    Args:
        plan: A plan YAML (configs/scaling/*.yaml).
        out_dir: Run directory (default: the plan's out_dir).
    """
    from ..experiments.scaling import load_plan, main_table, run_plan

    command = " ".join(["tokenformer", "scale", plan] + (["--out_dir", out_dir] if out_dir else []))
    results = run_plan(load_plan(plan, out_dir), command)
    print(main_table(results))
    print(f"report: {Path(results['plan']['out_dir']) / 'report.md'}")
