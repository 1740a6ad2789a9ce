"""File formats: atomic file writes, JSON, and safe loading of weights (safetensors; no pickled code runs).

Writes that fail for a reason of the environment (a full disk, a read-only or unwritable folder)
raise an ``OSError`` whose message names the path, what failed and what to do
(:func:`write_error`); :func:`describe_os_error` turns any ``OSError`` into such a line.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
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


# What to do about the errors of the environment a write can meet.
_ADVICE = {
    errno.ENOSPC: "the file system is full: free some space there or write somewhere else",
    errno.EDQUOT: "the disk quota is used up: free some space there or write somewhere else",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.EACCES: "permission denied: make the folder writable or write somewhere else",
    errno.EPERM: "permission denied: make the folder writable or write somewhere else",
    errno.EFBIG: "the file is too large for this file system: write somewhere else",
    errno.EIO: "the device reported an I/O error: check the disk",
}


class WriteError(OSError):
    """Writing a path failed for a reason of the environment; the message says which, why and what to do."""

    def __init__(self, path: str | Path, code: int | None, reason: str, advice: str | None = None) -> None:
        advice = advice or _ADVICE.get(code, "check the path and the device")
        super().__init__(code, f"cannot write {path}: {reason}; {advice}")
        self.reason = reason

    def __str__(self) -> str:
        return self.strerror


def write_error(path: str | Path, exc: BaseException) -> WriteError:
    """A :class:`WriteError` (same errno) saying that writing ``path`` failed, why and what to do.

    ``exc`` is an ``OSError``, a :class:`WriteError` of a file inside ``path``, or a library's
    error that carries the OS error in its text (safetensors reports ``... (os error 28)``).
    """
    if isinstance(exc, WriteError):
        return WriteError(path, exc.errno, exc.reason)
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and (match := re.search(r"os error (\d+)", str(exc))):
        code = int(match.group(1))
    return WriteError(path, code, os.strerror(code) if code else " ".join(str(exc).split()))


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Inside, an ``OSError`` (a full disk, a read-only file system, ...) becomes
    :func:`write_error`'s, named by ``path``: writes to an open file raise errors without one."""
    try:
        yield
    except OSError as exc:
        raise write_error(path, exc) from exc


def describe_os_error(exc: OSError) -> str:
    """One line for an ``OSError``: the path, what failed and what to do."""
    if exc.errno is None or exc.filename is None:
        text = str(exc)  # raised with a message of its own (write_error, or a plain FileNotFoundError)
        if exc.errno in _ADVICE and _ADVICE[exc.errno] not in text:
            text += f"; {_ADVICE[exc.errno]}"
        return text
    path = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
    advice = _ADVICE.get(exc.errno, "check the path and the device")
    return f"{path}: {exc.strerror}; {advice}"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(tmp)`` so that readers see the old file or the whole new one.

    A failure of the environment (disk full, read-only folder, ...) raises :func:`write_error`'s
    ``OSError``; the old file, if any, is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)  # after writing: some writers replace the file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if _is_os_failure(exc):
            raise write_error(path, exc) from exc
        raise
    _fsync_dir(path.parent)


def _is_os_failure(exc: BaseException) -> bool:
    # An OSError, or a library's error wrapping one (safetensors: "I/O error: ... (os error N)").
    return isinstance(exc, OSError) or (isinstance(exc, Exception) and re.search(r"os error \d+", str(exc)) is not None)


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


