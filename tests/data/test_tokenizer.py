import pytest
from conftest import NEOX_TOKENIZER

from tokenformer.data import Corpus, Tokenizer, load_documents, load_tokenizer, train_bpe
from tokenformer.data import corpus as corpus_module
from tokenformer.data import tokenizer as tokenizer_module
from tokenformer.data.tokenizer import split_pieces


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


TRICKY = (
    "Lines  with  runs of spaces  \n\n\n  indented\tand tabbed\r\nend of  line \n"
    "na\u00efve caf\u00e9 \u65e5\u672c\u8a9e 42 it's\n"
)


def byte_level_bpe(text, add_prefix_space=False, normalizer=None, pre_tokenizer=None):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, trainers

    backend = Backend(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    if normalizer is not None:
        backend.normalizer = normalizer
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([text], trainer=trainer)
    return Tokenizer(backend, backend.to_str())


def test_pieces_are_cut_only_where_the_ids_stay_those_of_the_whole_text(corpus_file, cache_dir):
    from tokenizers import normalizers, pre_tokenizers

    text = (corpus_file.read_text()[:20_000] + TRICKY) * 3
    cases = {
        "trained bpe": (train_bpe(load_documents(str(corpus_file)), 512, cache_dir), " \n"),
        "prefix space": (byte_level_bpe(text, add_prefix_space=True), " "),  # a piece after "\n" gets a space
        "metaspace": (byte_level_bpe(text, pre_tokenizer=pre_tokenizers.Metaspace()), " "),
        # Every piece would get its own "▁": nothing may be cut.
        "prepended": (
            byte_level_bpe(
                text,
                normalizer=normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]),
                pre_tokenizer=pre_tokenizers.Metaspace(prepend_scheme="never"),
            ),
            "",
        ),
    }
    if NEOX_TOKENIZER.is_file():
        cases["gpt-neox-20b"] = (load_tokenizer(NEOX_TOKENIZER), " \n")
    for name, (tok, separators) in cases.items():
        assert tok.separators == separators, name
        blocks = [text[i : i + 333] for i in range(0, len(text), 333)]
        pieces = list(split_pieces(blocks, tok.separators, piece_chars=50))
        assert "".join(pieces) == text
        assert len(pieces) > 100 or not separators, name
        assert [i for ids in tok.encode_pieces(pieces) for i in ids] == tok.encode(text), name


def test_bpe_trains_on_a_stream_like_on_whole_texts(corpus_file, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "ENCODE_PIECE_CHARS", 10**9)  # one piece per document
    whole = train_bpe(load_documents(str(corpus_file)), 400, tmp_path / "whole")
    monkeypatch.setattr(corpus_module, "READ_CHARS", 1000)
    monkeypatch.setattr(tokenizer_module, "ENCODE_PIECE_CHARS", 300)
    streamed = train_bpe(Corpus(str(corpus_file)), 400, tmp_path / "streamed")
    assert streamed.json_text == whole.json_text
