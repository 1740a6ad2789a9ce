import numpy as np
import pytest
import torch
from conftest import NEOX_TOKENIZER

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
from tokenformer.data.shards import is_validation_chunk


def word_level_tokenizer(vocab_size: int) -> Tokenizer:
    """A tokenizer whose ids go past uint16: word ``wN`` is id ``N``."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    backend = Backend(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend, backend.to_str())


def test_dtype_follows_vocab_size():
    assert token_dtype(8192) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_large_vocab_is_stored_as_uint32(tmp_path):
    tok = word_level_tokenizer(70_000)
    ids = [69_999, 3, 65_536, 12] * 50
    shards = TokenShards.open(
        build_shards([Document("d", " ".join(f"w{i}" for i in ids))], tok, tmp_path, chunk_tokens=16)
    )
    assert shards.meta["dtype"] == "uint32"
    stored = np.concatenate([np.asarray(a) for split in ("train", "val") for a in shards.arrays[split]])
    assert sorted(stored.tolist()) == sorted(ids)


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
    stream = np.concatenate([np.asarray(tok.encode_long(d.text) + [tok.eos_id]) for d in docs])
    train, val = (np.concatenate([np.asarray(x) for x in a.arrays[s]]) for s in ("train", "val"))
    chunks = [stream[i : i + chunk] for i in range(0, len(stream), chunk)]
    expect_val = [c for i, c in enumerate(chunks) if is_validation_chunk(i, 0.1)]
    expect_train = [c for i, c in enumerate(chunks) if not is_validation_chunk(i, 0.1)]
    assert np.array_equal(val, np.concatenate(expect_val)) and np.array_equal(train, np.concatenate(expect_train))
    assert 0.07 < len(val) / len(stream) < 0.13


def test_shards_are_reused_not_rebuilt(tmp_path, corpus_file, cache_dir, monkeypatch):
    docs = load_documents(str(corpus_file))
    tok = train_bpe(docs, 512, cache_dir)
    first = build_shards(docs, tok, tmp_path)
    monkeypatch.setattr(Tokenizer, "encode_long", lambda *a: pytest.fail("shards were tokenized again"))
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
