"""Tokenize once into memory-mapped shards; a deterministic train/validation split; batches.

Layout of a shard directory (reused while corpus, tokenizer and split agree)::

    meta.json             dtype, vocab size, token count and CRC-32 per file, what it was built from
    train-00000.bin ...   raw token ids (uint16 when the vocab fits, else uint32)
    val-00000.bin ...

The token stream of all documents (each followed by the end-of-text id, when the tokenizer has
one) is cut into chunks of ``chunk_tokens``; chunk ``i`` goes to validation when
``frac(i * golden_ratio) < val_fraction``. That spreads validation evenly over the corpus,
gives exactly the requested fraction in the limit, always includes chunk 0, and needs no RNG.

Building streams the corpus: each document is cut into pieces (``Tokenizer.pieces``), the pieces
are grouped into batches of about ``BATCH_CHARS`` characters, ``workers`` threads encode batches
at once, and their ids are appended to the shard files in corpus order. Memory holds a few
batches, never the corpus or its ids. The build happens in ``.<key>.partial`` beside the final
directory and records every ``PROGRESS_SECONDS`` how far it got (``progress.json``), so a build
that was interrupted continues from there; the finished directory is renamed into place. A lock makes a
second process that needs the same shards wait for the first and use its result.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..io import _fsync_dir, atomic_write_text, fsync_tree, remove_directory, writing
from .cache import build_lock
from .corpus import Corpus, Document
from .tokenizer import ENCODE_PIECE_CHARS, Tokenizer

SPLITS = ("train", "val")
META_NAME = "meta.json"
PROGRESS_NAME = "progress.json"
GOLDEN = (math.sqrt(5) - 1) / 2
# 2: files carry a CRC-32; documents are cut only where the tokenizer's ids stay those of the whole text.
FORMAT_VERSION = 2
# Characters of text per encoded batch.
BATCH_CHARS = 1 << 20
# A build records how far it got (syncing its files) after a batch when this long has passed since
# the last record: an interrupted build loses at most about this much work.
PROGRESS_SECONDS = 10.0


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a ``vocab_size`` vocabulary."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size={vocab_size} does not fit in uint32 token ids; allowed: at most 2**32")


def is_validation_chunk(index: int, val_fraction: float) -> bool:
    return (index * GOLDEN) % 1.0 < val_fraction


def default_workers() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def rebuild_hint(directory: Path) -> str:
    return f"delete {directory} to rebuild it (it is a cache: the next run tokenizes the corpus again)"


class _ShardWriter:
    """Appends ids of one split to ``<split>-NNNNN.bin`` files of at most ``shard_tokens`` ids.

    ``files`` (``[name, token count, CRC-32]`` per file) is the state a resumed build starts from:
    the last file is cut back to its recorded count, files after it are deleted.
    """

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int, files: list) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.files = [list(f) for f in files]
        self._file = None
        recorded = {name for name, _, _ in self.files}
        for path in directory.glob(f"{split}-*.bin"):
            if path.name not in recorded:
                path.unlink()
        if self.files:
            name, count, _ = self.files[-1]
            with writing(directory / name):
                self._file = open(directory / name, "r+b")
                self._file.truncate(count * dtype.itemsize)
            self._file.seek(0, os.SEEK_END)

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._file is None or self.files[-1][1] == self.shard_tokens:
                self._roll()
            room = self.shard_tokens - self.files[-1][1]
            part, ids = ids[:room], ids[room:]
            data = part.astype(self.dtype).tobytes()
            with writing(self._path):
                self._file.write(data)
            self.files[-1][1] += len(part)
            self.files[-1][2] = zlib.crc32(data, self.files[-1][2])

    @property
    def _path(self) -> Path:
        return self.directory / self.files[-1][0]

    def _roll(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.files):05d}.bin"
        with writing(self.directory / name):
            self._file = open(self.directory / name, "wb")
        self.files.append([name, 0, 0])

    def sync(self) -> None:
        if self._file is not None:
            with writing(self._path):
                self._file.flush()
                os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None


def shard_key(corpus_hash: str, tokenizer: Tokenizer, val_fraction: float, chunk_tokens: int) -> str:
    spec = json.dumps([FORMAT_VERSION, corpus_hash, tokenizer.fingerprint, val_fraction, chunk_tokens])
    return hashlib.sha256(spec.encode()).hexdigest()[:20]


def build_shards(
    documents: Corpus | Sequence[Document],
    tokenizer: Tokenizer,
    cache_dir: str | Path,
    val_fraction: float = 0.05,
    chunk_tokens: int = 2048,
    shard_tokens: int = 1 << 26,
    workers: int | None = None,
    progress: bool = False,
) -> Path:
    """Tokenize ``documents`` into ``cache_dir/shards/<key>`` and return that directory.

    When the directory exists and its files check out (sizes and CRC-32s), it is returned as is;
    a damaged one is rebuilt, with a warning naming what was wrong. ``workers``: batches encoded
    at once (default: the usable CPU cores); each batch is spread over cores too unless
    ``TOKENIZERS_PARALLELISM=false``. ``progress`` shows a progress bar.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} is out of range; allowed: 0 < val_fraction < 1")
    for name, value in (("chunk_tokens", chunk_tokens), ("shard_tokens", shard_tokens)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid; allowed: an integer >= 1")
    workers = default_workers() if workers is None else workers
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers={workers!r} is invalid; allowed: an integer >= 1")
    corpus = documents if isinstance(documents, Corpus) else Corpus(documents)
    key = shard_key(corpus.fingerprint(), tokenizer, val_fraction, chunk_tokens)
    directory = Path(cache_dir) / "shards" / key
    if _reusable(directory):
        return directory
    with build_lock(directory):
        if _reusable(directory, warn=False):  # built by another process while this one waited
            return directory
        if directory.exists():
            remove_directory(directory)
        build = _Build(directory, key, corpus, tokenizer, val_fraction, chunk_tokens, shard_tokens)
        build.run(workers, progress)
    return directory


def _reusable(directory: Path, warn: bool = True) -> bool:
    """Whether ``directory`` holds complete, undamaged shards (a damaged one is reported)."""
    if not directory.exists():
        return False
    try:
        TokenShards.open(directory, verify=True)
    except (ValueError, OSError) as exc:
        if warn:
            print(f"warning: cached token shards are damaged, rebuilding them: {exc}", file=sys.stderr, flush=True)
        return False
    return True


def _with_last(items: Iterable) -> Iterator[tuple[object, bool]]:
    iterator = iter(items)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for item in iterator:
        yield current, False
        current = item
    yield current, True


@dataclass
class _Batch:
    pieces: list[str]
    ends: list[bool]  # whether a piece ends its document (the end-of-text id follows it)
    chars: int

    @property
    def documents(self) -> int:
        return sum(self.ends)


class _Build:
    """One build of a shard directory in its ``.partial`` staging directory (resumed when one is there)."""

    def __init__(self, directory, key, corpus, tokenizer, val_fraction, chunk_tokens, shard_tokens) -> None:
        self.directory, self.corpus, self.tokenizer = directory, corpus, tokenizer
        self.val_fraction, self.chunk_tokens = val_fraction, chunk_tokens
        self.partial = directory.parent / f".{directory.name}.partial"
        self.dtype = token_dtype(tokenizer.vocab_size)
        # Everything that decides the batches and files: a partial build made otherwise starts over.
        self.plan = {
            "format": FORMAT_VERSION,
            "key": key,
            "batch_chars": BATCH_CHARS,
            "piece_chars": ENCODE_PIECE_CHARS,
            "separators": tokenizer.separators,
            "shard_tokens": shard_tokens,
        }

    def batches(self) -> Iterator[_Batch]:
        batch = _Batch([], [], 0)
        for doc in self.corpus:
            # A document without text still contributes its end-of-text id.
            empty = True
            for piece, last in _with_last(self.tokenizer.pieces(doc.blocks())):
                empty = False
                batch.pieces.append(piece)
                batch.ends.append(last)
                batch.chars += len(piece)
                if batch.chars >= BATCH_CHARS:
                    yield batch
                    batch = _Batch([], [], 0)
            if empty:
                batch.pieces.append("")
                batch.ends.append(True)
        if batch.pieces:
            yield batch

    def encode(self, batch: _Batch) -> np.ndarray:
        eos = [] if self.tokenizer.eos_id is None else [self.tokenizer.eos_id]
        ids = self.tokenizer.encode_pieces(batch.pieces)
        pieces = zip(ids, batch.ends, strict=True)
        return np.concatenate([np.asarray(piece + eos if end else piece, dtype=np.int64) for piece, end in pieces])

    def _fresh(self) -> dict:
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        files = {split: [] for split in SPLITS}
        return {"plan": self.plan, "batches": 0, "chars": 0, "documents": 0, "chunk": 0, "pending": [], "files": files}

    def _saved(self) -> dict | None:
        """The progress of an interrupted build of the same plan, if its files hold what it records."""
        try:
            state = json.loads((self.partial / PROGRESS_NAME).read_text())
            if state.get("plan") != self.plan:
                return None
            for name, count, crc in (f for split in SPLITS for f in state["files"][split]):
                with open(self.partial / name, "rb") as f:
                    data = f.read(count * self.dtype.itemsize)
                if len(data) != count * self.dtype.itemsize or zlib.crc32(data) != crc:
                    return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return state

    def run(self, workers: int, progress: bool) -> None:
        from tqdm.auto import tqdm

        state = self._saved() or self._fresh()
        batches = iter(self.batches())
        skipped = sum(batch.chars for _, batch in zip(range(state["batches"]), batches, strict=False))
        if skipped != state["chars"]:  # the corpus reads differently than when the progress was recorded
            state, batches = self._fresh(), iter(self.batches())
        shard_tokens = self.plan["shard_tokens"]
        writers = {s: _ShardWriter(self.partial, s, self.dtype, shard_tokens, state["files"][s]) for s in SPLITS}
        pending, chunk = np.asarray(state["pending"], dtype=np.int64), state["chunk"]
        bar = tqdm(initial=state["chars"], unit="char", unit_scale=True, desc="tokenizing", disable=not progress)
        recorded = time.monotonic()
        encoded = _in_order(self.encode, batches, workers)
        try:
            for batch, ids in encoded:
                pending = np.concatenate((pending, ids))
                full = len(pending) // self.chunk_tokens * self.chunk_tokens
                for start in range(0, full, self.chunk_tokens):
                    writers[self.split_of(chunk)].write(pending[start : start + self.chunk_tokens])
                    chunk += 1
                pending = pending[full:]
                state.update(batches=state["batches"] + 1, chunk=chunk)
                state.update(chars=state["chars"] + batch.chars, documents=state["documents"] + batch.documents)
                if time.monotonic() - recorded >= PROGRESS_SECONDS:
                    state.update(pending=pending.tolist(), files={s: w.files for s, w in writers.items()})
                    for writer in writers.values():
                        writer.sync()
                    atomic_write_text(self.partial / PROGRESS_NAME, json.dumps(state))
                    recorded = time.monotonic()
                bar.update(batch.chars)
            writers[self.split_of(chunk)].write(pending)
        finally:
            encoded.close()  # stops the encoding threads when something failed
            bar.close()
            for writer in writers.values():
                writer.close()
        meta = {
            "format": FORMAT_VERSION,
            "dtype": self.dtype.name,
            "vocab_size": self.tokenizer.vocab_size,
            "tokenizer": self.tokenizer.fingerprint,
            "corpus": self.corpus.fingerprint(),
            "val_fraction": self.val_fraction,
            "chunk_tokens": self.chunk_tokens,
            "documents": state["documents"],
            "characters": state["chars"],
            "files": {s: w.files for s, w in writers.items()},
        }
        atomic_write_text(self.partial / META_NAME, json.dumps(meta, indent=2) + "\n")
        (self.partial / PROGRESS_NAME).unlink(missing_ok=True)
        fsync_tree(self.partial)
        os.rename(self.partial, self.directory)
        _fsync_dir(self.directory.parent)

    def split_of(self, chunk: int) -> str:
        return "val" if is_validation_chunk(chunk, self.val_fraction) else "train"


def _in_order(encode: Callable, batches: Iterator, workers: int) -> Iterator[tuple[object, np.ndarray]]:
    """``(batch, encode(batch))`` in order, ``workers`` batches encoded at once by threads
    (``encode`` releases the GIL while the tokenizer works); at most ``workers + 1`` in memory."""
    if workers == 1:
        for batch in batches:
            yield batch, encode(batch)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="tokenize")
    try:
        window: deque = deque()
        for batch in batches:
            window.append((batch, pool.submit(encode, batch)))
            if len(window) > workers:
                done, future = window.popleft()
                yield done, future.result()
        while window:
            done, future = window.popleft()
            yield done, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class TokenShards:
    """Memory-mapped token ids of a shard directory, split by split."""

    directory: Path
    meta: dict
    arrays: dict[str, list[np.ndarray]]

    @classmethod
    def open(cls, directory: str | Path, verify: bool = False) -> TokenShards:
        """Map the shards of ``directory``; their sizes are checked, and with ``verify`` their
        CRC-32s too (which reads every file). A damaged file raises an error naming it."""
        directory = Path(directory)
        meta_path = directory / META_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"no {META_NAME} in {directory}: not a token shard directory")
        try:
            meta = json.loads(meta_path.read_text())
            dtype = np.dtype(meta["dtype"])
            files = {split: [(directory / f[0], int(f[1]), *f[2:]) for f in meta["files"][split]] for split in SPLITS}
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"token shard index {meta_path} is unreadable ({exc}); {rebuild_hint(directory)}") from exc
        arrays: dict[str, list[np.ndarray]] = {}
        for split in SPLITS:
            arrays[split] = []
            for path, count, *crc in files[split]:
                size = path.stat().st_size if path.is_file() else None
                if size != count * dtype.itemsize:
                    found = "is missing" if size is None else f"has {size} bytes"
                    raise ValueError(
                        f"token shard {path} {found}, expected {count * dtype.itemsize}; {rebuild_hint(directory)}"
                    )
                array = np.memmap(path, dtype=dtype, mode="r", shape=(count,))
                if verify and crc and zlib.crc32(array) != crc[0]:
                    raise ValueError(
                        f"token shard {path} is corrupt (its CRC-32 differs from the one recorded in {meta_path}); "
                        f"{rebuild_hint(directory)}"
                    )
                arrays[split].append(array)
        return cls(directory, meta, arrays)

    def _check_ids(self, split: str, rows: Sequence[np.ndarray]) -> None:
        """Ids at or above the vocab size can only come from a damaged shard file: name it."""
        vocab_size = self.meta["vocab_size"]
        if max((int(row.max()) for row in rows if len(row)), default=0) >= vocab_size:
            names = [
                f"{self.directory / name}"
                for (name, *_), array in zip(self.meta["files"][split], self._split(split), strict=True)
                if len(array) and int(array.max()) >= vocab_size
            ]
            raise ValueError(
                f"token shard {', '.join(names)} holds ids >= the vocab size {vocab_size}: the file is corrupt; "
                f"{rebuild_hint(self.directory)}"
            )

    def num_tokens(self, split: str) -> int:
        return sum(len(a) for a in self._split(split))

    def _split(self, split: str) -> list[np.ndarray]:
        if split not in self.arrays:
            raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        return self.arrays[split]

    def check_window(self, split: str, seq_len: int) -> None:
        longest = max((len(a) for a in self._split(split)), default=0)
        if longest < seq_len + 1:
            raise ValueError(
                f"the {split} split has only {self.num_tokens(split)} tokens (longest shard {longest}); "
                f"seq_len={seq_len} needs at least {seq_len + 1}: "
                "use a smaller seq_len, another val_fraction or more text"
            )

    def random_windows(
        self, split: str, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` windows at uniformly random offsets (nanoGPT style): inputs and next-token targets."""
        self.check_window(split, seq_len)
        arrays = [a for a in self._split(split) if len(a) > seq_len]
        starts_per_array = np.array([len(a) - seq_len for a in arrays])
        offsets = torch.randint(int(starts_per_array.sum()), (batch_size,), generator=generator).numpy()
        bounds = np.cumsum(starts_per_array)
        which = np.searchsorted(bounds, offsets, side="right")
        rows = [
            arrays[w][o - (bounds[w] - starts_per_array[w]) :][: seq_len + 1]
            for w, o in zip(which, offsets, strict=True)
        ]
        self._check_ids(split, rows)
        return windows_to_batch(rows)

    def even_windows(self, split: str, seq_len: int, max_windows: int | None = None) -> list[np.ndarray]:
        """Non-overlapping ``seq_len + 1`` windows; at most ``max_windows``, spread evenly over the split."""
        self.check_window(split, seq_len)
        windows = even_windows(self._split(split), seq_len, max_windows)
        self._check_ids(split, windows)
        return windows


def even_windows(arrays: Sequence[np.ndarray], seq_len: int, max_windows: int | None = None) -> list[np.ndarray]:
    """Every ``seq_len + 1`` window that starts at a multiple of ``seq_len`` (targets do not overlap),
    thinned to ``max_windows`` evenly spaced ones when there are more."""
    windows = [a[s : s + seq_len + 1] for a in arrays for s in range(0, len(a) - seq_len, seq_len)]
    if max_windows is not None and len(windows) > max_windows:
        picks = np.linspace(0, len(windows) - 1, max_windows).round().astype(int)
        windows = [windows[i] for i in picks]
    return windows


def windows_to_batch(rows: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.from_numpy(np.stack(rows).astype(np.int64))
    return data[:, :-1], data[:, 1:]
