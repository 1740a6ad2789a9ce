"""The task-specific half of training, behind a small interface.

The trainer owns the optimizer, schedule, precision, checkpoints and logging; a task says how to
get a batch, what the loss is and how to evaluate. Language modelling is one task
(:class:`~tokenformer.train.lm.LanguageModelingTask`); an image classifier is another with the
same trainer.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Task(Protocol):
    def train_batch(self, step: int, micro: int, device: torch.device) -> Any:
        """Micro-batch ``micro`` of optimizer step ``step``. A pure function of its arguments (and
        the task's seed), so a resumed run sees exactly the batches an uninterrupted one would."""

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Scalar training loss of ``model`` (possibly wrapped: compiled, DDP) on ``batch``."""

    def count(self, batch: Any) -> int:
        """Items in ``batch`` that count towards throughput and budgets (tokens, images)."""

    def flops_per_item(self, model: nn.Module) -> int:
        """Training FLOPs (forward + backward) per counted item for the model as it is now."""

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Validation metrics; must contain ``val_loss``. Called under ``torch.no_grad``."""

    def build_model(self, config: Any) -> nn.Module:
        """A new model for this task: ``config`` (a ``TrainConfig``) names the preset and overrides."""

    def test(self, model: nn.Module, run_dir: Any, write: bool = True) -> dict[str, Any] | None:
        """The final test pass after training, if the task has one: metrics named ``test_*``
        (with ``write``, also saved in ``run_dir``); None for a task without a test split.
        Every rank calls it (sharded models need every rank in every forward pass)."""


def batch_seed(seed: int, step: int, micro: int) -> int:
    """A 63-bit seed for one micro-batch, decorrelated from its neighbours."""
    digest = hashlib.blake2b(f"{seed}:{step}:{micro}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
