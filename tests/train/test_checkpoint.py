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


def weights(path):
    return load_model(path).state_dict()


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rewind_leaves_checkpoints_with_the_new_weights(run, tmp_path, corpus_file, cache_dir):
    """Resumed from step 4 of a run that reached 12, with another learning rate: the checkpoints of
    steps 8 and 12 are the new run's; the old ones are set aside (renamed), never resumed from."""
    out = copy_run(run[0], tmp_path / "run")
    old = {p.name: weights(p) for p in list_checkpoints(out)}
    options = tiny_train_options(corpus_file, cache_dir, out, resume=str(list_checkpoints(out)[0]), lr=1e-3)
    trainer = Trainer(TrainConfig(**options))
    with pytest.warns(UserWarning, match=r"set aside 2 checkpoint\(s\) this run does not continue"):
        trainer.fit()
    trainer.close()
    paths = list_checkpoints(out)
    assert [p.name for p in paths] == ["step-00000004", "step-00000008", "step-00000012"]
    assert trainer.last_checkpoint == paths[-1]
    assert same_weights(weights(paths[-1]), trainer.model.state_dict())
    for path in paths[1:]:
        assert not same_weights(weights(path), old[path.name]), path.name
        assert load_checkpoint(path).trainer_state["train_config"]["lr"] == 1e-3
        assert same_weights(weights(path.with_name(f"{path.name}.superseded")), old[path.name])
    assert same_weights(weights(paths[0]), old["step-00000004"])
    resumed = Trainer(TrainConfig(**{**options, "resume": "auto"}))
    assert resumed.state.step == 12 and same_weights(resumed.model.state_dict(), trainer.model.state_dict())


def test_rewind_to_fewer_steps_is_what_resume_auto_continues(run, tmp_path, corpus_file, cache_dir):
    out = copy_run(run[0], tmp_path / "run")
    options = tiny_train_options(corpus_file, cache_dir, out, resume=str(list_checkpoints(out)[0]), max_steps=8)
    trainer = Trainer(TrainConfig(**options))
    with pytest.warns(UserWarning, match=r"step-00000008.superseded, step-00000012.superseded"):
        trainer.fit()
    trainer.close()
    assert [p.name for p in list_checkpoints(out)] == ["step-00000004", "step-00000008"]
    resumed = Trainer(TrainConfig(**{**options, "resume": "auto"}))
    assert resumed.state.step == 8 and same_weights(resumed.model.state_dict(), trainer.model.state_dict())


def test_a_checkpoint_of_an_existing_step_is_replaced(tmp_path, corpus_file, cache_dir):
    """Saving again at a step already checkpointed (here after growth) replaces the checkpoint."""
    trainer = Trainer(TrainConfig(**tiny_train_options(corpus_file, cache_dir, tmp_path / "run", max_steps=4)))
    trainer.fit()
    path = trainer.last_checkpoint
    trainer.grow(ffn_tokens=48)
    assert trainer.save_checkpoint() == path
    trainer.close()
    assert load_checkpoint(path).model.config.ffn_tokens == 48
    assert same_weights(weights(path), trainer.model.state_dict())
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == [path.name]  # nothing left aside


def test_a_corrupt_newest_checkpoint_is_set_aside_and_every_remaining_one_loads(run, tmp_path, corpus_file, cache_dir):
    out = copy_run(run[0], tmp_path / "run")
    newest = list_checkpoints(out)[-1]
    os.truncate(newest / "model.safetensors", 100)
    with pytest.warns(UserWarning, match="falling back to the previous checkpoint"):
        trainer = Trainer(TrainConfig(**tiny_train_options(corpus_file, cache_dir, out, resume="auto")))
    with pytest.warns(UserWarning, match=r"step-00000012\.corrupt"):
        trainer.fit()
    trainer.close()
    assert trainer.resumed_from.name == "step-00000008"
    assert [p.name for p in list_checkpoints(out)] == ["step-00000004", "step-00000008", "step-00000012"]
    for path in list_checkpoints(out):
        load_checkpoint(path)
    assert (out / "checkpoints" / "step-00000012.corrupt" / "model.safetensors").stat().st_size == 100
    assert latest_checkpoint(out) == newest  # a rerun finds nothing to fall back from


def test_all_checkpoints_corrupt_starts_afresh_and_keeps_its_new_checkpoints(run, tmp_path, corpus_file, cache_dir):
    out = copy_run(run[0], tmp_path / "run")
    for path in list_checkpoints(out):
        os.truncate(path / "optimizer.safetensors", 10)
    options = tiny_train_options(corpus_file, cache_dir, out, resume="auto", keep_last=2)
    with pytest.warns(UserWarning):
        trainer = Trainer(TrainConfig(**options))
        assert trainer.resumed_from is None and trainer.state.step == 0
        trainer.fit()
    trainer.close()
    assert [p.name for p in list_checkpoints(out)] == ["step-00000008", "step-00000012"]  # the new ones, kept
    for path in list_checkpoints(out):
        load_checkpoint(path)
    assert sorted(p.name for p in (out / "checkpoints").glob("*.corrupt")) == [
        "step-00000004.corrupt",
        "step-00000008.corrupt",
        "step-00000012.corrupt",
    ]


def test_keep_last_never_deletes_the_checkpoint_just_written(tmp_path):
    from tokenformer.train.checkpoint import prune_checkpoints

    folder = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (folder / f"step-0000000{step}").mkdir(parents=True)
    prune_checkpoints(tmp_path, keep_last=1, keep=folder / "step-00000001")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001", "step-00000003"]


def test_a_second_writer_in_one_process_is_refused(tmp_path, corpus_file, cache_dir):
    from tokenformer.io import DirectoryLocked

    options = tiny_train_options(corpus_file, cache_dir, tmp_path / "run", max_steps=2, eval_interval=2)
    first = Trainer(TrainConfig(**options))
    first.fit()
    second = Trainer(TrainConfig(**{**options, "resume": "auto"}))
    with pytest.raises(DirectoryLocked, match=r"in use by another writer \(this process, pid \d+"):
        second.fit()
    first.close()
    second.fit()  # free now
    second.close()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, corpus_file, cache_dir):
    import json
    import socket

    lock = tmp_path / "run" / ".lock"
    lock.parent.mkdir()
    lock.write_text(json.dumps({"pid": 2**22 + 1, "host": socket.gethostname(), "since": "long ago"}))
    trainer = Trainer(TrainConfig(**tiny_train_options(corpus_file, cache_dir, tmp_path / "run", max_steps=2)))
    trainer.fit()
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    trainer.close()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000002"]
