"""SIGKILL a training process at a random step, or inside the rename that puts a checkpoint in
place; ``--resume auto`` must finish the same run. A second writer on a running run is refused."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import cli_flags, tiny_train_options

from tokenformer.cli import main
from tokenformer.train import list_checkpoints, load_checkpoint, read_metrics, verify_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = Path(__file__).resolve().parents[2] / "src"


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"}


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def test_sigkill_then_resume_auto_matches_an_uninterrupted_run(straight, tmp_path):
    options, straight_losses = straight
    options = {**options, "out_dir": str(tmp_path / "killed")}
    steps = options["max_steps"]
    kill_at = random.randint(3, steps - 5)
    process = subprocess.Popen(
        [sys.executable, "-m", "tokenformer.cli", "train", *cli_flags(options)],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while max(train_losses(tmp_path / "killed"), default=0) < kill_at:
        assert process.poll() is None, f"training exited early: {process.stderr.read().decode()}"
        assert time.monotonic() < deadline, "training made no progress"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(train_losses(tmp_path / "killed")) < steps, f"killed at step {kill_at} but the run had already finished"
    for checkpoint in list_checkpoints(tmp_path / "killed"):
        verify_checkpoint(checkpoint)  # never half-written, wherever the kill landed

    main(["train", *cli_flags({**options, "resume": "auto"})])
    resumed = train_losses(tmp_path / "killed")
    assert sorted(resumed) == sorted(straight_losses) == list(range(1, steps + 1))
    worst = max(abs(resumed[s] - straight_losses[s]) for s in straight_losses)
    assert worst <= 1e-6, f"killed at step {kill_at}: losses differ by up to {worst}"


# Run in a subprocess: kill this process just before or just after the rename that puts checkpoint
# argv[2] in place (argv[4] "rename"), or the swap that replaces an existing one ("swap"); argv[5]
# is the code to run.
KILL_IN_RENAME = """
import os, signal, sys
from pathlib import Path
import tokenformer.io as io

name, moment, target = sys.argv[2:5]

def killing(rename):
    def wrapped(src, dst, *args, **kwargs):
        hit = Path(dst).name == name and Path(src).name.startswith(f".{name}.tmp-")
        if hit and moment == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = rename(src, dst, *args, **kwargs)
        if hit and moment == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapped

if target == "rename":
    io._rename_no_replace = killing(io._rename_no_replace)
else:
    io._swap = killing(io._swap)
exec(sys.argv[5])
"""


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus_file, cache_dir):
    """The losses of an uninterrupted 12-step run."""
    options = tiny_train_options(
        corpus_file, cache_dir, tmp_path_factory.mktemp("straight") / "run", ckpt_interval=2, eval_interval=6
    )
    main(["train", *cli_flags(options)])
    return options, train_losses(Path(options["out_dir"]))


def killed_in_rename(name: str, moment: str, target: str, code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", KILL_IN_RENAME, "-", name, moment, target, code],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["before", "after"])
def test_sigkill_in_the_checkpoint_rename_then_resume_auto_matches(straight, tmp_path, moment):
    options, losses = straight
    options = {**options, "out_dir": str(tmp_path / "run")}
    code = f"from tokenformer.cli import main; main(['train', *{cli_flags(options)!r}])"
    done = killed_in_rename("step-00000006", moment, "rename", code)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    names = [p.name for p in list_checkpoints(tmp_path / "run")]
    assert names == ["step-00000002", "step-00000004"] + (["step-00000006"] if moment == "after" else [])
    for checkpoint in list_checkpoints(tmp_path / "run"):
        verify_checkpoint(checkpoint)

    main(["train", *cli_flags({**options, "resume": "auto"})])
    resumed = train_losses(tmp_path / "run")
    assert sorted(resumed) == list(range(1, 13))
    assert max(abs(resumed[s] - losses[s]) for s in losses) <= 1e-6
    assert not list((tmp_path / "run" / "checkpoints").glob(".*")), "a staging folder was left behind"


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["before", "after"])
def test_sigkill_while_replacing_a_checkpoint_leaves_the_old_or_the_new_one_whole(straight, tmp_path, moment):
    """A checkpoint saved again at its step (after growth) is swapped in; killed around the swap,
    the step holds the old checkpoint or the new one, complete either way."""
    options = {**straight[0], "out_dir": str(tmp_path / "run"), "max_steps": 4}
    code = f"""
from tokenformer.train import TrainConfig, Trainer
trainer = Trainer(TrainConfig(**{options!r}))
trainer.fit()
trainer.grow(ffn_tokens=48)
trainer.save_checkpoint()
"""
    done = killed_in_rename("step-00000004", moment, "swap", code)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    checkpoints = list_checkpoints(tmp_path / "run")
    assert [p.name for p in checkpoints] == ["step-00000002", "step-00000004"]
    assert load_checkpoint(checkpoints[-1]).model.config.ffn_tokens == (48 if moment == "after" else 32)
    # The other one, staged or swapped out, is left hidden; the next writer deletes it.
    assert len(list((tmp_path / "run" / "checkpoints").glob(".step-00000004.tmp-*"))) == 1
    main(["train", *cli_flags({**options, "resume": "auto", "max_steps": 6})])
    assert [p.name for p in list_checkpoints(tmp_path / "run")][-1] == "step-00000006"
    assert not list((tmp_path / "run" / "checkpoints").glob(".*")), "a staging folder was left behind"


@pytest.mark.slow
def test_a_second_writer_is_refused_at_once_and_the_first_is_unaffected(tmp_path, corpus_file, cache_dir, capsys):
    steps = 300
    run = tmp_path / "run"
    first = tiny_train_options(corpus_file, cache_dir, run, max_steps=steps, eval_interval=100, ckpt_interval=100)
    process = subprocess.Popen(
        [sys.executable, "-m", "tokenformer.cli", "train", *cli_flags(first)],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not train_losses(run):
        assert process.poll() is None, f"training exited early: {process.stderr.read()}"
        assert time.monotonic() < deadline, "training made no progress"
        time.sleep(0.01)
    with pytest.raises(SystemExit) as exit:
        main(["train", *cli_flags({**first, "lr": 1e-3, "resume": "auto"})])
    still_running = process.poll() is None
    assert exit.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tokenformer train: error: {run} is in use by another writer (pid {process.pid} on host ")
    assert len(err.splitlines()) == 1 and "wait for it to finish, or write somewhere else" in err
    assert still_running, "the first run finished before the second tried: nothing was shown"

    assert process.wait(timeout=300) == 0, process.stderr.read()[-3000:]
    assert sorted(train_losses(run)) == list(range(1, steps + 1))
    assert yaml.safe_load((run / "train_config.yaml").read_text())["lr"] == first["lr"]
    assert [p.name for p in list_checkpoints(run)] == ["step-00000100", "step-00000200", "step-00000300"]
    for checkpoint in list_checkpoints(run):
        verify_checkpoint(checkpoint)
    assert json.loads((run / ".lock").read_text())["pid"] == process.pid