# The dtypes of safetensors headers that torch has.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_weights_header(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype | str]]:
    """The name, shape and dtype of every tensor of a safetensors file, read from its header
    alone (nothing is allocated for the tensors); a dtype torch lacks stays its safetensors name."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            return {
                name: (tuple(s.get_shape()), _SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype()))
                for name, s in slices.items()
            }
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


def one_line(exc: BaseException) -> str:
    """An error's message on one line; of ``torch.load(weights_only=True)``'s long refusal, the reason."""
    text = str(exc)
    if match := re.search(r"WeightsUnpickler error:(.*?)(Check the documentation|$)", text, re.S):
        text = f"torch.load(weights_only=True) refused it: {match.group(1)}"
    return " ".join(text.split()) or type(exc).__name__


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
def atomic_directory(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """Build a directory in a hidden staging folder beside ``path``, then rename it into place.

    Readers see no directory or the complete one: a crash leaves only a ``.<name>.tmp-*`` folder,
    which :func:`remove_stale_staging` deletes later. ``path`` must not exist yet, unless
    ``replace``: then an existing ``path`` is swapped for the new directory in one step where the
    system can (Linux ``renameat2``), else moved aside just before the new one is renamed in; it
    is deleted afterwards. Readers never see a mix of the two. Without ``replace``, a ``path``
    that someone else creates while the directory is built is left as it is and the new one is
    dropped with a ``FileExistsError``.
    """
    path = Path(path)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        os.chmod(staging, DIR_MODE)
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        yield staging
        fsync_tree(staging)
        old = _swap(staging, path) if replace and path.exists() else None
        if old is None:
            _rename_no_replace(staging, path)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if _is_os_failure(exc) and not isinstance(exc, FileExistsError):  # named by the directory, not by its staging
            raise write_error(path, exc) from exc
        raise
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # what is left if this is cut short is a stale staging folder


def _swap(new: Path, path: Path) -> Path:
    """Put ``new`` in place of the existing ``path``; returns where the old directory now is (a
    hidden staging name, deleted by the caller or, after a crash, by :func:`remove_stale_staging`)."""
    if _exchange(new, path):
        return new
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.rename(path, aside / path.name)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(aside / path.name, path)  # the old one back
        raise
    return aside


# Flags of Linux's renameat2.
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def _rename_no_replace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (a plain rename would replace an empty
    directory); atomic where the system can (``renameat2(RENAME_NOREPLACE)``)."""
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        pass
    else:
        if not os.path.lexists(dst):
            os.rename(src, dst)
            return
    raise FileExistsError(
        f"{dst} appeared while it was being written (made by someone else?); it was left as it is and the new "
        "one dropped: move it away and run again, or write somewhere else",
    )


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux's ``renameat2``; False where the system or file system lacks it (or the flag)."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a C library without renameat2
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a file system or kernel without it
        return False
    if code == errno.EEXIST:
        raise FileExistsError(code, os.strerror(code), str(b))
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def remove_directory(path: str | Path) -> None:
    """Delete a directory so that it never looks complete halfway: rename it aside, then delete."""
    path = Path(path)
    doomed = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.rename(path, doomed / path.name)
    _fsync_dir(path.parent)
    shutil.rmtree(doomed)


