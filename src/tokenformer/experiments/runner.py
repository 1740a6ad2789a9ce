"""What every experiment shares: cached, resumable runs; worker processes; the choice of a
learning rate on a grid; comparisons paired by seed; the machine; Markdown tables.

A run lives in its own directory. Training there resumes from its newest checkpoint, and the
run is finished once its ``result.json`` exists: an experiment started again skips finished runs
and continues unfinished ones, so an interrupted experiment loses at most the steps since a
run's last checkpoint.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import platform
import statistics
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .. import io

RESULT = "result.json"


def read_result(directory: str | Path) -> dict[str, Any] | None:
    """The stored result of a finished run, or None."""
    path = Path(directory) / RESULT
    return json.loads(path.read_text()) if path.is_file() else None


def write_result(directory: str | Path, result: dict[str, Any]) -> None:
    io.atomic_write_text(Path(directory) / RESULT, json.dumps(result, indent=1) + "\n")


def cached_run(directory: str | Path, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``run()``'s result, stored in ``directory``; the stored one if the run finished before."""
    done = read_result(directory)
    if done is not None:
        return done
    result = run()
    write_result(directory, result)
    return result


def lr_name(lr: float) -> str:
    return f"lr-{lr:g}"


def run_jobs(function: Callable[[Any], Any], jobs: Sequence[Any], workers: int) -> list[Any]:
    """``function(job)`` for every job, ``workers`` worker processes at a time (in this process
    with one worker). Each job gets a fresh process: training leaves threads and caches behind."""
    if workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if workers == 1 or len(jobs) <= 1:
        return [function(job) for job in jobs]
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, maxtasksperchild=1) as pool:
        return pool.map(function, jobs, chunksize=1)


def paired(values: dict[Any, float], baseline: dict[Any, float]) -> dict[str, Any] | None:
    """Mean and standard error of ``values[k] - baseline[k]`` over the keys (seeds) both have."""
    keys = sorted(set(values) & set(baseline))
    if not keys:
        return None
    diffs = [values[k] - baseline[k] for k in keys]
    return {"mean": statistics.fmean(diffs), "se": standard_error(diffs), "n": len(keys), "diffs": diffs}


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of ``values`` (sample standard deviation / sqrt(n)); NaN below two."""
    if len(values) < 2:
        return float("nan")
    return statistics.stdev(values) / math.sqrt(len(values))


def best_lr(by_lr: dict[float, dict[Any, float]], lower_is_better: bool = True) -> float:
    """The learning rate whose mean over seeds is best; only seeds that every rate has count."""
    common = set.intersection(*(set(seeds) for seeds in by_lr.values()))
    if not common:
        raise ValueError("no seed was run at every learning rate")

    def mean(lr: float) -> float:
        value = statistics.fmean(by_lr[lr][s] for s in common)
        return value if lower_is_better else -value

    return min(by_lr, key=mean)


def at_edge(lr: float, grid: Iterable[float]) -> bool:
    """Whether ``lr`` is the smallest or the largest rate of a grid of more than one."""
    grid = sorted(grid)
    return len(grid) > 1 and lr in (grid[0], grid[-1])


def machine(threads: int | None, device: str, precision: str) -> dict[str, Any]:
    """What a report says about the machine: CPU model and flags that matter, torch, threads."""
    import torch

    info = {
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": threads or torch.get_num_threads(),
        "device": device,
        "precision": precision,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available() and device != "cpu":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def cpu_model() -> str:
    """The CPU's model name and its vector/bf16 class (``/proc/cpuinfo``), else the platform's."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    features = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name or platform.machine()} ({', '.join(features) or 'no AVX2'})"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, spec: str = ".4f", missing: str = "—") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)
