"""``tokenformer grow``: append parameter tokens (and blocks) to a trained checkpoint."""

from __future__ import annotations

from typing import Literal

from .train import describe_validation


def grow(
    checkpoint: str,
    out: str,
    qkv_tokens: int | None = None,
    proj_tokens: int | None = None,
    ffn_tokens: int | None = None,
    n_layers: int | None = None,
    depth_position: Literal["top", "bottom", "interleave"] = "top",
    layers: list[int] | None = None,
    key_init: Literal["zeros", "random"] = "zeros",
    normalisation: Literal["joint", "separate"] = "joint",
    evaluate: bool = True,
    data: str | list[str] | None = None,
    device: str = "auto",
) -> None:
    """Append parameter tokens to a trained checkpoint; write the grown checkpoint, optimizer state carried.

    Args:
        checkpoint: A training checkpoint, or a run directory (its newest complete checkpoint).
        out: Directory for the grown checkpoint (must not exist); continue with ``train --resume OUT``.
        qkv_tokens: New total of query/key/value parameter tokens (null: unchanged).
        proj_tokens: New total of output-projection parameter tokens (null: unchanged).
        ffn_tokens: New total of feed-forward parameter tokens (null: unchanged).
        n_layers: New total of blocks (null: unchanged); new blocks start with zero residual
            outputs, so the function is kept.
        depth_position: Where new blocks go: ``top``, ``bottom`` or ``interleave`` (spread through the stack).
        layers: Grow the token counts of only these (old) layers (null: all).
        key_init: ``zeros`` keeps the function exactly; ``random`` initialises new keys like the released GPU code.
        normalisation: ``joint`` normalises the new tokens with the old ones; ``separate`` apart from them (random
            new keys, zero new values), so that the old tokens' share of every output stays exactly as it was
            while they are frozen (width only).
        evaluate: Print the validation loss before and right after growth.
        data: The corpus to validate on (null: the one the run was trained on); not read without --evaluate.
        device: ``auto``, ``cpu``, ``cuda``, ...
    """
    from ..io import claim_output
    from .reshape import checkpoint_trainer

    with claim_output(out):
        source, trainer = checkpoint_trainer(checkpoint, device, data, needs_data=evaluate, command="grow")
        before = trainer.evaluate() if evaluate else None
        record = trainer.grow(
            qkv_tokens=qkv_tokens,
            proj_tokens=proj_tokens,
            ffn_tokens=ffn_tokens,
            n_layers=n_layers,
            depth_position=depth_position,
            layers=layers,
            key_init=key_init,
            normalisation=normalisation,
        )
        after = trainer.evaluate() if evaluate else None
        path = trainer.save_checkpoint(out)
    parameters = sum(p.numel() for p in trainer.model.parameters())
    print(
        f"grew {source} at step {trainer.state.step}: {record.before[0]} -> {record.after[0]} tokens per layer, "
        f"{len(record.before)} -> {len(record.after)} layers "
        f"({parameters / 1e6:.2f}M parameters, function preserving: {record.function_preserving})"
    )
    if before is not None:
        print(f"before growth: {describe_validation(before)}; right after: {describe_validation(after)}")
    print(f"grown checkpoint: {path}")
