"""Faults of the environment (disk full, read-only output, a missing device) end a command with one
line on stderr naming the path or device, what failed and what to do; the previous checkpoint stays
intact and loadable. Options that cannot work are refused before anything is written."""

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_flags, tiny_train_options

from tokenformer.cli import main
from tokenformer.train import TrainConfig, Trainer, TrainingDiverged, list_checkpoints, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus_file, cache_dir):
    """A run with one checkpoint, at step 4."""
    options = tiny_train_options(
        corpus_file, cache_dir, tmp_path_factory.mktemp("faults") / "run", max_steps=4, eval_interval=4, ckpt_interval=4
    )
    main(["train", *cli_flags(options)])
    return Path(options["out_dir"]), options


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"tokenformer {command}: error: "), err
    return err


def assert_only_the_old_checkpoint(run: Path) -> None:
    assert [p.name for p in list_checkpoints(run)] == ["step-00000004"]
    assert load_checkpoint(list_checkpoints(run)[0]).trainer_state["step"] == 4
    assert not list((run / "checkpoints").glob(".*.tmp-*")), "a staging folder was left behind"


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_previous_checkpoint(
    run, tmp_path, monkeypatch, capsys
):
    import safetensors.torch

    out = shutil.copytree(run[0], tmp_path / "run")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(SystemExit) as exit:
        main(["train", *cli_flags({**run[1], "out_dir": str(out), "resume": "auto", "max_steps": 8})])
    assert exit.value.code == 1
    err = one_error_line(capsys, "train")
    assert f"cannot write {out / 'checkpoints' / 'step-00000008'}: No space left on device" in err
    assert "free some space there or write somewhere else" in err
    assert_only_the_old_checkpoint(out)


def unshare_works() -> bool:
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


def train_in_tmpfs(run: Path, options: dict, tmp_path: Path, size_kb: int, read_only: bool) -> tuple[int, str]:
    """Copy ``run`` into a tmpfs of ``size_kb`` (read-only after the copy, if asked) in a private
    mount namespace, resume it there to step 8 and check that its step-4 checkpoint still loads."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    flags = " ".join(f"'{flag}'" for flag in cli_flags({**options, "out_dir": str(mount / "run"), "resume": "auto"}))
    script = f"""
        set -e
        mount -t tmpfs -o size={size_kb}k tmpfs {mount}
        cp -r {run} {mount}/run
        {"mount -o remount,ro " + str(mount) if read_only else ""}
        set +e
        {sys.executable} -m tokenformer.cli train {flags} --max_steps 8 2> {tmp_path}/stderr
        echo $? > {tmp_path}/rc
        set -e
        {sys.executable} -c "
from tokenformer.train import list_checkpoints, load_checkpoint
paths = list_checkpoints('{mount}/run')
assert [p.name for p in paths] == ['step-00000004'], paths
assert load_checkpoint(paths[0]).trainer_state['step'] == 4
"
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]  # the previous checkpoint loads in the full file system
    return int((tmp_path / "rc").read_text()), (tmp_path / "stderr").read_text().strip()


def used_kb(directory: Path) -> int:
    return sum(-(-p.stat().st_size // 4096) * 4 for p in directory.rglob("*") if p.is_file()) + 4 * len(
        [p for p in directory.rglob("*") if p.is_dir()]
    )


@pytest.mark.slow
@pytest.mark.skipif(not unshare_works(), reason="needs unshare -rm (a private mount namespace) to mount a tmpfs")
def test_a_really_full_disk_is_one_line_and_keeps_the_previous_checkpoint(run, tmp_path):
    checkpoint_kb = used_kb(list_checkpoints(run[0])[0])
    rc, err = train_in_tmpfs(run[0], run[1], tmp_path, used_kb(run[0]) + checkpoint_kb // 2, read_only=False)
    assert rc == 1
    assert err == (
        f"tokenformer train: error: cannot write {tmp_path / 'mnt' / 'run' / 'checkpoints' / 'step-00000008'}: "
        "No space left on device; the file system is full: free some space there or write somewhere else"
    )


@pytest.mark.slow
@pytest.mark.skipif(not unshare_works(), reason="needs unshare -rm (a private mount namespace) to mount a tmpfs")
def test_read_only_output_is_one_line_and_keeps_the_previous_checkpoint(run, tmp_path):
    rc, err = train_in_tmpfs(run[0], run[1], tmp_path, 4 * used_kb(run[0]), read_only=True)
    assert rc == 1
    assert err == (
        f"tokenformer train: error: cannot write {tmp_path / 'mnt' / 'run' / '.lock'}: Read-only file system; "
        "the file system is read-only: write somewhere else"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_missing_device_is_named(run, tmp_path, capsys):
    options = {**run[1], "out_dir": str(tmp_path / "new"), "device": "cuda"}
    with pytest.raises(SystemExit):
        main(["train", *cli_flags(options)])
    err = one_error_line(capsys, "train")
    assert "device 'cuda' is not available: " in err and "allowed here: auto or cpu" in err
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(run[0]), "--device", "cuda:1"])
    assert "device 'cuda:1' is not available" in one_error_line(capsys, "generate")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"seq_len": 300}, "seq_len=300 exceeds max_seq_len=256 of the model in "),
        ({"max_steps": 2}, "max_steps=2 is below the step of the checkpoint to resume (4, "),
        ({"task": "vision", "model": "fmnist-0.3M", "model_overrides": {}}, "it holds a model of task 'lm'"),
    ],
)
def test_options_that_cannot_resume_are_refused_before_anything_is_written(run, tmp_path, capsys, changes, message):
    out = tmp_path / "new"
    options = {**run[1], "out_dir": str(out), "resume": str(run[0]), **changes}
    with pytest.raises(SystemExit):
        main(["train", *cli_flags(options)])
    assert message in one_error_line(capsys, "train")
    assert not out.exists()


def test_warmup_beyond_max_steps_is_refused():
    with pytest.raises(ValueError, match=r"warmup_steps=200 is invalid; allowed: an integer <= max_steps \(100\)"):
        TrainConfig(max_steps=100, warmup_steps=200)


@pytest.mark.parametrize("stop", [False, True])
def test_a_loss_that_explodes_without_nan_warns_or_stops(corpus_file, cache_dir, tmp_path, stop):
    options = tiny_train_options(
        corpus_file, cache_dir, tmp_path / "run", lr=20.0, min_lr=20.0, max_steps=8, eval_interval=4, ckpt_interval=4
    )
    trainer = Trainer(TrainConfig(**options, stop_on_divergence=stop))
    try:
        if stop:
            with pytest.raises(TrainingDiverged, match=r"validation loss .* at step 4 is .*x its best so far"):
                trainer.fit()
            assert list_checkpoints(tmp_path / "run") == []  # stopped before the step's checkpoint
        else:
            with pytest.warns(UserWarning, match=r"training has diverged \(learning rate lr=20 too high\?\)"):
                trainer.fit()
    finally:
        trainer.close()
    losses = [r["val_loss"] for r in trainer.state.val_history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[0] > 3 * trainer.state.first_loss


def test_a_healthy_run_does_not_warn(corpus_file, cache_dir, tmp_path, recwarn):
    trainer = Trainer(TrainConfig(**tiny_train_options(corpus_file, cache_dir, tmp_path / "run", max_steps=8)))
    trainer.fit()
    trainer.close()
    assert not [w for w in recwarn if "diverged" in str(w.message)]
