"""Metrics: ``metrics.jsonl`` always, TensorBoard and Weights & Biases when asked, a loss-curve PNG.

A record is one step's values of one kind:

- ``train`` (every ``log_interval`` steps): ``loss`` (the training loss of that step), ``lr``,
  ``tokens_per_s`` (training throughput since the last record);
- ``val`` (every ``eval_interval`` steps): the task's validation metrics under their own names
  (``val_loss``, ``val_ppl``, ``val_loss_se``, ``val_tokens`` = tokens in the validation windows,
  ``val_accuracy``, ...);
- ``event``: something that happened to the model, named by ``event`` (``grow``, ``stack``) with
  its details (``parameters`` after it, the sizes before and after, ...).

Every record also has ``step``, ``kind``, ``train_tokens`` (items trained on so far: tokens, or
images for a classifier) and ``train_flops`` (training FLOPs so far), so any of them can be
plotted against steps, tokens or FLOPs. A number that is not finite (NaN, infinity) is written
as ``null``: every line is valid JSON.

The trainer calls loggers through :class:`Logger`: ``log(step, kind, values)`` and ``close()``.
"""

from __future__ import annotations

import json
import math
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from .. import io
from ..validation import is_int

METRICS = "metrics.jsonl"
LOSS_CURVE = "loss_curve.png"
TENSORBOARD = "tensorboard"
WANDB = "wandb"
# Fields of every record that say where in training it was.
PROGRESS = ("train_tokens", "train_flops")
AXES = {"step": "step", "train_tokens": "tokens trained", "train_flops": "training FLOPs"}
CURVE_LABELS = {"train": "train", "val": "validation"}


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of ``values`` (sample standard deviation / sqrt(n)); NaN below two."""
    if len(values) < 2:
        return float("nan")
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


class Logger(Protocol):
    """Where the trainer's records go; ``values`` holds every field of a record but ``step`` and ``kind``."""

    def log(self, step: int, kind: str, values: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def finite_or_null(value: Any) -> Any:
    """``value`` with every float that is not finite (also inside lists and mappings) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def scalars(kind: str, values: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a record as dashboard tags: ``train/loss``, ``val/val_loss``,
    ``event/grow/parameters``. The progress fields are tagged once, in training records."""
    prefix = f"event/{values['event']}" if kind == "event" else kind
    return {
        f"{prefix}/{name}": float(value)
        for name, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (kind == "train" or name not in PROGRESS)
    }


class JsonLinesLogger:
    """Appends one JSON object per record to ``<run>/metrics.jsonl``.

    On resume from step ``start_step``, records after it (written by the interrupted run before
    it died) and the events of that step (the checkpoint's history says which happened before
    it; the trainer logs them again) are dropped first, so the file holds one history. Records of
    older versions of this file are rewritten under the current names.
    """

    def __init__(self, run_dir: str | Path, start_step: int = 0) -> None:
        self.path = Path(run_dir) / METRICS
        kept = [
            r
            for r in read_metrics(self.path)
            if r["step"] < start_step or (r["step"] == start_step and r["kind"] != "event")
        ]
        io.atomic_write_text(self.path, "".join(_line(r) for r in kept))
        with io.writing(self.path):
            self._file = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, kind: str, values: Mapping[str, Any]) -> None:
        with io.writing(self.path):
            self._file.write(_line({"step": step, "kind": kind, **values}))
            self._file.flush()

    def close(self) -> None:
        with io.writing(self.path):
            self._file.close()


def _line(record: Mapping[str, Any]) -> str:
    return json.dumps(finite_or_null(record), allow_nan=False) + "\n"


class TensorBoardLogger:
    """Scalars (see :func:`scalars`) and, for events, their whole record as text."""

    def __init__(self, run_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD))

    def log(self, step: int, kind: str, values: Mapping[str, Any]) -> None:
        for tag, value in scalars(kind, values).items():
            self._writer.add_scalar(tag, value, step)
        if kind == "event":
            text = json.dumps(finite_or_null(dict(values)), indent=1)
            self._writer.add_text(f"event/{values['event']}", f"```\n{text}\n```", step)

    def close(self) -> None:
        self._writer.close()


class WandbLogger:
    """A Weights & Biases run in ``<run>/wandb``: the scalars of every record, the training config,
    and a table of the events. ``WANDB_MODE=offline`` keeps it on disk (``wandb sync`` uploads it
    later). A resumed run continues the same W&B run: its id is kept in ``<run>/wandb/run-id``."""

    def __init__(self, run_dir: str | Path, project: str, config: Mapping[str, Any] | None = None) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise ImportError(
                f"loggers: [wandb] needs the wandb package: pip install 'tokenformer[wandb]' ({exc})"
            ) from exc
        run_dir = Path(run_dir)
        directory = run_dir / WANDB
        directory.mkdir(parents=True, exist_ok=True)
        id_file = directory / "run-id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        io.atomic_write_text(id_file, run_id + "\n")
        self._run = wandb.init(
            project=project,
            name=run_dir.resolve().name,
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            config=dict(config or {}),
        )
        self._events: list[list[Any]] = []

    def log(self, step: int, kind: str, values: Mapping[str, Any]) -> None:
        numbers = scalars(kind, values)
        if kind == "event":
            import wandb

            self._events.append([step, values["event"], json.dumps(finite_or_null(dict(values)))])
            numbers["events"] = wandb.Table(columns=["step", "event", "record"], data=self._events)
        self._run.log(numbers, step=step)

    def close(self) -> None:
        self._run.finish()


