"""Causal language modelling as a training task: corpus -> tokenizer -> token shards -> batches."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data import (
    Corpus,
    Tokenizer,
    TokenShards,
    build_shards,
    default_cache_dir,
    get_tokenizer,
    windows_to_batch,
)
from ..families import build_model, family_of
from .config import TrainConfig
from .metrics import standard_error
from .task import batch_seed


class LanguageModelingTask:
    """Next-token prediction on random windows of the train split; validation on fixed, evenly
    spaced windows of the validation split (the same every time, so curves are comparable and
    a function-preserving growth leaves the validation loss unchanged)."""

    def __init__(
        self,
        shards: TokenShards,
        batch_size: int,
        seq_len: int,
        seed: int,
        eval_batches: int,
        vocab_size: int | None = None,
    ) -> None:
        shards.check_window("train", seq_len)
        self.shards, self.batch_size, self.seq_len, self.seed = shards, batch_size, seq_len, seed
        self.vocab_size = vocab_size  # the tokenizer's: new models get an embedding at least this large
        self.eval_windows = shards.even_windows("val", seq_len, eval_batches * batch_size)

    def train_batch(self, step: int, micro: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(batch_seed(self.seed, step, micro))
        x, y = self.shards.random_windows("train", self.batch_size, self.seq_len, generator)
        return x.to(device), y.to(device)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return model(*batch)[1]

    def count(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return batch[1].numel()

    def flops_per_item(self, model: nn.Module) -> int:
        return family_of(model).training_flops(model.config, self.seq_len)

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        return evaluate_windows(model, self.eval_windows, self.batch_size, device)

    def build_model(self, config: TrainConfig) -> nn.Module:
        return build_model(config.model_config(self.vocab_size))

    def test(self, model: nn.Module, run_dir: str | Path, write: bool = True) -> None:
        """Language models have no test split apart from validation: nothing to do."""
        return None


@torch.no_grad()
def evaluate_windows(
    model: nn.Module, windows: Sequence[np.ndarray], batch_size: int, device: torch.device
) -> dict[str, float]:
    """Mean next-token loss and perplexity over ``windows`` (arrays of ``seq_len + 1`` ids).

    ``val_loss_se`` is the standard error of the mean over the batches: differences between
    models evaluated on the same windows smaller than about twice it are noise.
    ``val_batch_losses`` (the mean loss of each batch, in order) lets two models evaluated on the
    same windows be compared batch by batch: the paired difference is far less noisy.
    """
    if not windows:
        raise ValueError("nothing to evaluate: no window of seq_len + 1 tokens fits the data")
    losses, sizes = [], []
    for start in range(0, len(windows), batch_size):
        x, y = windows_to_batch(windows[start : start + batch_size])
        losses.append(float(model(x.to(device), y.to(device))[1]))
        sizes.append(y.numel())
    count = sum(sizes)
    mean = sum(loss * size for loss, size in zip(losses, sizes, strict=True)) / count
    return {
        "val_loss": mean,
        "val_ppl": math.exp(min(mean, 700.0)),
        "val_loss_se": standard_error(losses),
        "val_tokens": count,
        "val_batch_losses": losses,
    }


def prepare_data(config: TrainConfig, tokenizer: Tokenizer | None = None) -> tuple[TokenShards, Tokenizer]:
    """Corpus -> tokenizer (trained or loaded, unless given) -> cached token shards, all streamed."""
    corpus = Corpus(config.sources)
    cache = config.cache_dir or default_cache_dir()
    if tokenizer is None:
        tokenizer = get_tokenizer(config.tokenizer, corpus, config.vocab_size, cache)
    directory = build_shards(corpus, tokenizer, cache, config.val_fraction, progress=config.progress)
    return TokenShards.open(directory), tokenizer


def language_modeling_task(
    config: TrainConfig, tokenizer: Tokenizer | None = None
) -> tuple[LanguageModelingTask, Tokenizer]:
    shards, tokenizer = prepare_data(config, tokenizer)
    task = LanguageModelingTask(
        shards, config.batch_size, config.seq_len, config.seed, config.eval_batches, tokenizer.vocab_size
    )
    return task, tokenizer
