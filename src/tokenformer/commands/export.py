"""``tokenformer export``: the model of a run as a clean Hugging Face hub folder."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def export(
    run: str,
    out: str,
    tokenizer: str | None = None,
    ema: bool | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the model of a run as a clean hub folder: `tokenformer export RUN OUT`.

    The folder holds the weights, config, code, tokenizer, generation config and a model card
    that says how the model was trained and its validation loss; no optimizer, trainer state or
    manifest.

    Args:
        run: A run directory (its newest complete checkpoint), a checkpoint or a model directory.
        out: The folder to write; it must be new or empty, or a model directory with --overwrite.
        tokenizer: A tokenizer.json (default: the one saved with the model).
        ema: Export the moving average of the weights (ema.safetensors) instead of the live
            weights; null: the average when the run kept one (the weights its validation loss is of).
        overwrite: Replace a model directory already at out, as a whole.
    """
    from ..families import load_model, save_model
    from ..interop.convert import check_replaceable
    from ..interop.tokenizer import as_tokenizer
    from ..io import atomic_directory, atomic_write_text, claim_output, load_weights
    from ..model_card import MODEL_CARD_NAME, model_card
    from ..train.checkpoint import EMA, MANIFEST, TOKENIZER, read_trainer_state, reading
    from .generate import model_directory

    if ema not in (None, True, False):
        raise ValueError(f"ema must be true, false or null, got {ema!r}")
    destination = Path(out).expanduser()
    with claim_output(destination, replace=True):
        check_replaceable(destination, overwrite)
        with reading(run):  # a run that is training keeps the checkpoint picked until it is read
            directory = model_directory(run)
            state = read_trainer_state(directory) if (directory / MANIFEST).is_file() else None
            averaged = (directory / EMA).is_file() if ema is None else ema
            if averaged and not (directory / EMA).is_file():
                raise ValueError(f"{directory} holds no moving average ({EMA}); allowed: --ema false or null")
            tokenizer_path = Path(tokenizer).expanduser() if tokenizer else directory / TOKENIZER
            if not tokenizer_path.exists():
                raise FileNotFoundError(f"{directory} has no {TOKENIZER}; pass --tokenizer PATH")
            words = as_tokenizer(tokenizer_path)
            model = load_model(directory)
            if averaged:
                model.load_state_dict(load_weights(directory / EMA), strict=True)
        with atomic_directory(destination, replace=True) as staging:
            save_model(model, staging, words)
            if state is not None:
                card = model_card(model.config, True, training_rows(state, averaged))
                atomic_write_text(staging / MODEL_CARD_NAME, card)
    print(f"wrote {destination}")
    return destination


def training_rows(state: dict[str, Any], averaged: bool) -> list[tuple[str, str]]:
    """The model card's rows on training, from a checkpoint's ``trainer_state.json``: steps and
    tokens, data, recipe, growth and the last validation loss of the exported weights."""
    config = state["train_config"]
    data = config.get("data")
    batch = f"{config.get('batch_size')} x {config.get('grad_accum', 1)} accumulated"
    rows = [
        ("steps / tokens", f"{state['step']:,} / {int(state.get('tokens', 0)):,}"),
        ("data", ", ".join(data) if isinstance(data, list) else str(data)),
        ("sequence length / batch", f"{config.get('seq_len')} / {batch}"),
        (
            "optimizer",
            f"AdamW, learning rate {config.get('lr')} to {config.get('min_lr')} after "
            f"{config.get('warmup_steps')} warm-up steps, weight decay {config.get('weight_decay')}",
        ),
        ("precision", str(config.get("precision"))),
    ]
    grown = [entry["step"] for entry in state.get("growth_history", []) if entry.get("step")]
    if grown:
        rows.append(("grown (appended parameter tokens) at steps", ", ".join(f"{step:,}" for step in grown)))
    if averaged:
        rows.append(("weights", f"moving average of the weights (decay {config.get('ema_decay')})"))
    # With a moving average, validation measured it (val_loss) and the live weights (val_loss_raw).
    key = "val_loss" if averaged or not config.get("ema_decay") else "val_loss_raw"
    last = next((r for r in reversed(state.get("val_history", [])) if key in r), None)
    if last is not None:
        loss = float(last[key])
        perplexity = f" (perplexity {math.exp(loss):.2f})" if loss < 50 else ""
        rows.append(("validation loss", f"{loss:.4f}{perplexity} at step {last['step']:,}"))
    return rows
