"""Tokenizing a corpus as a stream: bounded memory, parallel batches, resumable, one build per cache entry."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import NEOX_TOKENIZER, expected_splits, shard_splits, split_stream, word_level_tokenizer

from tokenformer.data import Corpus, Tokenizer, TokenShards, build_shards, kjv_documents, load_tokenizer, train_bpe
from tokenformer.data import corpus as corpus_module
from tokenformer.data import shards as shards_module
from tokenformer.data import tokenizer as tokenizer_module
from tokenformer.data.cache import build_lock


@pytest.fixture
def small_pieces(monkeypatch):
    """Blocks, pieces and batches far smaller than the corpus, so that every boundary is crossed."""
    monkeypatch.setattr(corpus_module, "READ_CHARS", 3_001)
    monkeypatch.setattr(tokenizer_module, "ENCODE_PIECE_CHARS", 997)
    monkeypatch.setattr(shards_module, "BATCH_CHARS", 20_000)


@pytest.fixture
def corpus_dir(tmp_path, corpus_file):
    """Three files: the corpus file, one with Windows line ends, one with runs of spaces and blank lines."""
    directory = tmp_path / "corpus"
    directory.mkdir()
    text = corpus_file.read_text()
    (directory / "a.txt").write_text(text[:60_000])
    (directory / "b.txt").write_bytes(text[60_000:90_000].replace("\n", "\r\n").encode())
    (directory / "c.md").write_text(text[90_000:].replace(" ", "  ").replace("\n", " \n\n\n  ") + "tail  \n")
    return directory


def tokenizers_to_test(cache_dir, corpus_file):
    yield "bpe", train_bpe(Corpus(str(corpus_file)), 512, cache_dir)
    yield "word", word_level_tokenizer(corpus_file.read_text().split())
    if NEOX_TOKENIZER.is_file():
        yield "neox", load_tokenizer(NEOX_TOKENIZER)


def test_streamed_build_equals_whole_document_tokenization(tmp_path, corpus_dir, corpus_file, cache_dir, small_pieces):
    corpus = Corpus(str(corpus_dir))
    texts = [path.read_text() for path in sorted(corpus_dir.iterdir())]
    for name, tok in tokenizers_to_test(cache_dir, corpus_file):
        for workers in (1, 3):
            directory = build_shards(corpus, tok, tmp_path / f"{name}-{workers}", chunk_tokens=128, workers=workers)
            stored, expected = shard_splits(TokenShards.open(directory)), expected_splits(texts, tok, 128)
            for split in ("train", "val"):
                assert np.array_equal(stored[split], expected[split]), (name, workers, split)


def counting_encoder(monkeypatch, fail_at=None):
    """Counts the batches encoded; raises while encoding batch ``fail_at`` (1-based)."""
    calls = []
    encode = Tokenizer.encode_pieces

    def counted(self, pieces):
        calls.append(len(pieces))
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        return encode(self, pieces)

    monkeypatch.setattr(Tokenizer, "encode_pieces", counted)
    return calls


def test_an_interrupted_build_continues_where_it_stopped(tmp_path, corpus_dir, cache_dir, small_pieces, monkeypatch):
    monkeypatch.setattr(shards_module, "PROGRESS_SECONDS", 0.0)
    corpus = Corpus(str(corpus_dir))
    tok = word_level_tokenizer(" ".join(d.text for d in corpus).split())
    calls = counting_encoder(monkeypatch)
    whole = build_shards(corpus, tok, tmp_path / "whole", chunk_tokens=128, shard_tokens=4000, workers=1)
    batches = len(calls)
    assert batches > 4

    calls = counting_encoder(monkeypatch, fail_at=4)
    with pytest.raises(KeyboardInterrupt):
        build_shards(corpus, tok, tmp_path / "cut", chunk_tokens=128, shard_tokens=4000, workers=1)
    (partial,) = (tmp_path / "cut" / "shards").glob(".*.partial")
    assert json.loads((partial / "progress.json").read_text())["batches"] == 3

    calls = counting_encoder(monkeypatch)
    resumed = build_shards(corpus, tok, tmp_path / "cut", chunk_tokens=128, shard_tokens=4000, workers=1)
    assert len(calls) == batches - 3  # only what was left
    assert not partial.exists()
    assert json.loads((resumed / "meta.json").read_text()) == json.loads((whole / "meta.json").read_text())
    for name in sorted(p.name for p in whole.glob("*.bin")):
        assert (resumed / name).read_bytes() == (whole / name).read_bytes()


def test_a_build_waits_for_another_process_building_the_same_cache(tmp_path, corpus_file, monkeypatch):
    import threading

    docs = kjv_documents()[:1]
    tok = word_level_tokenizer(docs[0].text.split())
    reference = build_shards(docs, tok, tmp_path / "reference")
    directory = tmp_path / "cache" / "shards" / reference.name
    result = []
    with build_lock(directory):  # as another process building it would
        monkeypatch.setattr(Tokenizer, "encode_pieces", lambda *a: pytest.fail("built twice"))
        waiter = threading.Thread(target=lambda: result.append(build_shards(docs, tok, tmp_path / "cache")))
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive() and not result  # waiting for the lock
        import shutil

        shutil.copytree(reference, directory)  # the other process finishes
    waiter.join(timeout=60)
    assert result == [directory]


CHILD = """
import json, os, sys, time
from pathlib import Path
from tokenformer.data import Corpus, Tokenizer, build_shards, load_tokenizer
from tokenformer.data import shards

