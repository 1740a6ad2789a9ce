"""SIGKILL a training process at a random step; ``--resume auto`` must finish the same run."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli_flags, tiny_train_options

from tokenformer.cli import main
from tokenformer.train import list_checkpoints, read_metrics, verify_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = Path(__file__).resolve().parents[2] / "src"


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"}


def test_sigkill_then_resume_auto_matches_an_uninterrupted_run(tmp_path, corpus_file, cache_dir):
    steps = 30
    options = tiny_train_options(
        corpus_file, cache_dir, tmp_path / "killed", max_steps=steps, ckpt_interval=2, eval_interval=10
    )
    kill_at = random.randint(3, steps - 5)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tokenformer.cli", "train", *cli_flags(options)],
        env=env,
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
    main(["train", *cli_flags({**options, "out_dir": str(tmp_path / "straight")})])
    resumed, straight = train_losses(tmp_path / "killed"), train_losses(tmp_path / "straight")
    assert sorted(resumed) == sorted(straight) == list(range(1, steps + 1))
    worst = max(abs(resumed[s] - straight[s]) for s in straight)
    assert worst <= 1e-6, f"killed at step {kill_at}: losses differ by up to {worst}"
