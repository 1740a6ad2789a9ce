"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 reproduce a single-process run (DDP with a
moving average of the weights too); sharded checkpoints resume on 1 and 2 ranks; growth of a
sharded run; a killed rank fails the job fast; an image classifier trained with DDP is tested on
its test split."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import cli_flags, tiny_train_options
from test_vision_data import fake_fashion_mnist
from test_vision_train import vision_options

from tokenformer import families, io
from tokenformer.cli import main
from tokenformer.train import TrainConfig, Trainer, list_checkpoints, read_metrics, verify_checkpoint
from tokenformer.train.parallel import Distributed, RankSlice

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

SRC = Path(__file__).resolve().parents[2] / "src"
WORKER = Path(__file__).with_name("dist_worker.py")
STEPS = 20


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def torchrun_command(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def torchrun(nproc: int, options: dict) -> str:
    command = torchrun_command(nproc, "-m", "tokenformer.cli", "train", *cli_flags({**options, "threads": 1}))
    done = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def losses(run: Path, kind: str = "train", key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == kind}


def assert_same_curve(got: dict[int, float], want: dict[int, float], steps) -> None:
    assert sorted(got) == list(steps), sorted(got)
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in steps)
    assert worst <= 1e-4, f"relative difference up to {worst:.2e}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus_file, cache_dir):
    """The same 20 steps (global micro-batch 4, 2 micro-batches per step) on 1 process, 2 DDP ranks and 2 FSDP ranks."""
    root = tmp_path_factory.mktemp("dist")
    options = tiny_train_options(
        corpus_file, cache_dir, root / "single", max_steps=STEPS, grad_accum=2, eval_interval=10, ckpt_interval=10
    )
    torch.set_num_threads(1)
    main(["train", *cli_flags(options)])
    for strategy in ("ddp", "fsdp"):
        stdout = torchrun(2, {**options, "out_dir": str(root / strategy), "strategy": strategy})
        assert stdout.count("checkpoint:") == 1, stdout  # only rank 0 prints
    return root, options


def test_ddp_and_fsdp_reproduce_the_single_process_losses(runs):
    root, _ = runs
    single = losses(root / "single")
    for strategy in ("ddp", "fsdp"):
        assert_same_curve(losses(root / strategy), single, range(1, STEPS + 1))
        assert_same_curve(
            losses(root / strategy, "val", "val_loss"), losses(root / "single", "val", "val_loss"), (10, 20)
        )
        records = read_metrics(root / strategy / "metrics.jsonl")
        assert [r["train_tokens"] for r in records if r["kind"] == "train"][
            -1
        ] == STEPS * 2 * 4 * 32  # the global batch, counted once


def test_ddp_keeps_the_moving_average_of_one_process(tmp_path, corpus_file, cache_dir):
    options = tiny_train_options(
        corpus_file,
        cache_dir,
        tmp_path / "single",
        max_steps=10,
        grad_accum=2,
        eval_interval=5,
        ckpt_interval=10,
        ema_decay=0.9,
    )
    main(["train", *cli_flags(options)])
    torchrun(2, {**options, "out_dir": str(tmp_path / "ddp"), "strategy": "ddp"})
    for key in ("val_loss", "val_loss_raw"):  # the averaged weights' validation loss, and the live weights'
        assert_same_curve(losses(tmp_path / "ddp", "val", key), losses(tmp_path / "single", "val", key), (5, 10))
    single, ddp = (
        io.load_weights(list_checkpoints(tmp_path / run)[-1] / "ema.safetensors") for run in ("single", "ddp")
    )
    assert single.keys() == ddp.keys()
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-5)


