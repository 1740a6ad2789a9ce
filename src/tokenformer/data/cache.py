"""The cache of tokenizers and token shards: where it is, and one builder per entry at a time."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: builders race, and the loser of the final rename keeps the winner's entry
    fcntl = None


def default_cache_dir() -> Path:
    return Path(os.environ.get("TOKENFORMER_CACHE", Path.home() / ".cache" / "tokenformer"))


@contextmanager
def build_lock(entry: Path) -> Iterator[None]:
    """Hold an exclusive lock on building cache ``entry`` (a file or folder) while inside.

    Another process building the same entry waits here until the holder finishes (then finds the
    entry built) or dies (the operating system releases a dead holder's lock). The lock file,
    ``.<name>.lock`` beside the entry, stays: deleting it would let two processes lock two files.
    """
    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(entry.parent / f".{entry.name}.lock", "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            print(f"waiting for {holder} to finish building {entry}", file=sys.stderr, flush=True)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
