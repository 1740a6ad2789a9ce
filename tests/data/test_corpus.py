import importlib.util
import json

import pytest

from tokenformer.data import Corpus, Document, fingerprint, kjv_documents, load_documents
from tokenformer.data import corpus as corpus_module


def test_embedded_corpus_loads_offline():
    docs = kjv_documents()
    assert len(docs) == 66  # one document per book
    assert docs[0].text.startswith("Genesis\n\nIn the beginning God created the heaven and the earth.\n")
    assert docs[-1].name == "kjv/Revelation"
    assert sum(len(d.text) for d in docs) > 4_000_000
    assert load_documents("kjv") == docs


def test_files_directories_and_globs(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n")
    (tmp_path / "a.txt").write_text("first file\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("markdown\n")
    (tmp_path / "sub" / "skip.bin").write_bytes(b"\x00\xff")
    assert [d.text for d in load_documents(str(tmp_path / "a.txt"))] == ["first file\n"]
    assert [d.text for d in load_documents(str(tmp_path))] == ["first file\n", "second file\n", "markdown\n"]
    assert [d.text for d in load_documents(str(tmp_path / "*.txt"))] == ["first file\n", "second file\n"]
    assert len(load_documents([str(tmp_path / "a.txt"), str(tmp_path / "sub")])) == 2


def test_missing_and_empty_sources_say_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt.*not a file, directory or glob"):
        load_documents(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        load_documents(str(tmp_path / "empty.txt"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        load_documents(str(tmp_path / "*.none"))
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ValueError, match="bad.txt is not UTF-8"):
        load_documents(str(tmp_path / "bad.txt"))
    with pytest.raises(ValueError, match="no corpus given"):
        load_documents([])


def test_hf_source_offline_says_what_failed(monkeypatch):
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(ImportError, match=r"tokenformer\[datasets\]"):
            load_documents("hf:wikitext:wikitext-2-raw-v1")
        return
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Both libraries read these variables when first imported; an earlier test may have imported
    # them, so set what they read at call time too (else they try the network and time out).
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="cannot load Hugging Face dataset 'no-such/dataset'.*network access"):
        load_documents("hf:no-such/dataset")


def test_fingerprint_follows_content_not_names(tmp_path):
    (tmp_path / "x.txt").write_text("same text\n")
    (tmp_path / "y.txt").write_text("same text\n")
    assert fingerprint(load_documents(str(tmp_path / "x.txt"))) == fingerprint(load_documents(str(tmp_path / "y.txt")))
    (tmp_path / "y.txt").write_text("other text\n")
    assert fingerprint(load_documents(str(tmp_path / "x.txt"))) != fingerprint(load_documents(str(tmp_path / "y.txt")))


def test_files_stream_in_blocks_like_whole_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "READ_CHARS", 7)  # a "\r\n" falls across blocks, so does "é"
    (tmp_path / "unix.txt").write_text("first line\nsecond line, caf\u00e9\n")
    (tmp_path / "windows.txt").write_bytes(b"line one\r\nline two\r\n\r\nlone\rcarriage\r\n")
    corpus = Corpus(str(tmp_path))
    docs = list(corpus)
    assert [d.text for d in docs] == [(tmp_path / n).read_text() for n in ("unix.txt", "windows.txt")]
    assert all(len(list(d.blocks())) > 2 for d in docs)
    assert [d.utf8_size() for d in docs] == [len(d.text.encode()) for d in docs]
    in_memory = [Document(d.name, d.text) for d in docs]
    assert corpus.fingerprint() == fingerprint(in_memory) == fingerprint(load_documents(str(tmp_path)))


def test_hf_dataset_is_read_in_batches_of_rows(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(corpus_module, "HF_BATCH_ROWS", 2)
    rows = ["first row\n", "", "second row", "   ", "third\nrow", "fourth"]
    local = tmp_path / "local-dataset"
    local.mkdir()
    (local / "train.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(rows)))
    corpus = Corpus(f"hf:{local}")
    docs = list(corpus)
    assert [d.text for d in docs] == [t for t in rows if t.strip()]  # blank rows are left out
    assert [d.name for d in docs][-1] == f"hf:{local}#3"
    assert corpus.fingerprint() == fingerprint(load_documents(f"hf:{local}"))
