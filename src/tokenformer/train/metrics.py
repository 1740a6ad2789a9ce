"""Metrics: JSON lines always, TensorBoard when it is installed, a loss-curve PNG at the end."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import io

METRICS = "metrics.jsonl"
LOSS_CURVE = "loss_curve.png"


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of ``values`` (sample standard deviation / sqrt(n)); NaN below two."""
    if len(values) < 2:
        return float("nan")
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


class MetricsLogger:
    """Appends one JSON object per record to ``<run>/metrics.jsonl``.

    On resume from step ``start_step``, records after it (written by the interrupted run before
    it died) are dropped first, so the file holds one history without repeated steps.
    """

    def __init__(self, run_dir: str | Path, start_step: int = 0, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS
        kept = [r for r in read_metrics(self.path) if r["step"] <= start_step]
        io.atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        try:
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            raise io.write_error(self.path, exc) from exc
        self._tensorboard = _summary_writer(self.run_dir / "tensorboard") if tensorboard else None

    def log(self, step: int, kind: str, **values: Any) -> None:
        try:
            self._file.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
            self._file.flush()
        except OSError as exc:
            raise io.write_error(self.path, exc) from exc
        if self._tensorboard is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as exc:
            raise io.write_error(self.path, exc) from exc
        if self._tensorboard is not None:
            self._tensorboard.close()


def _summary_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the optional [tensorboard] extra is not installed
        return None
    return SummaryWriter(str(directory))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics file; a line cut short by a crash is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_loss_curve(run_dir: str | Path, growth_steps: list[int] = ()) -> Path:
    """Training and validation loss against step, growth marked by vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / METRICS)
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, label, style in (("train", "train", "-"), ("val", "validation", "o-")):
        points = [(r["step"], r["loss"]) for r in records if r["kind"] == kind and "loss" in r]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label, markersize=3)
    for i, step in enumerate(growth_steps):
        ax.axvline(step, color="grey", linestyle="--", label="growth" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    path = run_dir / LOSS_CURVE
    io.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path
