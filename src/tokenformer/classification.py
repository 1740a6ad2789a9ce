"""Image classification as a task for a training loop: the loss of a batch, evaluation over a
dataset (loss, accuracy, confusion matrix) and a confusion-matrix figure.

A batch is ``(images [B, C, H, W], labels int64 [B])`` as :class:`tokenformer.data.vision.ImageBatches`
yields it; the model is anything called as ``model(images)`` -> logits and
``model(images, labels)`` -> ``(logits, mean cross-entropy)``, such as ``TokenformerViT``.
Precision (e.g. bf16 autocast) is the caller's context.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .io import atomic_write

Batch = tuple[torch.Tensor, torch.Tensor]


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``int64 [num_classes, num_classes]``: row = true class, column = predicted class."""
    if predictions.shape != labels.shape:
        raise ValueError(
            f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} must have the same shape"
        )
    for name, values in (("predictions", predictions), ("labels", labels)):
        if values.numel() and not 0 <= int(values.min()) <= int(values.max()) < num_classes:
            raise ValueError(f"{name} must lie in 0..{num_classes - 1}, got {int(values.min())}..{int(values.max())}")
    flat = labels.long().flatten() * num_classes + predictions.long().flatten()
    return torch.bincount(flat.cpu(), minlength=num_classes * num_classes).view(num_classes, num_classes)


@dataclass
class Evaluation:
    """Mean loss, accuracy and confusion matrix (rows true, columns predicted) over a dataset."""

    loss: float
    accuracy: float
    confusion: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    @property
    def per_class_accuracy(self) -> list[float]:
        """Recall of each class (``nan`` for a class with no example)."""
        totals = self.confusion.sum(dim=1).double()
        return (self.confusion.diagonal().double() / totals).tolist()

    def to_dict(self) -> dict:
        return {
            "loss": self.loss,
            "accuracy": self.accuracy,
            "count": self.count,
            "per_class_accuracy": self.per_class_accuracy,
            "confusion": self.confusion.tolist(),
        }


def _to_device(batch: Batch, device: torch.device) -> Batch:
    images, labels = batch
    return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


class ClassificationTask:
    """What a training loop needs to train and evaluate an image classifier."""

    def __init__(self, classes: Sequence[str], label_smoothing: float = 0.0) -> None:
        if len(classes) < 2:
            raise ValueError(f"a classification task needs at least 2 classes, got {list(classes)}")
        if (
            not isinstance(label_smoothing, (int, float))
            or isinstance(label_smoothing, bool)
            or not 0 <= label_smoothing < 1
        ):
            raise ValueError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
        self.classes = tuple(classes)
        self.label_smoothing = float(label_smoothing)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean training cross-entropy of one batch (moved to the model's device), against targets
        smoothed by ``label_smoothing`` (evaluation always scores the plain cross-entropy)."""
        images, labels = _to_device(batch, next(model.parameters()).device)
        return F.cross_entropy(model(images).float(), labels, label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> Evaluation:
        """Loss, accuracy and confusion matrix over every batch (the model's train/eval mode is restored)."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        total_loss = 0.0
        confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        try:
            for batch in batches:
                images, labels = _to_device(batch, device)
                logits = model(images).float()
                if logits.shape != (len(labels), self.num_classes):
                    raise ValueError(
                        f"model returned logits of shape {tuple(logits.shape)}; "
                        f"expected [{len(labels)}, {self.num_classes}] for {self.num_classes} classes"
                    )
                total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
                confusion += confusion_matrix(logits.argmax(dim=-1), labels, self.num_classes)
        finally:
            model.train(was_training)
        count = int(confusion.sum())
        if count == 0:
            raise ValueError("evaluate got no batches: the dataset is empty")
        return Evaluation(total_loss / count, float(confusion.diagonal().sum()) / count, confusion)


def write_confusion_matrix_png(
    confusion: torch.Tensor, classes: Sequence[str], path: str | Path, title: str | None = None
) -> Path:
    """Draw the confusion matrix (colour: share of the true class; text: counts) as a PNG, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    confusion = torch.as_tensor(confusion)
    n = len(classes)
    if confusion.shape != (n, n):
        raise ValueError(f"confusion matrix of shape {tuple(confusion.shape)} does not match {n} class names")
    counts = confusion.double()
    shares = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    size = 1.2 + 0.55 * n
    figure = Figure(figsize=(size + 1.5, size), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(shares.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    axes.set_xticks(range(n), classes, rotation=45, ha="right")
    axes.set_yticks(range(n), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for row in range(n):
        for col in range(n):
            colour = "white" if shares[row, col] > 0.5 else "black"
            axes.text(col, row, f"{int(counts[row, col])}", ha="center", va="center", color=colour, fontsize=7)
    total = counts.sum().clamp_min(1)
    axes.set_title(title or f"accuracy {float(counts.diagonal().sum() / total):.2%} of {int(counts.sum())}")
    figure.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    return path
