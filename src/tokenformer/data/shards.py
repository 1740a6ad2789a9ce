"""Tokenize once into memory-mapped shards; a deterministic train/validation split; batches.

Layout of a shard directory (built atomically, reused while corpus, tokenizer and split agree)::

    meta.json             dtype, vocab size, token counts per file, what it was built from
    train-00000.bin ...   raw token ids (uint16 when the vocab fits, else uint32)
    val-00000.bin ...

The token stream of all documents (each followed by the end-of-text id, when the tokenizer has
one) is cut into chunks of ``chunk_tokens``; chunk ``i`` goes to validation when
``frac(i * golden_ratio) < val_fraction``. That spreads validation evenly over the corpus,
gives exactly the requested fraction in the limit, always includes chunk 0, and needs no RNG.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_directory, atomic_write_text
from .corpus import Document, fingerprint
from .tokenizer import Tokenizer

SPLITS = ("train", "val")
META_NAME = "meta.json"
GOLDEN = (math.sqrt(5) - 1) / 2
FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a ``vocab_size`` vocabulary."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size={vocab_size} does not fit in uint32 token ids; allowed: at most 2**32")


def is_validation_chunk(index: int, val_fraction: float) -> bool:
    return (index * GOLDEN) % 1.0 < val_fraction


class _ShardWriter:
    """Appends ids of one split to ``<split>-NNNNN.bin`` files of at most ``shard_tokens`` ids."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.counts: list[int] = []
        self._file = None

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._file is None or self.counts[-1] == self.shard_tokens:
                self._roll()
            room = self.shard_tokens - self.counts[-1]
            part, ids = ids[:room], ids[room:]
            self._file.write(part.astype(self.dtype).tobytes())
            self.counts[-1] += len(part)

    def _roll(self) -> None:
        self.close()
        self._file = open(self.directory / f"{self.split}-{len(self.counts):05d}.bin", "wb")
        self.counts.append(0)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def shard_key(corpus_hash: str, tokenizer: Tokenizer, val_fraction: float, chunk_tokens: int) -> str:
    spec = json.dumps([FORMAT_VERSION, corpus_hash, tokenizer.fingerprint, val_fraction, chunk_tokens])
    return hashlib.sha256(spec.encode()).hexdigest()[:20]


def build_shards(
    documents: Sequence[Document],
    tokenizer: Tokenizer,
    cache_dir: str | Path,
    val_fraction: float = 0.05,
    chunk_tokens: int = 2048,
    shard_tokens: int = 1 << 26,
) -> Path:
    """Tokenize ``documents`` into ``cache_dir/shards/<key>`` (skipped when it already exists)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} is out of range; allowed: 0 < val_fraction < 1")
    corpus_hash = fingerprint(documents)
    directory = Path(cache_dir) / "shards" / shard_key(corpus_hash, tokenizer, val_fraction, chunk_tokens)
    if (directory / META_NAME).is_file():
        return directory
    dtype = token_dtype(tokenizer.vocab_size)
    with atomic_directory(directory) as staging:
        writers = {split: _ShardWriter(staging, split, dtype, shard_tokens) for split in SPLITS}
        pending = np.zeros(0, dtype=np.int64)
        chunk = 0
        for doc in documents:
            ids = tokenizer.encode_long(doc.text) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
            pending = np.concatenate((pending, np.asarray(ids, dtype=np.int64)))
            while len(pending) >= chunk_tokens:
                split = "val" if is_validation_chunk(chunk, val_fraction) else "train"
                writers[split].write(pending[:chunk_tokens])
                pending, chunk = pending[chunk_tokens:], chunk + 1
        if len(pending):
            writers["val" if is_validation_chunk(chunk, val_fraction) else "train"].write(pending)
        for writer in writers.values():
            writer.close()
        meta = {
            "format": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "tokenizer": tokenizer.fingerprint,
            "corpus": corpus_hash,
            "documents": len(documents),
            "val_fraction": val_fraction,
            "chunk_tokens": chunk_tokens,
            "files": {
                split: [[f"{split}-{i:05d}.bin", n] for i, n in enumerate(writers[split].counts)] for split in SPLITS
            },
        }
        atomic_write_text(staging / META_NAME, json.dumps(meta, indent=2) + "\n")
    return directory


@dataclass
class TokenShards:
    """Memory-mapped token ids of a shard directory, split by split."""

    directory: Path
    meta: dict
    arrays: dict[str, list[np.ndarray]]

    @classmethod
    def open(cls, directory: str | Path) -> TokenShards:
        directory = Path(directory)
        meta_path = directory / META_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"no {META_NAME} in {directory}: not a token shard directory")
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        arrays: dict[str, list[np.ndarray]] = {}
        for split in SPLITS:
            arrays[split] = []
            for name, count in meta["files"][split]:
                path = directory / name
                if path.stat().st_size != count * dtype.itemsize:
                    raise ValueError(
                        f"token shard {path} has {path.stat().st_size} bytes, expected {count * dtype.itemsize}"
                    )
                arrays[split].append(np.memmap(path, dtype=dtype, mode="r", shape=(count,)))
        return cls(directory, meta, arrays)

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
        return windows_to_batch(rows)

    def even_windows(self, split: str, seq_len: int, max_windows: int | None = None) -> list[np.ndarray]:
        """Non-overlapping ``seq_len + 1`` windows; at most ``max_windows``, spread evenly over the split."""
        self.check_window(split, seq_len)
        return even_windows(self._split(split), seq_len, max_windows)


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
