"""``tokenformer prune``: remove parameter tokens from a trained checkpoint."""

from __future__ import annotations

from .train import describe_validation


def prune(
    checkpoint: str,
    out: str,
    qkv_tokens: int | None = None,
    proj_tokens: int | None = None,
    ffn_tokens: int | None = None,
    layers: list[int] | None = None,
    calibration_batches: int = 8,
    ghost: bool | None = None,
    ghost_rank: int | None = None,
    evaluate: bool = True,
    data: str | list[str] | None = None,
    device: str = "auto",
) -> None:
    """Remove parameter tokens from a trained checkpoint; write the pruned checkpoint, optimizer state cut alike.

    Args:
        checkpoint: A training checkpoint, or a run directory (its newest complete checkpoint).
        out: Directory for the pruned checkpoint (must not exist); fine-tune with ``train --resume OUT``.
        qkv_tokens: New total of query/key/value parameter tokens (null: unchanged).
        proj_tokens: New total of output-projection parameter tokens (null: unchanged).
        ffn_tokens: New total of feed-forward parameter tokens (MLP hidden units of a linear model; null: unchanged).
        layers: Prune only these layers (null: all).
        calibration_batches: Training batches on which each token's importance is measured
            (mean absolute normalised score times value norm); 0: the data-free key norm times value norm.
        ghost: Keep the removed keys' share of every row's norm (null: on for l2_norm_gelu, the only norm that has one).
        ghost_rank: Cap each ghost's rank (null: exact).
        evaluate: Print the validation loss before and right after pruning.
        data: The corpus to calibrate and validate on (null: the one the run was trained on); not
            read with --calibration_batches 0 and --evaluate false.
        device: ``auto``, ``cpu``, ``cuda``, ...
    """
    from ..io import claim_output
    from ..validation import check_option, is_int
    from .reshape import checkpoint_trainer

    check_option(
        "calibration_batches", calibration_batches, lambda v: is_int(v) and v >= 0, "an integer >= 0 (0: data-free)"
    )
    with claim_output(out):
        needs_data = evaluate or calibration_batches > 0
        source, trainer = checkpoint_trainer(checkpoint, device, data, needs_data, command="prune")
        before = trainer.evaluate() if evaluate else None
        parameters = sum(p.numel() for p in trainer.model.parameters())
        record = trainer.prune(
            calibration_batches,
            qkv_tokens=qkv_tokens,
            proj_tokens=proj_tokens,
            ffn_tokens=ffn_tokens,
            layers=layers,
            ghost=ghost,
            ghost_rank=ghost_rank,
        )
        after = trainer.evaluate() if evaluate else None
        path = trainer.save_checkpoint(out)
    remaining = sum(p.numel() for p in trainer.model.parameters())
    importance = f"measured on {calibration_batches} batches" if calibration_batches else "data-free"
    print(
        f"pruned {source} at step {trainer.state.step}: {record.before[0]} -> {record.after[0]} tokens per layer "
        f"({parameters / 1e6:.3f}M -> {remaining / 1e6:.3f}M parameters; importance {importance}; "
        f"ghost norm: {'on' if record.ghost else 'off'})"
    )
    if before is not None:
        print(f"before pruning: {describe_validation(before)}; right after: {describe_validation(after)}")
    print(f"pruned checkpoint: {path}")
