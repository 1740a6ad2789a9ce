"""``tokenformer scale``: run a scaling plan."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..experiments.scaling import ScalingPlan


def scale(plan: ScalingPlan, command: str = "") -> None:
    """Run a scaling plan: grown TokenFormer against from-scratch and grown Transformer baselines.

    Writes results.json, report.md and plots into the plan's out_dir; rerunning an interrupted
    plan continues where it stopped (finished runs are kept, unfinished ones resume). On the
    command line the plan's fields are flags: ``tokenformer scale --config demo --out_dir DIR``
    (``--config`` a plan YAML or the name of one in configs/scaling; ``tokenformer scale PLAN``
    is short for it).

    Args:
        plan: The scaling plan.
        command: The command line that started it, quoted in the report.
    """
    from ..experiments.scaling import main_table, run_plan

    results = run_plan(plan, command)
    print(main_table(results))
    print(f"report: {Path(results['plan']['out_dir']) / 'report.md'}")