def test_fsdp_writes_sharded_checkpoints_that_resume_on_one_and_two_ranks(runs, tmp_path):
    root, options = runs
    checkpoints = list_checkpoints(root / "fsdp")
    assert [c.name for c in checkpoints] == ["step-00000010", "step-00000020"]
    for checkpoint in checkpoints:
        verify_checkpoint(checkpoint)
        assert len(list((checkpoint / "dcp").glob("*.distcp"))) == 2  # one file per rank
    original = losses(root / "fsdp")
    resumed = {**options, "resume": str(checkpoints[0])}
    main(["train", *cli_flags({**resumed, "out_dir": str(tmp_path / "one")})])
    torchrun(2, {**resumed, "out_dir": str(tmp_path / "two"), "strategy": "fsdp"})
    for run in ("one", "two"):
        assert_same_curve(losses(tmp_path / run), original, range(11, STEPS + 1))


def test_consolidate_turns_sharded_into_single_file_and_back(runs, tmp_path, capsys):
    root, _ = runs
    sharded = list_checkpoints(root / "fsdp")[-1]
    for source, out in ((sharded, "single"), (tmp_path / "single", "sharded"), (tmp_path / "sharded", "again")):
        main(["consolidate", "--checkpoint", str(source), "--out", str(tmp_path / out)])
    assert "as a single-file checkpoint" in capsys.readouterr().out
    first, again = families.load_model(tmp_path / "single"), families.load_model(tmp_path / "again")
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    assert (tmp_path / "single" / "optimizer.safetensors").read_bytes() == (
        tmp_path / "again" / "optimizer.safetensors"
    ).read_bytes()
    with pytest.raises(SystemExit):
        main(["consolidate", "--checkpoint", str(sharded), "--out", str(tmp_path / "single")])  # never overwrites
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(sharded), "--max_new_tokens", "2"])
    assert "is a sharded checkpoint; write it whole first: tokenformer consolidate" in capsys.readouterr().err
    main(["generate", "--model", str(tmp_path / "single"), "--max_new_tokens", "2", "--device", "cpu"])


