"""Image classification as a training task: an image dataset -> shuffled, augmented batches.

The training split minus a held-out validation share (``val_fraction``, evenly spaced) trains;
the held-out images validate during training (so learning rates can be chosen without touching
the test split); the test split is evaluated once at the end, with a confusion-matrix figure.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import io
from ..classification import Batch, ClassificationTask, Evaluation, write_confusion_matrix_png
from ..data.vision import ImageBatches, ImageDataset, channel_stats, load_image_dataset
from ..families import build_model, family_of
from .config import TrainConfig

CONFUSION_PNG = "confusion_matrix.png"
TEST_METRICS = "test_metrics.json"


def held_out_count(count: int, val_fraction: float) -> int:
    """Images held out for validation from a training split of ``count``: ``val_fraction`` of them, at least one."""
    return max(1, round(count * val_fraction))


def _subset(dataset: ImageDataset, rows: np.ndarray) -> ImageDataset:
    index = torch.from_numpy(rows)
    return ImageDataset(dataset.images[index], dataset.labels[index], dataset.classes)


class ImageClassificationTask:
    """Batch ``i`` of the run is batch ``i % len`` of epoch ``i // len`` of the shuffled training
    batches: a pure function of (seed, step, micro), so a resumed run continues exactly."""

    def __init__(self, train: ImageDataset, test: ImageDataset, config: TrainConfig) -> None:
        self.classification = ClassificationTask(train.classes, config.vision.label_smoothing)
        count = len(train)
        held_out = held_out_count(count, config.val_fraction)
        val_rows = np.linspace(0, count - 1, held_out).round().astype(np.int64)
        train_rows = np.setdiff1d(np.arange(count), val_rows)
        if len(train_rows) < config.batch_size:
            raise ValueError(f"batch_size={config.batch_size} is larger than the {len(train_rows)} training images")
        train_part, val_part = _subset(train, train_rows), _subset(train, val_rows)
        mean, std = channel_stats(train_part)
        self.grad_accum = config.grad_accum
        self.train_batches = ImageBatches(
            train_part,
            config.batch_size,
            mean,
            std,
            shuffle=True,
            drop_last=True,
            crop_padding=config.vision.crop_padding,
            hflip=config.vision.hflip,
            erase_prob=config.vision.erase_prob,
            seed=config.seed,
        )
        self.val_batches = ImageBatches(val_part, config.batch_size, mean, std)
        self.test_batches = ImageBatches(test, config.batch_size, mean, std)

    def train_batch(self, step: int, micro: int, device: torch.device) -> Batch:
        index = step * self.grad_accum + micro
        epoch, start = divmod(index, len(self.train_batches))
        images, labels = next(self.train_batches.epoch(epoch, start))
        return images.to(device), labels.to(device)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.classification.loss(model, batch)

    def count(self, batch: Batch) -> int:
        return len(batch[1])

    def flops_per_item(self, model: nn.Module) -> int:
        return family_of(model).training_flops(model.config, None)

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        result = self.classification.evaluate(model, self.val_batches)
        return {"val_loss": result.loss, "val_accuracy": result.accuracy}

    def build_model(self, config: TrainConfig) -> nn.Module:
        return build_model(config.model_config())

    def test(self, model: nn.Module, run_dir: str | Path, write: bool = True) -> dict[str, float]:
        """Evaluate the test split: ``test_loss``, ``test_accuracy`` and ``test_count``; with
        ``write``, also ``test_metrics.json`` and ``confusion_matrix.png`` in ``run_dir``."""
        result = self.evaluate_test(model)
        metrics = {"test_accuracy": result.accuracy, "test_loss": result.loss, "test_count": result.count}
        if not write:
            return metrics
        run_dir = Path(run_dir)
        io.atomic_write_text(
            run_dir / TEST_METRICS,
            json.dumps({"classes": list(self.classification.classes), **result.to_dict()}, indent=2) + "\n",
        )
        write_confusion_matrix_png(
            result.confusion,
            self.classification.classes,
            run_dir / CONFUSION_PNG,
            f"test accuracy {result.accuracy:.2%} of {result.count}",
        )
        return {**metrics, "confusion_matrix": str(run_dir / CONFUSION_PNG)}

    def evaluate_test(self, model: nn.Module) -> Evaluation:
        """Loss, accuracy and confusion matrix of ``model`` on the test split."""
        return self.classification.evaluate(model, self.test_batches)


def image_classification_task(config: TrainConfig, tokenizer: None = None) -> tuple[ImageClassificationTask, None]:
    """The task of ``config.vision.dataset`` (image classifiers have no tokenizer)."""
    train = load_image_dataset(config.vision.dataset, config.vision.data_path, "train")
    test = load_image_dataset(config.vision.dataset, config.vision.data_path, "test")
    return ImageClassificationTask(train, test, config), None
