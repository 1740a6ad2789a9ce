"""metrics.jsonl, TensorBoard and W&B records: valid JSON, one meaning per name, events, old files."""

import json
import struct

import pytest
from conftest import tiny_train_options

from tokenformer.train import TrainConfig, Trainer, read_metrics
from tokenformer.train.metrics import MetricsLogger, loss_curves, plot_loss_curve

pytestmark = pytest.mark.usefixtures("one_thread")


def strict_json(line: str):
    """json.loads, refusing the NaN and Infinity that Python writes but JSON does not have."""

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(line, parse_constant=refuse)


def make_trainer(tmp_path, corpus_file, cache_dir, **overrides) -> Trainer:
    return Trainer(TrainConfig(**tiny_train_options(corpus_file, cache_dir, tmp_path / "run", **overrides)))


def test_every_line_is_valid_json_when_a_value_is_not_finite(tmp_path, corpus_file, cache_dir):
    # One validation batch: the standard error of its mean is NaN.
    trainer = make_trainer(tmp_path, corpus_file, cache_dir, max_steps=2, eval_interval=2, eval_batches=1)
    trainer.fit()
    trainer._metrics.log(2, "val", val_loss=float("inf"), nested=[float("nan"), 1.0])
    trainer.close()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [strict_json(line) for line in lines]
    assert records[-2]["kind"] == "val" and records[-2]["val_loss_se"] is None
    assert records[-1]["val_loss"] is None and records[-1]["nested"] == [None, 1.0]
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == records


def test_each_field_name_means_one_thing(tmp_path, corpus_file, cache_dir):
    trainer = make_trainer(tmp_path, corpus_file, cache_dir, max_steps=4, eval_interval=4, log_interval=2)
    trainer.fit()
    trainer.close()
    train, val = (
        [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == kind] for kind in ("train", "val")
    )
    tokens_per_step = 4 * 32
    assert [r["train_tokens"] for r in train] == [2 * tokens_per_step, 4 * tokens_per_step]
    # A validation record says how far training got and, separately, how many tokens it validated on.
    assert val[0]["train_tokens"] == 4 * tokens_per_step and val[0]["train_flops"] == train[-1]["train_flops"]
    assert val[0]["val_tokens"] == 2 * 4 * 32  # eval_batches x batch_size windows of seq_len tokens
    assert "tokens" not in train[0] and "tokens" not in val[0] and "loss" not in val[0]


def test_growth_and_stacking_are_events_in_metrics_and_tensorboard(tmp_path, corpus_file, cache_dir):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    trainer = make_trainer(tmp_path, corpus_file, cache_dir, max_steps=6, eval_interval=2, ckpt_interval=6)
    trainer.fit(2)
    trainer.grow(ffn_tokens=48)
    trainer.fit(4)
    trainer.stack(4)
    trainer.fit()
    trainer.close()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    events = [r for r in records if r["kind"] == "event"]
    assert [(e["step"], e["event"]) for e in events] == [(2, "grow"), (4, "stack")]
    grow, stack = events
    assert grow["train_tokens"] == 2 * 4 * 32 and grow["after"][0]["ffn"] == 48 and grow["function_preserving"]
    assert stack["n_layers_after"] == 4 and stack["parameters"] == sum(p.numel() for p in trainer.model.parameters())
    assert grow["parameters"] < stack["parameters"]
    # The event is logged between the validation of its step and the next training record.
    assert [r["kind"] for r in records if r["step"] == 2] == ["train", "val", "event"]

    accumulator = event_accumulator.EventAccumulator(
        str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}
    )
    accumulator.Reload()
    tags = accumulator.Tags()
    assert [(e.step, e.value) for e in accumulator.Scalars("event/grow/parameters")] == [(2, grow["parameters"])]
    assert [e.step for e in accumulator.Scalars("event/stack/n_layers_after")] == [4]
    assert "event/grow/text_summary" in tags["tensors"]
    assert [e.step for e in accumulator.Scalars("val/val_loss")] == [2, 4, 6]
    assert [e.step for e in accumulator.Scalars("train/loss")] == list(range(1, 7))


def test_a_resumed_run_logs_each_growth_once(tmp_path, corpus_file, cache_dir):
    trainer = make_trainer(tmp_path, corpus_file, cache_dir, max_steps=6, eval_interval=2, ckpt_interval=2)
    trainer.fit(2)
    trainer.grow(ffn_tokens=48)
    trainer.close()  # stops here: its newest checkpoint (step 2) was written before the growth
    again = make_trainer(tmp_path, corpus_file, cache_dir, max_steps=6, eval_interval=2, ckpt_interval=2, resume="auto")
    assert again.state.step == 2 and not again.state.growth_history
    again.fit(2)  # opens the log as of step 2: the growth that the checkpoint does not hold is gone
    again.grow(ffn_tokens=48)
    again.fit()
    again.close()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [(r["step"], r["event"]) for r in records if r["kind"] == "event"] == [(2, "grow")]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 7))


OLD_FILE = """\
{"step": 1, "kind": "train", "loss": 6.0, "lr": 0.001, "tokens": 100, "flops": 1000.0, "tokens_per_s": 50.0}
{"step": 2, "kind": "train", "loss": 5.0, "lr": 0.002, "tokens": 200, "flops": 2000.0, "tokens_per_s": 50.0}
{"step": 2, "kind": "val", "loss": 5.5, "ppl": 244.7, "loss_se": NaN, "tokens": 64}
{"step": 3, "kind": "train", "loss": 4.0, "lr": 0.002, "tokens": 300, "flops": 4000.0, "tokens_per_s": 50.0}
{"step": 4, "kind": "train", "loss": 3.0, "lr": 0.002, "tokens": 400, "flops": 6000.0, "tokens_per_s": 50.0}
{"step": 4, "kind": "val", "loss": 3.5, "ppl": 33.1, "loss_se": 0.1, "tokens": 64}
"""