def test_growing_a_sharded_run_keeps_the_validation_loss(runs, tmp_path, capsys):
    """Growth of a sharded checkpoint (gathered by ``tokenformer grow``, resharded on resume),
    then growth in width and depth inside the running 2-rank FSDP job (gathered, grown and
    resharded in memory)."""
    root, options = runs
    sharded = list_checkpoints(root / "fsdp")[-1]
    main(
        [
            "grow",
            "--checkpoint",
            str(sharded),
            "--out",
            str(tmp_path / "grown"),
            "--ffn_tokens",
            "48",
            "--qkv_tokens",
            "24",
            "--device",
            "cpu",
        ]
    )
    assert "function preserving: True" in capsys.readouterr().out
    before = [
        r["val_loss"]
        for r in read_metrics(root / "fsdp" / "metrics.jsonl")
        if r["kind"] == "val" and r["step"] == STEPS
    ][0]
    grown = {
        **options,
        "resume": str(tmp_path / "grown"),
        "out_dir": str(tmp_path / "run"),
        "max_steps": STEPS + 4,
        "strategy": "fsdp",
        "threads": 1,
    }
    growth = {"grow_at": STEPS + 2, "tokens": {"ffn_tokens": 64, "n_layers": 3, "depth_position": "interleave"}}
    done = subprocess.run(
        torchrun_command(2, str(WORKER), json.dumps(grown), json.dumps(growth)),
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert abs(report["first"] - before) <= 1e-5 * before, (before, report)
    assert abs(report["after"] - report["before"]) <= 1e-5 * report["before"], report
    assert report["moments_fit"]
    assert sorted(losses(tmp_path / "run")) == list(range(STEPS + 1, STEPS + 5))
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == [
        "step-00000022",
        "step-00000024",
    ]  # fit writes one at its last step
    grown_config = families.read_model_config(list_checkpoints(tmp_path / "run")[-1])
    assert grown_config.tokens(0)["ffn"] == 64 and grown_config.n_layers == 3


def test_a_vision_run_under_ddp_writes_the_test_metrics_of_one_process(tmp_path):
    data = fake_fashion_mnist(tmp_path / "fm", n_train=200, n_test=20)
    options = vision_options(tmp_path / "single", data, max_steps=8, eval_interval=4, ckpt_interval=4)
    main(["train", *cli_flags(options)])
    stdout = torchrun(2, {**options, "out_dir": str(tmp_path / "ddp"), "strategy": "ddp"})
    assert stdout.count("test accuracy") == 1, stdout  # rank 0 reports the test, for both ranks
    single, ddp = (json.loads((tmp_path / run / "test_metrics.json").read_text()) for run in ("single", "ddp"))
    assert ddp["count"] == single["count"] == 20
    assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-4)
    assert abs(ddp["accuracy"] - single["accuracy"]) <= 1 / 20  # at most one image on the edge of a decision
    assert (tmp_path / "ddp" / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_killed_rank_fails_the_job_fast_and_the_run_resumes(runs, tmp_path):
    # The module's single-process run, under DDP with a checkpoint every 5 steps.
    root, options = runs
    steps = options["max_steps"]
    options = {
        **options,
        "out_dir": str(tmp_path / "killed"),
        "ckpt_interval": 5,
        "strategy": "ddp",
        "threads": 1,
        "dist_timeout": 30,
    }
    launcher = subprocess.Popen(
        torchrun_command(2, "-m", "tokenformer.cli", "train", *cli_flags(options)),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while max(losses(tmp_path / "killed"), default=0) < 7:
        assert launcher.poll() is None, f"training exited early: {launcher.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "training made no progress"
        time.sleep(0.01)
    workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    assert len(workers) == 1
    workers[0].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    _, stderr = launcher.communicate(timeout=60)
    assert launcher.returncode != 0
    assert time.monotonic() - killed_at < 30, "the job took too long to fail"
    assert "failed (exitcode: -9) local_rank: 1" in stderr, stderr[-3000:]  # torchrun names the killed rank
    done = max(losses(tmp_path / "killed"))
    assert done < steps, "the run finished before the kill"
    for checkpoint in list_checkpoints(tmp_path / "killed"):
        verify_checkpoint(checkpoint)

    torchrun(2, {**options, "resume": "auto"})
    assert_same_curve(losses(tmp_path / "killed"), losses(root / "single"), range(1, steps + 1))


def test_bad_distributed_options_are_refused_with_what_is_allowed(tmp_path, corpus_file, cache_dir, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=r"strategy='zero' is invalid; allowed: single, ddp, fsdp"):
        TrainConfig(**tiny_train_options(corpus_file, cache_dir, tmp_path, strategy="zero"))
    with pytest.raises(
        ValueError,
        match=r"strategy=fsdp needs the environment torchrun sets \(RANK, .*missing\); launch with: torchrun",
    ):
        Trainer(TrainConfig(**tiny_train_options(corpus_file, cache_dir, tmp_path, strategy="fsdp")))
    with pytest.raises(ValueError, match=r"batch_size=3 does not split over 2 ranks"):
        RankSlice(None, 3, Distributed("ddp", 0, 2))


def test_a_locked_run_fails_every_rank_at_once(tmp_path, corpus_file, cache_dir):
    """Rank 0 holds the run's lock for all ranks; when it cannot, no rank waits for it."""
    options = tiny_train_options(corpus_file, cache_dir, tmp_path / "run", strategy="ddp", threads=1, dist_timeout=300)
    held = io.DirectoryLock(tmp_path / "run")
    try:
        started = time.monotonic()
        done = subprocess.run(
            torchrun_command(2, "-m", "tokenformer.cli", "train", *cli_flags(options)),
            env=env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        held.release()
    assert done.returncode != 0
    assert time.monotonic() - started < 120, "a rank waited for the others"
    assert f"error: {tmp_path / 'run'} is in use by another writer (this process" not in done.stderr
    assert f"error: {tmp_path / 'run'} is in use by another writer (pid {os.getpid()} on host" in done.stderr
    assert "error: rank 0 failed: DirectoryLocked" in done.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
