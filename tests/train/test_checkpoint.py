import os

import pytest
import torch
from conftest import tiny_train_options

from tokenformer.families import load_model
from tokenformer.train import (
    CheckpointError,
    TrainConfig,
    Trainer,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    verify_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus_file, cache_dir):
    """A finished run with checkpoints at steps 4, 8 and 12."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    trainer = Trainer(TrainConfig(**tiny_train_options(corpus_file, cache_dir, out)))
    trainer.fit()
    trainer.close()
    return out, trainer


def test_checkpoint_holds_model_optimizer_config_and_growth(run):
    out, trainer = run
    paths = list_checkpoints(out)
    assert [p.name for p in paths] == ["step-00000004", "step-00000008", "step-00000012"]
    checkpoint = load_checkpoint(paths[-1])
    state = checkpoint.trainer_state
    assert state["step"] == 12 and state["tokens"] == 12 * 4 * 32
    assert state["train_config"]["lr"] == 3e-3 and state["train_config"]["seq_len"] == 32
    assert state["layers"][0]["attention.query"] == {"tokens": 16, "tau": 4.0}
    assert [r["step"] for r in state["val_history"]] == [4, 8, 12]
    moments = checkpoint.optimizer_state["state"]
    assert len(moments) == len(list(trainer.model.parameters()))
    assert all(
        torch.equal(a, b)
        for a, b in zip(checkpoint.model.state_dict().values(), trainer.model.state_dict().values(), strict=True)
    )
    assert load_model(paths[-1]).config == trainer.model.config  # also a plain model directory
    assert (paths[-1] / "tokenizer.json").is_file()


def test_loading_runs_no_pickle(run, monkeypatch):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (pickle) was called"))
    load_checkpoint(list_checkpoints(run[0])[-1])
    assert not [p for p in run[0].rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl")]


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_file_is_named_and_resume_falls_back(run, tmp_path, corpus_file, cache_dir):
    out = copy_run(run[0], tmp_path / "run")
    newest = list_checkpoints(out)[-1] / "model.safetensors"
    os.truncate(newest, newest.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=f"checkpoint file {newest} is truncated"):
        verify_checkpoint(newest.parent)
    with pytest.warns(UserWarning, match="truncated.*falling back to the previous checkpoint"):
        assert latest_checkpoint(out).name == "step-00000008"
    with pytest.warns(UserWarning):
        trainer = Trainer(TrainConfig(**tiny_train_options(corpus_file, cache_dir, out, resume="auto")))
    assert trainer.state.step == 8 and trainer.resumed_from.name == "step-00000008"


def test_corrupted_byte_is_named_and_explicit_resume_refuses(run, tmp_path, corpus_file, cache_dir):
    out = copy_run(run[0], tmp_path / "run")
    target = list_checkpoints(out)[-1] / "optimizer.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"checkpoint file {target} is corrupted"):
        Trainer(TrainConfig(**tiny_train_options(corpus_file, cache_dir, out, resume=str(target.parent))))
    (list_checkpoints(out)[-2] / "manifest.json").unlink()
    with pytest.warns(UserWarning) as warned:
        assert latest_checkpoint(out).name == "step-00000004"
    messages = [str(w.message) for w in warned]
    assert "optimizer.safetensors is corrupted" in messages[0] and "step-00000008 is incomplete" in messages[1]


def test_keep_last_and_stale_staging_folders(tmp_path, corpus_file, cache_dir):
    out = tmp_path / "run"
    (out / "checkpoints" / ".step-00000002.tmp-abc").mkdir(parents=True)  # left by a killed save
    trainer = Trainer(
        TrainConfig(
            **tiny_train_options(
                corpus_file, cache_dir, out, max_steps=5, ckpt_interval=1, keep_last=2, eval_interval=5
            )
        )
    )
    trainer.fit()
    trainer.close()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]


def test_outputs_get_ordinary_permissions(run):
    from tokenformer.io import DIR_MODE, FILE_MODE

    checkpoint = list_checkpoints(run[0])[-1]
    assert checkpoint.stat().st_mode & 0o777 == DIR_MODE  # not tempfile's private 0700
    assert (checkpoint / "model.safetensors").stat().st_mode & 0o777 == FILE_MODE
    assert (run[0] / "metrics.jsonl").stat().st_mode & 0o777 == FILE_MODE
