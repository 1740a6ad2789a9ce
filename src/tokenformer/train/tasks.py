"""The training task of each model family, by name (``TrainConfig.task``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..data import Tokenizer
from .config import TrainConfig
from .lm import language_modeling_task
from .task import Task
from .vision import image_classification_task

# name -> (config, tokenizer or None) -> (task, tokenizer): the tokenizer a checkpoint carried is
# passed in; a task that builds one (a language model's BPE) returns it, the others None.
TASKS: dict[str, Callable[[TrainConfig, Tokenizer | None], tuple[Task, Any]]] = {
    "lm": language_modeling_task,
    "vision": image_classification_task,
}


def make_task(config: TrainConfig, tokenizer: Tokenizer | None = None) -> tuple[Task, Tokenizer | None]:
    """The task ``config.task`` names, built from ``config`` (data, batches, validation)."""
    if config.task not in TASKS:
        raise ValueError(f"training option task={config.task!r} is invalid; allowed: {', '.join(TASKS)}")
    return TASKS[config.task](config, tokenizer)