class MetricsLogger:
    """The loggers of a run: JSON lines always, those named in ``loggers`` (``tensorboard``,
    ``wandb``), and ``extra`` ones of the caller's. TensorBoard is skipped with a warning when it
    is not installed; W&B, which a user asks for explicitly, raises an ImportError instead."""

    def __init__(
        self,
        run_dir: str | Path,
        start_step: int = 0,
        loggers: Sequence[str] = ("tensorboard",),
        config: Mapping[str, Any] | None = None,
        wandb_project: str = "tokenformer",
        extra: Sequence[Logger] = (),
    ) -> None:
        self.run_dir = Path(run_dir)
        self.loggers: list[Logger] = [JsonLinesLogger(self.run_dir, start_step)]
        try:
            if "tensorboard" in loggers:
                try:
                    self.loggers.append(TensorBoardLogger(self.run_dir))
                except ImportError:
                    warnings.warn(
                        "TensorBoard is not installed, so no TensorBoard events are written "
                        "(pip install 'tokenformer[tensorboard]', or leave tensorboard out of loggers)",
                        stacklevel=2,
                    )
            if "wandb" in loggers:
                self.loggers.append(WandbLogger(self.run_dir, wandb_project, config))
            self.loggers.extend(extra)
        except BaseException:
            self.close()
            raise

    def log(self, step: int, kind: str, **values: Any) -> None:
        for logger in self.loggers:
            logger.log(step, kind, values)

    def event(self, step: int, name: str, **details: Any) -> None:
        """A ``kind: event`` record named ``name`` (``grow``, ``stack``, ...)."""
        self.log(step, "event", event=name, **details)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


# -- reading ------------------------------------------------------------------------------------

# Older files: training records counted `tokens` and `flops`; validation records dropped the
# `val_` prefix, so their `tokens` meant the validation tokens.
_OLD_TRAIN_NAMES = {"tokens": "train_tokens", "flops": "train_flops"}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics file, under the current names.

    A number that was not finite is None, also in files written before it was stored as null. A
    line that is not a record (not UTF-8 JSON, no integer step, a number that is not one) is
    skipped with a warning naming the file and the line; a last line cut short by a crash
    (no line end) is skipped silently.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    lines = path.read_bytes().split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = _record(line)
        if record is not None:
            records.append(finite_or_null(_current_names(record)))
        elif number < len(lines):  # the last piece has no line end: cut short by a crash
            warnings.warn(f"{path} line {number} is not a metrics record; skipped: {line[:80]!r}", stacklevel=2)
    return records


# Fields of a record that the curves read: numbers (null where not finite).
_NUMBERS = ("loss", "val_loss", *PROGRESS)


def _record(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not (isinstance(record, dict) and is_int(record.get("step")) and isinstance(record.get("kind"), str)):
        return None
    if any(record.get(name) is not None and not isinstance(record[name], (int, float)) for name in _NUMBERS):
        return None
    return record


def _current_names(record: dict[str, Any]) -> dict[str, Any]:
    if record["kind"] == "train" and "train_tokens" not in record:
        return {_OLD_TRAIN_NAMES.get(k, k): v for k, v in record.items()}
    if record["kind"] == "val" and "val_loss" not in record:  # every task's validation has val_loss
        return {k if k in ("step", "kind") else f"val_{k}": v for k, v in record.items()}
    return record


def loss_curves(
    records: Sequence[Mapping[str, Any]], axis: str, growth_steps: Sequence[int] = ()
) -> tuple[dict[str, list[tuple[float, float]]], list[float]]:
    """What the loss curve draws against ``axis`` (``step``, ``train_tokens`` or ``train_flops``):
    the (x, loss) points of the training and validation curves, and where growth happened (the
    ``grow`` and ``stack`` events, and ``growth_steps`` not among them).

    Records without the tokens or FLOPs (older files) are placed by the training records around
    their step.
    """
    import numpy as np

    train = [r for r in records if r["kind"] == "train" and all(r.get(a) is not None for a in PROGRESS)]
    steps = [r["step"] for r in train]

    def position(record: Mapping[str, Any]) -> float:
        if axis == "step" or record.get(axis) is not None:
            return record[axis]
        return float(np.interp(record["step"], steps, [r[axis] for r in train])) if train else math.nan

    curves = {}
    for kind, field in (("train", "loss"), ("val", "val_loss")):
        points = [(position(r), r[field]) for r in records if r["kind"] == kind and r.get(field) is not None]
        curves[kind] = [p for p in points if math.isfinite(p[0])]
    growth = [r for r in records if r["kind"] == "event" and r.get("event") in ("grow", "stack")]
    growth += [{"step": s} for s in growth_steps if s not in {r["step"] for r in growth}]
    marks = sorted(x for x in map(position, growth) if math.isfinite(x))
    return curves, marks


def plot_loss_curve(run_dir: str | Path, growth_steps: Sequence[int] = ()) -> Path:
    """``loss_curve.png``: training and validation loss against steps, tokens trained and training
    FLOPs, side by side, growth marked by vertical lines (see :func:`loss_curves`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / METRICS)
    fig, axes = plt.subplots(1, len(AXES), figsize=(15, 4), sharey=True)
    for ax, (axis, label) in zip(axes, AXES.items(), strict=True):
        curves, marks = loss_curves(records, axis, growth_steps)
        for (kind, points), style in zip(curves.items(), ("-", "o-"), strict=True):
            if points:
                ax.plot(*zip(*points, strict=True), style, label=CURVE_LABELS[kind], markersize=3)
        for i, x in enumerate(marks):
            ax.axvline(x, color="grey", linestyle="--", label="growth" if i == 0 else None)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (nats/token)")
    axes[0].legend()
    path = run_dir / LOSS_CURVE
    io.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path
