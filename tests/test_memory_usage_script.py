"""benchmarks/memory_usage.py: how much of its memory a trained run reads on its own validation batches."""

import importlib
from pathlib import Path

import pytest
from conftest import TINY_MODEL, tiny_train_options

from tokenformer import memory_usage
from tokenformer.data import windows_to_batch
from tokenformer.train import TrainConfig, Trainer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
MEMORY = dict(memory_layers=[1], memory_sub_keys=4, memory_top_k=3, memory_heads=2)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def script(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("memory_usage")


def table_rows(report: str) -> list[list[str]]:
    """The cells of the report's per-run table (rows naming a run and a table)."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in report.splitlines() if line.startswith("| `")]
    return [row for row in rows if len(row) == 6]


def expected_rows(run: str, usage: dict) -> list[list[str]]:
    return [
        [f"`{run}`", f"`{table}`", str(s["tokens"]), str(s["selected"]), f"{s['share']:.4f}", f"{s['kl_uniform']:.4f}"]
        for table, s in usage.items()
    ]


def test_the_table_is_memory_usage_on_the_runs_own_validation_batches(tmp_path, corpus_file, cache_dir, script):
    run = tmp_path / "run"
    options = tiny_train_options(
        corpus_file, cache_dir, run, model_overrides={**TINY_MODEL, **MEMORY}, max_steps=8, eval_batches=3,
        eval_interval=4, ckpt_interval=4, ema_decay=0.5,
    )  # fmt: skip
    trainer = Trainer(TrainConfig(**options))
    trainer.fit(4)
    with pytest.raises(SystemExit, match=r"is not finished: checkpoint step-00000004 is at step 4 of max_steps=8"):
        script.main([str(run)])
    trainer.fit()
    trainer.close()

    # The windows the trainer validated on, batch_size at a time, and the weights validation used.
    windows, size = trainer.task.eval_windows, options["batch_size"]
    batches = [windows_to_batch(windows[start : start + size])[0] for start in range(0, len(windows), size)]
    assert len(batches) == options["eval_batches"]
    out = tmp_path / "usage.md"
    report = script.main([str(run), "--batches", "2", "--out", str(out)])
    assert out.read_text(encoding="utf-8") == report
    usage = memory_usage(trainer.evaluated_model, batches[:2])
    assert table_rows(report) == expected_rows(str(run), usage)
    assert "step 8, moving average of the weights, 2 validation batch(es) of 4 x 32 tokens" in report
    checkpoint = str(trainer.last_checkpoint)  # a checkpoint given instead of its run
    assert table_rows(script.main([checkpoint, "--batches", "2"])) == expected_rows(checkpoint, usage)

    report = script.main([str(run), str(run)])  # every validation batch by default; the mean over two runs
    expected = memory_usage(trainer.evaluated_model, batches)
    assert table_rows(report) == 2 * expected_rows(str(run), expected)
    share = expected["layers.1.memory.0"]["share"]
    assert f"| `layers.1.memory.0` | 2 | {share:.4f} ± 0.0000 |" in report

    with pytest.raises(SystemExit, match=r"--batches 4 is not a number of validation batches .* allowed: 1 to 3 "):
        script.main([str(run), "--batches", "4"])


def test_a_directory_that_is_no_run_or_a_model_without_memory_is_refused(tmp_path, corpus_file, cache_dir, script):
    with pytest.raises(
        SystemExit, match=r"has no checkpoints/ folder and is no checkpoint; allowed: a training run directory"
    ):
        script.main([str(tmp_path)])
    run = tmp_path / "dense"
    options = tiny_train_options(
        corpus_file, cache_dir, run, max_steps=1, warmup_steps=1, eval_interval=1, ckpt_interval=1
    )
    trainer = Trainer(TrainConfig(**options))
    trainer.fit()
    trainer.close()
    with pytest.raises(SystemExit, match=r"without a sparse memory \(memory_layers=\[\]\); allowed: a run whose model"):
        script.main([str(run)])