def test_files_of_older_versions_read_under_the_current_names_and_plot(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(OLD_FILE)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[0] == {
        "step": 1,
        "kind": "train",
        "loss": 6.0,
        "lr": 0.001,
        "train_tokens": 100,
        "train_flops": 1000.0,
        "tokens_per_s": 50.0,
    }
    assert records[2] == {
        "step": 2,
        "kind": "val",
        "val_loss": 5.5,
        "val_ppl": 244.7,
        "val_loss_se": None,
        "val_tokens": 64,
    }
    # Validation points of an old file take the tokens and FLOPs of the training records at their step.
    curves, marks = loss_curves(records, "train_flops", growth_steps=[3])
    assert curves["val"] == [(2000.0, 5.5), (6000.0, 3.5)] and marks == [4000.0]
    assert loss_curves(records, "train_tokens")[0]["train"] == [(100, 6.0), (200, 5.0), (300, 4.0), (400, 3.0)]
    assert plot_loss_curve(tmp_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A run resumed in that directory rewrites the kept records under the current names.
    MetricsLogger(tmp_path, start_step=4, loggers=[]).close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [strict_json(line) for line in lines] == records


def test_loss_curve_is_drawn_against_steps_tokens_and_flops(tmp_path, corpus_file, cache_dir):
    trainer = make_trainer(tmp_path, corpus_file, cache_dir, max_steps=4, eval_interval=2, log_interval=1)
    trainer.fit(2)
    trainer.grow(ffn_tokens=48)
    trainer.fit()
    trainer.close()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    flops = {r["step"]: r["train_flops"] for r in records if r["kind"] == "train"}
    curves, marks = loss_curves(records, "train_flops")
    assert [x for x, _ in curves["val"]] == [flops[2], flops[4]] and marks == [flops[2]]
    # After growth a token costs more FLOPs: the FLOPs axis is not the step axis rescaled.
    assert flops[4] - flops[3] > flops[2] - flops[1]
    tokens = loss_curves(records, "train_tokens")[0]["train"]
    assert [x for x, _ in tokens] == [step * 4 * 32 for step in range(1, 5)]


def test_unknown_loggers_are_refused():
    with pytest.raises(ValueError, match=r"loggers.*mlflow.*tensorboard, wandb"):
        TrainConfig(loggers=["mlflow"])


def wandb_history(run_file) -> list[dict]:
    """The history rows of a W&B transaction log (``run-<id>.wandb``: a LevelDB-style log of
    protobuf records in 32 KiB blocks after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    raw, block, offset, records, pending = run_file.read_bytes(), 32768, 7, [], b""
    while offset + 7 <= len(raw):
        left = block - offset % block
        if left < 7:
            offset += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[offset : offset + 7])
        if kind == 0:  # the zero padding at the end of a block
            offset += left
            continue
        chunk, offset = raw[offset + 7 : offset + 7 + length], offset + 7 + length
        if kind in (1, 2):  # whole record, first part
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):  # whole record, last part
            records.append(pending)
    rows = []
    for data in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


def test_wandb_offline_run_holds_the_records(tmp_path, corpus_file, cache_dir, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer = make_trainer(
        tmp_path, corpus_file, cache_dir, max_steps=4, eval_interval=2, loggers=["wandb"], wandb_project="tests"
    )
    trainer.fit(2)
    trainer.grow(ffn_tokens=48)
    trainer.fit()
    trainer.close()
    run = tmp_path / "run"
    run_id = (run / "wandb" / "run-id").read_text().strip()
    [run_file] = (run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    rows = {row["_step"]: row for row in wandb_history(run_file)}
    records = read_metrics(run / "metrics.jsonl")
    for record in records:
        row = rows[record["step"]]
        if record["kind"] == "train":
            assert row["train/loss"] == pytest.approx(record["loss"])
        elif record["kind"] == "val":
            assert row["val/val_loss"] == pytest.approx(record["val_loss"]) and "val/train_tokens" not in row
        else:
            assert row["event/grow/parameters"] == record["parameters"]
    assert not (run / "tensorboard").exists()  # only the loggers asked for


def test_missing_wandb_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"tokenformer\[wandb\]"):
        MetricsLogger(tmp_path, loggers=["wandb"])


class ListLogger:
    """A logger of one's own: keeps the records."""

    def __init__(self):
        self.records, self.closed = [], False

    def log(self, step, kind, values):
        self.records.append({"step": step, "kind": kind, **values})

    def close(self):
        self.closed = True


def test_a_logger_of_ones_own_gets_every_record(tmp_path, corpus_file, cache_dir):
    mine = ListLogger()
    options = tiny_train_options(corpus_file, cache_dir, tmp_path / "run", max_steps=4, eval_interval=2, loggers=[])
    trainer = Trainer(TrainConfig(**options), loggers=[mine])
    trainer.fit(2)
    trainer.grow(ffn_tokens=48)
    trainer.fit()
    trainer.close()
    assert mine.closed and [r["kind"] for r in mine.records].count("event") == 1
    assert mine.records == read_metrics(tmp_path / "run" / "metrics.jsonl")
