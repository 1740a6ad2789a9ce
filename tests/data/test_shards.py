import numpy as np
import pytest
import torch
from conftest import NEOX_TOKENIZER, expected_splits, shard_splits, word_level_tokenizer

from tokenformer.data import (
    Document,
    Tokenizer,
    TokenShards,
    build_shards,
    load_documents,
    load_tokenizer,
    token_dtype,
    train_bpe,
)


def test_dtype_follows_vocab_size():
    assert token_dtype(8192) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_large_vocab_is_stored_as_uint32(tmp_path):
    tok = word_level_tokenizer(f"w{i}" for i in range(70_000))
    ids = ["w69999", "w3", "w65536", "w12"] * 50
    shards = TokenShards.open(build_shards([Document("d", " ".join(ids))], tok, tmp_path, chunk_tokens=16))
    assert shards.meta["dtype"] == "uint32"
    stored = np.concatenate([np.asarray(a) for split in ("train", "val") for a in shards.arrays[split]])
    assert sorted(stored.tolist()) == sorted([tok.backend.token_to_id(w) for w in ids] + [0])


@pytest.mark.skipif(not NEOX_TOKENIZER.is_file(), reason=f"GPT-NeoX-20B tokenizer.json not found at {NEOX_TOKENIZER}")
def test_neox_vocab_fits_uint16(tmp_path, corpus_file):
    shards = TokenShards.open(build_shards(load_documents(str(corpus_file)), load_tokenizer(NEOX_TOKENIZER), tmp_path))
    assert shards.meta["dtype"] == "uint16" and shards.meta["vocab_size"] == 50277


def test_split_is_a_deterministic_partition_of_the_token_stream(tmp_path, corpus_file, cache_dir):
    docs = load_documents(str(corpus_file))
    tok = train_bpe(docs, 512, cache_dir)
    chunk = 256
    a = TokenShards.open(
        build_shards(docs, tok, tmp_path / "a", val_fraction=0.1, chunk_tokens=chunk, shard_tokens=5000)
    )
    b = TokenShards.open(
        build_shards(docs, tok, tmp_path / "b", val_fraction=0.1, chunk_tokens=chunk, shard_tokens=5000)
    )
    assert len(a.arrays["train"]) > 1  # rolled over into several shard files
    for split in ("train", "val"):
        assert [np.asarray(x).tolist() for x in a.arrays[split]] == [np.asarray(x).tolist() for x in b.arrays[split]]
    expected, stored = expected_splits([d.text for d in docs], tok, chunk, 0.1), shard_splits(a)
    assert all(np.array_equal(stored[s], expected[s]) for s in ("train", "val"))
    assert 0.07 < len(stored["val"]) / (len(stored["val"]) + len(stored["train"])) < 0.13


def test_shards_are_reused_not_rebuilt(tmp_path, corpus_file, cache_dir, monkeypatch):
    docs = load_documents(str(corpus_file))
    tok = train_bpe(docs, 512, cache_dir)
    first = build_shards(docs, tok, tmp_path)
    monkeypatch.setattr(Tokenizer, "encode_pieces", lambda *a: pytest.fail("shards were tokenized again"))
    assert build_shards(docs, tok, tmp_path) == first


def test_random_windows_are_contiguous_and_shifted(tmp_path, corpus_file, cache_dir):
    docs = load_documents(str(corpus_file))
    tok = train_bpe(docs, 512, cache_dir)
    shards = TokenShards.open(build_shards(docs, tok, tmp_path, shard_tokens=3000))
    x, y = shards.random_windows("train", 8, 64, torch.Generator().manual_seed(1))
    x2, _ = shards.random_windows("train", 8, 64, torch.Generator().manual_seed(1))
    assert x.shape == (8, 64) and x.dtype == torch.int64 and torch.equal(x, x2)
    assert torch.equal(x[:, 1:], y[:, :-1])
    files = [np.asarray(a) for a in shards.arrays["train"]]
    for row in torch.cat((x, y[:, -1:]), dim=1).numpy():
        assert any(row.tobytes() in f.astype(np.int64).tobytes() for f in files)  # one window never spans two files


def test_too_short_split_says_what_to_change(tmp_path, cache_dir, corpus_file):
    tok = train_bpe(load_documents(str(corpus_file)), 512, cache_dir)
    shards = TokenShards.open(build_shards([Document("d", "a few words only")], tok, tmp_path))
    with pytest.raises(ValueError, match="seq_len=64 needs at least 65"):
        shards.random_windows("val", 1, 64, torch.Generator())


def overwrite(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.fixture
def built(tmp_path, corpus_file, cache_dir):
    """A cached shard directory of the corpus file, its documents, tokenizer and ids."""
    docs = load_documents(str(corpus_file))
    tok = train_bpe(docs, 512, cache_dir)
    directory = build_shards(docs, tok, tmp_path)
    return directory, docs, tok, shard_splits(TokenShards.open(directory))


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_damaged_cached_shards_are_rebuilt(built, tmp_path, capfd, damage):
    directory, docs, tok, ids = built
    shard = directory / "train-00000.bin"
    if damage == "corrupt":  # same size, other bytes: only the checksum tells
        overwrite(shard, 100, b"\x01\x02\x03\x04")
    else:
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size - 6)
    assert build_shards(docs, tok, tmp_path) == directory
    assert f"token shard {shard}" in capfd.readouterr().err
    rebuilt = shard_splits(TokenShards.open(directory, verify=True))
    assert all(np.array_equal(rebuilt[s], ids[s]) for s in ids)


def test_damaged_shards_name_the_file_and_the_fix(built):
    directory, _, tok, _ = built
    shard = directory / "train-00000.bin"
    overwrite(shard, 10, b"\x07\x00")
    TokenShards.open(directory)  # sizes agree: only a full check reads the contents
    with pytest.raises(ValueError, match=rf"token shard {shard} is corrupt.*delete {directory} to rebuild"):
        TokenShards.open(directory, verify=True)
    # Ids past the vocabulary in every window: batches refuse them and name the file.
    overwrite(shard, 0, np.full(shard.stat().st_size // 2, 0xFFFF, dtype=np.uint16).tobytes())
    shards = TokenShards.open(directory)
    with pytest.raises(ValueError, match=rf"token shard {shard} holds ids >= the vocab size 512.*delete {directory}"):
        shards.random_windows("train", 4, 32, torch.Generator().manual_seed(0))
    with open(shard, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=rf"token shard {shard} has 100 bytes, expected \d+; delete {directory}"):
        TokenShards.open(directory)
