"""Tokenizers through Hugging Face ``tokenizers``: a byte-level BPE trained on the corpus (cached by
content hash), or any ``tokenizer.json`` (the released models use GPT-NeoX-20B's)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..io import atomic_write_text, file_or_inside
from .corpus import Document, fingerprint

EOS_TOKEN = "<|endoftext|>"
# Byte-level BPE starts from the 256 byte symbols plus the end-of-text token.
MIN_BPE_VOCAB = 257
TOKENIZER_NAME = "tokenizer.json"
# Texts are encoded in pieces of about this many characters (split at line ends) so that
# encode_batch can use every core; byte-level pre-tokenisation never joins a newline to the
# letter after it, so the ids equal those of encoding the whole text at once.
ENCODE_PIECE_CHARS = 1 << 16


def default_cache_dir() -> Path:
    return Path(os.environ.get("TOKENFORMER_CACHE", Path.home() / ".cache" / "tokenformer"))


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the few things training needs: vocab size, end-of-text id, a hash."""

    def __init__(self, backend, json_text: str) -> None:
        self.backend = backend
        self.json_text = json_text
        self.fingerprint = hashlib.sha256(json_text.encode("utf-8")).hexdigest()
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.eos_token = next((t for t in (EOS_TOKEN, "</s>", "<eos>") if backend.token_to_id(t) is not None), None)
        self.eos_id = backend.token_to_id(self.eos_token) if self.eos_token is not None else None

    @classmethod
    def from_json(cls, json_text: str) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        return cls(Backend.from_str(json_text), json_text)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_long(self, text: str) -> list[int]:
        """``encode`` for texts of any length, in line-aligned pieces encoded in parallel."""
        pieces = list(_pieces(text))
        ids: list[int] = []
        for encoding in self.backend.encode_batch(pieces, add_special_tokens=False):
            ids += encoding.ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.json_text)


def _pieces(text: str) -> Iterable[str]:
    start = 0
    while start < len(text):
        end = text.find("\n", start + ENCODE_PIECE_CHARS)
        # Split after a newline only when a non-space follows, where pre-tokenisation splits anyway.
        while end != -1 and end + 1 < len(text) and text[end + 1].isspace():
            end = text.find("\n", end + 1)
        end = len(text) if end == -1 else end + 1
        yield text[start:end]
        start = end


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` (or a directory holding one)."""
    path = file_or_inside(path, TOKENIZER_NAME, "tokenizer file")
    try:
        return Tokenizer.from_json(path.read_text(encoding="utf-8"))
    except Exception as exc:  # tokenizers raises its own Exception type for malformed files
        raise ValueError(f"cannot read tokenizer {path}: {exc}") from exc


def train_bpe(documents: Sequence[Document], vocab_size: int, cache_dir: str | Path | None = None) -> Tokenizer:
    """A byte-level BPE of ``vocab_size`` ids (``<|endoftext|>`` is id 0) trained on ``documents``.

    The result is cached under ``cache_dir/tokenizers`` by the corpus's content hash and the
    vocab size, so a second run on the same text loads it instead of training again.
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB:
        raise ValueError(
            f"vocab_size={vocab_size!r} is too small for a byte-level BPE; allowed: an integer >= {MIN_BPE_VOCAB}"
        )
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / "tokenizers" / f"bpe-{vocab_size}-{fingerprint(documents)[:16]}.json"
    if path.is_file():
        return load_tokenizer(path)
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator((piece for doc in documents for piece in _pieces(doc.text)), trainer=trainer)
    tokenizer = Tokenizer(backend, backend.to_str())
    tokenizer.save(path)
    return tokenizer


def get_tokenizer(
    spec: str, documents: Sequence[Document], vocab_size: int, cache_dir: str | Path | None = None
) -> Tokenizer:
    """``spec="bpe"`` trains (or loads the cached) byte-level BPE; anything else is a tokenizer.json path."""
    if spec == "bpe":
        return train_bpe(documents, vocab_size, cache_dir)
    return load_tokenizer(spec)
