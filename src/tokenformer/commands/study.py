"""``tokenformer study``: run a recipe study."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..experiments.study import StudyPlan


def study(plan: StudyPlan, workers: int = 1, command: str = "") -> None:
    """Run a recipe study: variants of one recipe over a learning-rate grid and seeds, paired by seed.

    Writes results.json, report.md and curves.png into the plan's out_dir; rerunning an
    interrupted study continues where it stopped (finished runs are kept, unfinished ones
    resume). On the command line the plan's fields are flags, its recipe's too:
    ``tokenformer study --config recipe-screen --seeds '[1, 2]' --train.max_steps 300``
    (``--config`` a study YAML or the name of one in configs/studies; ``tokenformer study PLAN``
    is short for it).

    Args:
        plan: The study plan.
        workers: Runs trained at a time, each in its own process (with the plan's threads each).
        command: The command line that started it, quoted in the report.
    """
    from ..experiments.study import run_study

    results = run_study(plan, command, workers)
    print(f"report: {Path(results['plan']['out_dir']) / 'report.md'}")
