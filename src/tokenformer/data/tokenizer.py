"""Tokenizers through Hugging Face ``tokenizers``: a byte-level BPE trained on the corpus (cached by
content hash), or any ``tokenizer.json`` (the released models use GPT-NeoX-20B's)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import cached_property
from pathlib import Path

from ..io import atomic_write_text, file_or_inside
from .cache import build_lock, default_cache_dir
from .corpus import Corpus, Document

EOS_TOKEN = "<|endoftext|>"
# Byte-level BPE starts from the 256 byte symbols plus the end-of-text token.
MIN_BPE_VOCAB = 257
TOKENIZER_NAME = "tokenizer.json"
# Texts are encoded in pieces of about this many characters, so that encode_batch can use every
# core and no document needs to be in memory whole. A piece ends just before a separator (a
# space or newline) between two non-space characters, where tokenizers split words anyway:
# each tokenizer is probed for which separators leave its ids unchanged (see safe_separators).
ENCODE_PIECE_CHARS = 1 << 16
SEPARATORS = " \n"
# Text with every kind of neighbour a separator can have; a separator is safe for a tokenizer
# when cutting this text before any of its occurrences leaves the ids unchanged.
PROBE_TEXT = (
    "It's 42 o'clock, isn't it? The caf\u00e9's na\u00efve \u00fcber-r\u00e9sum\u00e9 costs $3.14!\n"
    "\u65e5\u672c\u8a9e\u306e\u6587\u7ae0\u3002\nSecond line\twith a tab\n  indented  twice\n\n"
    "Paragraph: (a) x=1; [b] y_2 {c}\n\"quoted\" words -- and 'single' ones\n\u0394\u03b5\u03bb\u03c4\u03b1 end"
)


def safe_separators(encode: Callable[[str], list]) -> str:
    """The separators before which ``encode`` may cut a text without changing its result."""
    return "".join(
        sep
        for sep in SEPARATORS
        if all(
            encode(PROBE_TEXT[:cut]) + encode(PROBE_TEXT[cut:]) == encode(PROBE_TEXT)
            for cut in _cuts(PROBE_TEXT, _cut_pattern(sep), 0)
        )
    )


def _cut_pattern(separators: str) -> re.Pattern | None:
    return re.compile(rf"(?<=\S)[{re.escape(separators)}](?=\S)") if separators else None


def _cuts(text: str, pattern: re.Pattern | None, start: int) -> Iterator[int]:
    return (m.start() for m in pattern.finditer(text, start)) if pattern is not None else iter(())


def split_pieces(blocks: Iterable[str], separators: str, piece_chars: int | None = None) -> Iterator[str]:
    """The text of ``blocks`` (one document) in pieces of at least ``piece_chars`` characters
    (the last may be shorter), each cut just before a separator between two non-space characters.

    Without such a place (or without separators) a piece grows until one comes: the document
    whole, at worst.
    """
    piece_chars = piece_chars or ENCODE_PIECE_CHARS
    pattern = _cut_pattern(separators)
    carry, searched = "", 0  # carry[:searched] has no place to cut past a piece's start + piece_chars
    for block in blocks:
        carry += block
        start = 0
        while len(carry) - start > piece_chars:
            cut = next(_cuts(carry, pattern, max(start + piece_chars, searched)), None)
            if cut is None:  # a separator at the very end may yet be followed by a non-space
                searched = len(carry) - 1
                break
            yield carry[start:cut]
            start = cut
        carry, searched = carry[start:], max(searched - start, 0)
    if carry:
        yield carry


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

    @cached_property
    def separators(self) -> str:
        """Where this tokenizer's texts may be cut into pieces (see :func:`safe_separators`)."""
        return safe_separators(self.encode)

    def pieces(self, blocks: Iterable[str]) -> Iterator[str]:
        """A document's text (given as blocks) in pieces whose ids, concatenated, are the whole text's."""
        return split_pieces(blocks, self.separators)

    def encode_pieces(self, pieces: Sequence[str]) -> list[list[int]]:
        """The ids of each piece; the pieces are encoded in parallel (see ``TOKENIZERS_PARALLELISM``)."""
        return [e.ids for e in self.backend.encode_batch_fast(list(pieces), add_special_tokens=False)]

    def encode_long(self, text: str) -> list[int]:
        """``encode`` for texts of any length, in pieces encoded in parallel."""
        return [i for ids in self.encode_pieces(list(self.pieces([text]))) for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.json_text)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` (or a directory holding one)."""
    path = file_or_inside(path, TOKENIZER_NAME, "tokenizer file")
    try:
        return Tokenizer.from_json(path.read_text(encoding="utf-8"))
    except Exception as exc:  # tokenizers raises its own Exception type for malformed files
        raise ValueError(f"cannot read tokenizer {path}: {exc}") from exc


def train_bpe(
    documents: Corpus | Sequence[Document], vocab_size: int, cache_dir: str | Path | None = None
) -> Tokenizer:
    """A byte-level BPE of ``vocab_size`` ids (``<|endoftext|>`` is id 0) trained on ``documents``.

    The text is streamed to the trainer piece by piece, so a :class:`Corpus` is never in memory
    whole. The result is cached under ``cache_dir/tokenizers`` by the corpus's content hash and
    the vocab size, so a second run on the same text loads it instead of training again; two
    processes training the same one at once train it once.
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB:
        raise ValueError(
            f"vocab_size={vocab_size!r} is too small for a byte-level BPE; allowed: an integer >= {MIN_BPE_VOCAB}"
        )
    corpus = documents if isinstance(documents, Corpus) else Corpus(documents)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / "tokenizers" / f"bpe-{vocab_size}-{corpus.fingerprint()[:16]}.json"
    if path.is_file():
        return load_tokenizer(path)
    with build_lock(path):
        if path.is_file():  # trained by another process while this one waited
            return load_tokenizer(path)
        tokenizer = _train_bpe(corpus, vocab_size)
        tokenizer.save(path)
    return tokenizer


def _train_bpe(corpus: Corpus, vocab_size: int) -> Tokenizer:
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
    # The trainer counts the words of each piece: cut where words split, they are the whole texts' words.
    separators = safe_separators(lambda text: [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text)])
    pieces = (piece for doc in corpus for piece in split_pieces(doc.blocks(), separators))
    backend.train_from_iterator(pieces, trainer=trainer)
    return Tokenizer(backend, backend.to_str())


def get_tokenizer(
    spec: str, documents: Corpus | Sequence[Document], vocab_size: int, cache_dir: str | Path | None = None
) -> Tokenizer:
    """``spec="bpe"`` trains (or loads the cached) byte-level BPE; anything else is a tokenizer.json path."""
    if spec == "bpe":
        return train_bpe(documents, vocab_size, cache_dir)
    return load_tokenizer(spec)
