"""``tokenformer consolidate``: sharded checkpoints to single-file ones and back."""

from __future__ import annotations


def consolidate(checkpoint: str, out: str) -> None:
    """Turn a sharded checkpoint (``--strategy fsdp``) into a single-file one, or a single-file one into a sharded one.

    Args:
        checkpoint: A training checkpoint, or a run directory (its newest complete checkpoint).
        out: Directory for the converted checkpoint (must not exist).
    """
    from ..io import claim_output
    from ..train import TrainConfig, load_checkpoint, resolve_checkpoint
    from ..train.checkpoint import load_sharded_state, reading, save_checkpoint
    from ..train.trainer import make_optimizer

    with claim_output(out):
        with reading(checkpoint):  # a run that is training keeps it until it is read
            source = resolve_checkpoint(checkpoint)
            loaded = load_checkpoint(source)
            optimizer = make_optimizer(loaded.model, TrainConfig.from_dict(loaded.trainer_state["train_config"]))
            if loaded.sharded:
                load_sharded_state(source, loaded.model, optimizer)
            else:
                optimizer.load_state_dict(loaded.optimizer_state)
        state, tokenizer, rng = loaded.trainer_state, loaded.tokenizer_json, loaded.rng
        path = save_checkpoint(out, loaded.model, optimizer, state, tokenizer, rng, sharded=not loaded.sharded)
    kind = "single-file" if loaded.sharded else "sharded"
    print(f"wrote {source} at step {loaded.trainer_state['step']} as a {kind} checkpoint: {path}")
    if loaded.ema is not None:
        print(
            "note: the moving average of the weights (ema.safetensors) is not carried over: "
            "a sharded checkpoint cannot hold it"
        )