def set_aside(path: str | Path, label: str) -> Path:
    """Rename ``path`` to ``<name>.<label>`` (``<name>.<label>-2``, ... if taken) beside it; returns the new path."""
    path = Path(path)
    target, n = path.with_name(f"{path.name}.{label}"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{label}-{n}")
    os.rename(path, target)
    _fsync_dir(path.parent)
    return target


def remove_stale_staging(parent: str | Path, name: str = "*") -> None:
    """Delete staging folders left in ``parent`` by a process killed inside :func:`atomic_directory`
    (of the directory ``name`` only, if given). Only their writer may call it: a live writer's
    staging folder looks the same."""
    pattern = ".*.tmp-*" if name == "*" else f".{glob.escape(name)}.tmp-*"
    for stale in Path(parent).glob(pattern):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


LOCK_NAME = ".lock"


class DirectoryLocked(RuntimeError):
    """Another process (or another object of this one) holds the lock of a directory."""


def lock_beside(path: str | Path) -> Path:
    """The lock file of an entry that is written whole (an output folder, a cache entry): ``.<name>.lock`` beside it."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


def open_lock_file(path: str | Path, create: bool = True) -> int:
    """A descriptor of the lock file ``path`` (created if missing, unless not ``create``).

    A symbolic link (or any entry that is not a plain file of its own) planted at ``path`` is
    refused, never followed: writing who holds a lock must not overwrite a file elsewhere.
    """
    path = Path(path)
    flags = (os.O_RDWR | os.O_CREAT if create else os.O_RDONLY) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP and os.path.islink(path):
            raise _refused_lock_file(path, f"a symbolic link (to {os.readlink(path)})") from None
        raise write_error(path, exc) from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise _refused_lock_file(path, "a second name of another file" if stat.S_ISREG(info.st_mode) else "no file")
    return fd


def _refused_lock_file(path: Path, what: str) -> WriteError:
    reason = f"this lock file is {what}, which is never followed or written"
    return WriteError(path, None, reason, advice="remove it (tokenformer creates its lock files itself)")


class DirectoryLock:
    """An exclusive lock on a directory: ``fcntl.flock`` on ``<directory>/.lock`` (or on
    ``lock_file``), held until :meth:`release`, the end of a ``with`` block or the end of the process.

    The kernel drops the lock when its holder dies, however it dies, so a lock file left by a
    killed process is simply taken over; the file only records who holds the lock (pid, host,
    since when) for the error that a second writer gets. With ``wait`` a second writer waits
    for the first (saying so on stderr) instead. The lock file is opened with
    :func:`open_lock_file`: never through a symbolic link. Where ``flock`` is missing (not POSIX)
    or refused by the file system, the directory is used unlocked, with a warning for the latter.
    """

    def __init__(self, directory: str | Path, lock_file: str | Path | None = None, wait: bool = False) -> None:
        self.directory = Path(directory)
        self._fd: int | None = None
        try:
            import fcntl
        except ImportError:
            return
        path = Path(lock_file) if lock_file is not None else self.directory / LOCK_NAME
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(path, exc) from exc
        fd = open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            if not wait:
                os.close(fd)
                raise DirectoryLocked(
                    f"{self.directory} is in use by another writer ({holder}; lock file {path}); "
                    "wait for it to finish, or write somewhere else"
                ) from None
            print(f"waiting for {holder} to finish writing {self.directory}", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # a file system without locks
            os.close(fd)
            import warnings

            warnings.warn(f"cannot lock {path} ({exc.strerror}): a second writer would not be stopped", stacklevel=2)
            return
        self._fd = fd
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        except OSError as exc:
            self.release()
            raise write_error(path, exc) from exc

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _lock_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode())
        pid, host, since = holder["pid"], holder["host"], holder["since"]
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
    if pid == os.getpid() and host == socket.gethostname():
        return f"this process, pid {pid}, since {since}: close the other writer of this directory first"
    return f"pid {pid} on host {host}, since {since}"


@contextmanager
def flocked(path: str | Path, shared: bool = False, wait: bool = True) -> Iterator[bool]:
    """Hold ``fcntl.flock`` on the lock file ``path`` (shared, or exclusive) while inside; yields
    whether the caller may go on: False only when ``wait`` is off and another holds the lock.

    Where locks are missing (not POSIX) or the lock file cannot be made (a read-only folder, for
    a reader), it yields True unlocked: the lock orders writers and readers that can take it.
    """
    try:
        import fcntl
    except ImportError:
        yield True
        return
    try:
        fd = open_lock_file(path)
    except WriteError as exc:
        if not shared or exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        try:
            fd = open_lock_file(path, create=False)  # a reader may lock a file it cannot write
        except WriteError:
            yield True
            return
    try:
        operation = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(fd, operation if wait else operation | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError:  # a file system without locks
            yield True
            return
        yield True
    finally:
        os.close(fd)


@contextmanager
def claim_output(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """Claim the output directory ``path`` for a command that writes it whole; inside, write it
    with :func:`atomic_directory`.

    A second writer of the same ``path`` is refused while the first is inside (the lock is
    ``.<name>.lock`` beside it, :func:`lock_beside`); staging folders of a writer of ``path`` that
    was killed are deleted; an existing ``path`` is refused unless ``replace``. All of this
    happens before the command does its work, so that it fails early.
    """
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise ValueError(f"output directory {str(path)!r} is invalid; allowed: a path that names a new directory")
    with DirectoryLock(path, lock_file=lock_beside(path)):
        remove_stale_staging(path.parent, path.name)
        if os.path.lexists(path) and not replace:
            raise FileExistsError(f"{path} already exists; refusing to overwrite it")
        yield path
