import pytest
from conftest import NEOX_TOKENIZER

from tokenformer.data import load_documents, load_tokenizer, train_bpe
from tokenformer.data import tokenizer as tokenizer_module


@pytest.mark.skipif(not NEOX_TOKENIZER.is_file(), reason=f"GPT-NeoX-20B tokenizer.json not found at {NEOX_TOKENIZER}")
def test_loads_the_released_models_tokenizer():
    tok = load_tokenizer(NEOX_TOKENIZER)
    assert tok.encode("Hello world") == [12092, 1533]
    assert tok.vocab_size == 50277 and tok.eos_id == 0
    assert tok.decode([12092, 1533]) == "Hello world"


def test_bpe_has_the_requested_vocab_and_round_trips(corpus_file, cache_dir):
    tok = train_bpe(load_documents(str(corpus_file)), 512, cache_dir)
    assert tok.vocab_size == 512 and tok.eos_id == 0
    text = "In the beginning God created the heaven and the earth. Ünïcödé ✓\n"
    assert tok.decode(tok.encode(text)) == text  # byte-level: any text round-trips


def test_bpe_is_cached_by_content_hash(corpus_file, tmp_path, monkeypatch):
    docs = load_documents(str(corpus_file))
    first = train_bpe(docs, 300, tmp_path)
    assert len(list((tmp_path / "tokenizers").glob("bpe-300-*.json"))) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been loaded")

    monkeypatch.setattr("tokenizers.trainers.BpeTrainer", no_training)
    assert train_bpe(docs, 300, tmp_path).fingerprint == first.fingerprint


def test_long_texts_encode_like_whole_texts(corpus_file, cache_dir, monkeypatch):
    tok = train_bpe(load_documents(str(corpus_file)), 512, cache_dir)
    monkeypatch.setattr(tokenizer_module, "ENCODE_PIECE_CHARS", 500)
    text = corpus_file.read_text()[:20000] + "\n\n  indented line\n\n\nend"
    assert tok.encode_long(text) == tok.encode(text)


def test_bad_tokenizer_inputs(tmp_path, corpus_file):
    with pytest.raises(ValueError, match="vocab_size=100 is too small.*>= 257"):
        train_bpe(load_documents(str(corpus_file)), 100, tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tokenizer"):
        load_tokenizer(tmp_path / "broken.json")
