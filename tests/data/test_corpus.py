import importlib.util

import pytest

from tokenformer.data import fingerprint, kjv_documents, load_documents


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
    with pytest.raises(RuntimeError, match="cannot load Hugging Face dataset 'no-such/dataset'.*network access"):
        load_documents("hf:no-such/dataset")


def test_fingerprint_follows_content_not_names(tmp_path):
    (tmp_path / "x.txt").write_text("same text\n")
    (tmp_path / "y.txt").write_text("same text\n")
    assert fingerprint(load_documents(str(tmp_path / "x.txt"))) == fingerprint(load_documents(str(tmp_path / "y.txt")))
    (tmp_path / "y.txt").write_text("other text\n")
    assert fingerprint(load_documents(str(tmp_path / "x.txt"))) != fingerprint(load_documents(str(tmp_path / "y.txt")))
