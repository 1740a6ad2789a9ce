"""Incremental scaling, measured: grown TokenFormer against training from scratch, Net2Net and G_stack.

A plan (``configs/scaling/*.yaml``) names a stage schedule of parameter-token counts, a
learning-rate grid, seeds, and a ``train:`` section that is the training config every run
shares. Every arm trains on the same data, tokenizer, sequence length, batches (a pure function
of seed and step) and validation windows, and sees the same number of tokens:

- ``tokenformer_grown``: the first stage's TokenFormer, grown at each stage boundary by appending
  zero-key parameter tokens (function preserving), AdamW's moments carried over;
- ``tokenformer_scratch``: the final stage's TokenFormer from scratch for the whole budget;
- ``transformer_scratch``: the Transformer parameter-matched to the final stage;
- ``transformer_grown``: that Transformer's twin, widened at each boundary (Net2Net-style MLP
  widening, parameter-matched to the TokenFormer of each stage);
- ``transformer_stacked``: the final Transformer's shape grown in depth instead (G_stack: copies
  of the trained layers stacked on top; not function preserving), each stage as deep as the
  TokenFormer stage's share of the final non-embedding parameters allows (at least one layer);
- ``tokenformer_shaped`` (when the plan names a ``tokenformer_shape``): a TokenFormer of another
  shape (d_model, heads, token counts) with the final stage's non-embedding parameters, from scratch.

Each (arm, learning rate, seed) is a resumable run in ``<out_dir>/runs/<arm>/lr-<lr>/seed-<seed>``;
a run with a ``result.json`` is finished and skipped. Outputs: ``results.json``, ``report.md``,
``loss_vs_flops.png`` and ``loss_vs_wall.png`` in ``out_dir``.

- :mod:`.plan`: the plan, its validation and every run's training options;
- :mod:`.run`: training the runs (worker processes, or ranks under ``torchrun``);
- :mod:`.report`: the analysis, recomputed from the stored results, the plots and the report.
"""

from .plan import ABLATIONS, ARMS, GROWN_ARMS, STAGE_ONE, ScalingPlan, Stage, load_plan
from .report import (
    ABLATION_LABELS,
    COMPARISONS,
    analyse,
    crossing,
    growth_jumps,
    loss_at_flops,
    main_table,
    mean_curve,
    plot_curves,
    report,
)
from .run import check_workers, run_ablation, run_arm, run_plan

__all__ = [
    "ABLATIONS",
    "ABLATION_LABELS",
    "ARMS",
    "COMPARISONS",
    "GROWN_ARMS",
    "STAGE_ONE",
    "ScalingPlan",
    "Stage",
    "analyse",
    "check_workers",
    "crossing",
    "growth_jumps",
    "load_plan",
    "loss_at_flops",
    "main_table",
    "mean_curve",
    "plot_curves",
    "report",
    "run_ablation",
    "run_arm",
    "run_plan",
]
