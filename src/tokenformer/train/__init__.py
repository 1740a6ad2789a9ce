"""Training: the loop, its configuration, checkpoints, metrics, and the language-modelling task."""

from .checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    verify_checkpoint,
)
from .config import TrainConfig
from .interrupt import TrainingInterrupted
from .lm import LanguageModelingTask, evaluate_windows, language_modeling_task, prepare_data
from .metrics import Logger, read_metrics
from .task import Task
from .trainer import Trainer, TrainingDiverged, TrainState, lr_at

__all__ = [
    "CheckpointError",
    "LanguageModelingTask",
    "Logger",
    "Task",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "TrainingDiverged",
    "TrainingInterrupted",
    "evaluate_windows",
    "language_modeling_task",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "lr_at",
    "prepare_data",
    "read_metrics",
    "resolve_checkpoint",
    "verify_checkpoint",
]
