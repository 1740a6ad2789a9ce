"""``tokenformer scale``: run a scaling plan."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..experiments.scaling import ScalingPlan


def scale(plan: ScalingPlan, workers: int = 1, command: str = "") -> None:
    """Run a scaling plan: grown TokenFormer against from-scratch and grown Transformer baselines.

    Writes results.json, report.md and plots into the plan's out_dir; rerunning an interrupted
    plan continues where it stopped (finished runs are kept, unfinished ones resume). On the
    command line the plan's fields are flags, its training options too:
    ``tokenformer scale --config demo --out_dir DIR --seeds '[1, 2, 3]' --train.threads 2``
    (``--config`` a plan YAML or the name of one in configs/scaling; ``tokenformer scale PLAN``
    is short for it). Under torchrun, a plan with ``train.strategy`` ddp (or fsdp) trains every
    run on all ranks together.

    Args:
        plan: The scaling plan.
        workers: Runs trained at a time, each in its own process (with the plan's threads each);
            1 under torchrun.
        command: The command line that started it, quoted in the report.
    """
    from ..experiments.scaling import main_table, run_plan
    from ..train.parallel import close_distributed

    try:
        results = run_plan(plan, command, workers)
    finally:
        close_distributed()
    if results is not None:  # under torchrun, rank 0 speaks for all
        print(main_table(results))
        print(f"report: {Path(results['plan']['out_dir']) / 'report.md'}")
