"""``tokenformer train``: train a model from scratch or resume a run."""

from __future__ import annotations

from typing import Any

from ..train.config import TrainConfig


def train(config: TrainConfig) -> None:
    """Train a TokenFormer language model or, with ``--task vision``, image classifier (from
    scratch, or resumed from a checkpoint). A task with a test split (a classifier) is tested on
    it at the end."""
    from ..train import Trainer
    from ..train.parallel import close_distributed

    try:
        trainer = Trainer(config)
        say = print if trainer.dist.is_main else lambda *_: None  # under torchrun, rank 0 speaks for all
        if trainer.resumed_from is not None:
            say(f"resumed from {trainer.resumed_from} at step {trainer.state.step}")
        try:
            trainer.fit()
        finally:
            trainer.close()
        last = trainer.state.val_history[-1] if trainer.state.val_history else None
        if last is not None:
            say(f"step {last['step']}: {describe_validation(last)}")
        test = trainer.task.test(trainer.evaluated_model, trainer.run_dir, write=trainer.dist.is_main)
        if test is not None:
            say(describe_test(test))
        say(f"checkpoint: {trainer.last_checkpoint}")
    finally:
        close_distributed()


def describe_test(metrics: dict[str, Any]) -> str:
    """The final test metrics in words."""
    parts = [
        f"{name.removeprefix('test_').replace('_', ' ')} {value:.4f}"
        if isinstance(value, float)
        else f"{name.removeprefix('test_').replace('_', ' ')} {value}"
        for name, value in metrics.items()
    ]
    return "test " + ", ".join(parts)


def describe_validation(metrics: dict[str, float]) -> str:
    """The validation loss with the task's own measure: perplexity, or accuracy."""
    text = f"validation loss {metrics['val_loss']:.6f}"
    if "val_ppl" in metrics:
        return text + f" (perplexity {metrics['val_ppl']:.2f})"
    return text + f" (accuracy {metrics['val_accuracy']:.4f})"
