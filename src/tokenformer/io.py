"""File formats: atomic file writes, JSON, and safe loading of weights (safetensors; no pickled code runs)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# tempfile creates private (0600 / 0700) entries; what is renamed into place gets the
# permissions that a plain open() or mkdir() would have given it.
_UMASK = _umask()
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(tmp)`` so that readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)  # after writing: some writers replace the file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically."""
    from safetensors.torch import save_file

    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in state_dict.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_weights(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; a truncated or corrupted file raises an error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, ValueError, OSError) as exc:
        raise ValueError(f"cannot read weights file {path} (truncated or corrupted?): {exc}") from exc


def file_or_inside(path: str | Path, name: str, what: str) -> Path:
    """``path`` when it is a file, ``path / name`` when it is a directory; an error naming ``what`` if absent."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}; allowed: a {name} or a directory with one")
    return path


def read_json(path: str | Path) -> Any:
    """A JSON file's content; a file that is not valid JSON raises an error naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON (truncated or corrupted?): {exc}") from exc


def fsync_tree(directory: Path) -> None:
    """fsync every file and folder under ``directory`` (files written without :func:`atomic_write`)."""
    for root, _dirs, files in os.walk(directory):
        for name in files:
            with open(Path(root) / name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Build a directory in a hidden staging folder beside ``path``, then rename it into place.

    Readers see no directory or the complete one: a crash leaves only a ``.<name>.tmp-*`` folder,
    which :func:`remove_stale_staging` deletes later. ``path`` must not exist yet.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(staging, DIR_MODE)
    try:
        yield staging
        fsync_tree(staging)
        os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def remove_directory(path: str | Path) -> None:
    """Delete a directory so that it never looks complete halfway: rename it aside, then delete."""
    path = Path(path)
    doomed = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.rename(path, doomed / path.name)
    _fsync_dir(path.parent)
    shutil.rmtree(doomed)


def remove_stale_staging(parent: str | Path) -> None:
    """Delete staging folders left by a process killed inside :func:`atomic_directory`."""
    for stale in Path(parent).glob(".*.tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
