"""What ``tokenformer grow`` and ``tokenformer prune`` share: a trainer that continues a
checkpoint on one device, with the training data only where the command uses it."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class NoData:
    """The task of a trainer that only reshapes a checkpoint: it has no batches and no
    validation, and any use of them says which option would need the data."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __getattr__(self, name: str) -> Any:
        raise ValueError(f"{self.command} read no training data here ({name}); this needs the data")


def checkpoint_trainer(
    checkpoint: str, device: str, data: str | list[str] | None, needs_data: bool, command: str
) -> tuple[Path, Any]:
    """The checkpoint ``checkpoint`` names (a run directory's newest), and a trainer of it (the
    run's options, on ``device``, one process); a run that is training keeps it until it is read.

    The corpus is read only when ``needs_data`` (validation, calibration): from ``data`` if
    given, else from where the run read it; its token shards go to ``$TOKENFORMER_CACHE`` when
    that is set, else to the run's cache.
    """
    from ..train import Trainer, resolve_checkpoint
    from ..train.checkpoint import reading

    with reading(checkpoint):
        source = resolve_checkpoint(checkpoint)
        return source, Trainer(_options(source, device, data), task=None if needs_data else NoData(command))


def _options(source: Path, device: str, data: str | list[str] | None) -> Any:
    """The training options of ``source``'s run, continued from it on one device."""
    from ..data.cache import cache_for_checkpoint
    from ..train import TrainConfig
    from ..train.checkpoint import read_train_config

    saved = read_train_config(source)
    options: dict[str, Any] = {
        **saved,
        "resume": str(source),
        "device": device,
        "progress": False,
        "strategy": "single",
        "cache_dir": cache_for_checkpoint(saved.get("cache_dir")),
    }
    if data is not None:
        options["data"] = data
    return TrainConfig.from_dict(options)
