"""The cache of tokenizers and token shards: where it is, and one builder per entry at a time."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..io import DirectoryLock, lock_beside

CACHE_ENV = "TOKENFORMER_CACHE"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "tokenformer"))


def cache_for_checkpoint(recorded: str | None) -> str | None:
    """The cache of a command that reads a trained checkpoint's corpus: ``$TOKENFORMER_CACHE``
    when set (this machine's choice), else the ``cache_dir`` the run recorded (None: the default)."""
    return None if os.environ.get(CACHE_ENV) else recorded


@contextmanager
def build_lock(entry: Path) -> Iterator[None]:
    """Hold an exclusive lock on building cache ``entry`` (a file or folder) while inside.

    Another process building the same entry waits here until the holder finishes (then finds the
    entry built) or dies (the operating system releases a dead holder's lock). The lock file,
    ``.<name>.lock`` beside the entry, stays: deleting it would let two processes lock two files.
    Where locks are missing (not POSIX), builders race, and the loser of the final rename keeps
    the winner's entry.
    """
    with DirectoryLock(entry, lock_file=lock_beside(entry), wait=True):
        yield