corpus, tokenizer, cache, go = sys.argv[1:]
shards.BATCH_CHARS = 30_000
encode, calls = Tokenizer.encode_pieces, []
def slow(self, pieces):
    calls.append(1)
    time.sleep(0.1)
    return encode(self, pieces)
Tokenizer.encode_pieces = slow
tok, corpus = load_tokenizer(tokenizer), Corpus(corpus)
while not Path(go).exists():
    time.sleep(0.01)
directory = build_shards(corpus, tok, cache, chunk_tokens=128)
print(json.dumps({"directory": str(directory), "batches": len(calls)}))
"""


def test_two_processes_building_one_new_cache_both_get_it(tmp_path, corpus_file):
    tok = word_level_tokenizer(corpus_file.read_text().split())
    tok.save(tmp_path / "tokenizer.json")
    go = tmp_path / "go"
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                str(corpus_file),
                str(tmp_path / "tokenizer.json"),
                str(tmp_path / "c"),
                str(go),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    time.sleep(0.2)
    go.touch()
    outputs = [child.communicate(timeout=300) for child in children]
    assert [child.returncode for child in children] == [0, 0], [err for _, err in outputs]
    results = [json.loads(out) for out, _ in outputs]
    assert results[0]["directory"] == results[1]["directory"]
    batches = sorted(r["batches"] for r in results)
    assert batches[0] == 0 and batches[1] > 1  # tokenized once
    stored = shard_splits(TokenShards.open(results[0]["directory"], verify=True))
    expected = expected_splits([corpus_file.read_text()], tok, 128)
    assert all(np.array_equal(stored[s], expected[s]) for s in ("train", "val"))


CAPPED = """
import resource, sys
from tokenformer.data import Corpus, build_shards, load_documents, load_tokenizer
from tokenformer.data import corpus, shards, tokenizer

path, tokenizer_path, cache, cap = sys.argv[1:]
corpus.READ_CHARS, tokenizer.ENCODE_PIECE_CHARS, shards.BATCH_CHARS = 1 << 18, 1 << 14, 1 << 16
tok, source = load_tokenizer(tokenizer_path), Corpus(path)
tok.separators  # probed before the cap: small, but not part of reading the corpus

def data_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024

resource.setrlimit(resource.RLIMIT_DATA, (data_bytes() + int(cap), resource.RLIM_INFINITY))
try:
    load_documents(path)
    print("the whole corpus fit under the cap")
except MemoryError:
    print("reading the whole corpus: MemoryError")
print(build_shards(source, tok, cache, workers=1))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA caps heap and mmap memory on Linux")
def test_a_corpus_larger_than_the_memory_cap_tokenizes_like_the_whole_text(tmp_path):
    text = "".join(d.text for d in kjv_documents()) * 3  # 12 MB
    path = tmp_path / "big.txt"
    path.write_text(text)
    tok = word_level_tokenizer(text.split())
    tok.save(tmp_path / "tokenizer.json")
    cap = 16 << 20  # bytes the child may allocate beyond what it holds before reading the corpus
    done = subprocess.run(
        [sys.executable, "-c", CAPPED, str(path), str(tmp_path / "tokenizer.json"), str(tmp_path / "cache"), str(cap)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "reading the whole corpus: MemoryError"  # the cap is below the corpus
    # The old path's ids: every whitespace-separated word looked up in the vocabulary, then end-of-text.
    vocab = tok.backend.get_vocab()
    stream = np.asarray([vocab[w] for w in text.split()] + [tok.eos_id])
    stored, expected = shard_splits(TokenShards.open(lines[1], verify=True)), split_stream(stream)
    assert all(np.array_equal(stored[s], expected[s]) for s in ("train", "val"))
