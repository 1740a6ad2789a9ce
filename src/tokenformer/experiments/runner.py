"""What every experiment shares: cached, resumable runs; worker processes; the choice of a
learning rate on a grid; comparisons paired by seed; the machine and the commit; Markdown tables
and reports.

A run lives in its own directory. Training there resumes from its newest checkpoint, and the
run is finished once its ``result.json`` exists: an experiment started again skips finished runs
and continues unfinished ones, so an interrupted experiment loses at most the steps since a
run's last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from .. import io
from ..train.metrics import standard_error
from ..validation import invalid, is_int, is_number

RESULT = "result.json"


def check_lr_grid(name: str, grid: Any, what: str) -> None:
    """A learning-rate grid: a non-empty list of distinct rates > 0."""
    if not isinstance(grid, list) or not grid or not all(is_number(v) and v > 0 for v in grid):
        raise invalid(what, name, grid, "a non-empty list of learning rates > 0")
    if len(set(grid)) != len(grid):
        raise invalid(what, name, grid, "distinct learning rates")


def check_seeds(name: str, seeds: Any, what: str) -> None:
    """Seeds: a non-empty list of distinct integers >= 0."""
    if not isinstance(seeds, list) or not seeds or not all(is_int(s) and s >= 0 for s in seeds):
        raise invalid(what, name, seeds, "a non-empty list of integers >= 0")
    if len(set(seeds)) != len(seeds):
        raise invalid(what, name, seeds, "distinct seeds")


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


def seed_name(seed: int) -> str:
    return f"seed-{seed}"


def run_jobs(function: Callable[[Any], Any], jobs: Sequence[Any], workers: int, isolate: bool = False) -> list[Any]:
    """``function(job)`` for every job, ``workers`` worker processes at a time. Each job gets a
    fresh process: training leaves threads and caches behind. With one worker the jobs run in
    this process instead, unless ``isolate`` (for timings that an earlier job's compiled code or
    threads must not change)."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if not jobs:
        return []
    if not isolate and (workers == 1 or len(jobs) == 1):
        return [function(job) for job in jobs]
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(workers, len(jobs)), maxtasksperchild=1) as pool:
        return pool.map(function, jobs, chunksize=1)


def prepare_data(config: Any) -> None:
    """Build the tokenizer and token shards of a run's ``config`` (a TrainConfig) into the cache.

    Called once before worker processes start: workers that all found the cache empty would
    each build the same files at once.
    """
    from ..train.tasks import make_task

    make_task(config)


def paired(values: dict[Any, float], baseline: dict[Any, float]) -> dict[str, Any] | None:
    """Mean and standard error of ``values[k] - baseline[k]`` over the keys (seeds) both have."""
    keys = sorted(set(values) & set(baseline))
    if not keys:
        return None
    diffs = [values[k] - baseline[k] for k in keys]
    return {"mean": statistics.fmean(diffs), "se": standard_error(diffs), "n": len(keys), "diffs": diffs}


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
        "load_average": load_average(),
    }
    if torch.cuda.is_available() and device != "cpu":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def load_average() -> float | None:
    """The system's one-minute load average (None where the platform has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _cpuinfo(key: str) -> str | None:
    """The first ``key`` line of ``/proc/cpuinfo`` (None where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(key)), None)


def cpu_flags() -> list[str]:
    """The CPU's vector and matrix extensions that decide the speed of a kernel (``/proc/cpuinfo``)."""
    flags = set((_cpuinfo("flags") or "").split())
    return [flag for flag in VECTOR_FLAGS if flag in flags]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the platform's."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_model() -> str:
    """The CPU's model name and its vector/bf16 class."""
    return f"{cpu_name()} ({', '.join(cpu_flags()) or 'no AVX2'})"


def machine_description(device: str | Any) -> str:
    """The machine as Markdown bullets: CPU (cores, threads, vector flags), software, GPU."""
    import torch

    device = torch.device(device)
    flags = " ".join(cpu_flags()) or "none of " + "/".join(VECTOR_FLAGS)
    lines = [
        f"- CPU: {cpu_name()} ({os.cpu_count()} logical cores visible, torch threads {torch.get_num_threads()}; "
        f"vector flags: {flags})",
        f"- Python {platform.python_version()}, torch {torch.__version__}, {platform.system()} {platform.release()}",
    ]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"- GPU: {props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}")
    return "\n".join(lines)


def read_plan(path: str | Path, out_dir: str | None = None, what: str = "plan") -> dict[str, Any]:
    """The fields of a YAML plan file (``out_dir`` overrides the file's), for the plan class to validate."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must be a YAML mapping of its fields, got {type(data).__name__}")
    if out_dir is not None:
        data["out_dir"] = out_dir
    return data


def experiment_main(
    argv: list[str] | None,
    module: str,
    description: str,
    example_plan: str,
    load: Callable[[str, str | None], Any],
    run: Callable[[Any, str, bool], dict[str, Any]],
    report: Callable[[dict[str, Any]], str],
) -> None:
    """The command line of an experiment module: ``python -m MODULE PLAN.yaml [--out_dir DIR]
    [--report_only]``; runs (or continues) the plan and prints its report."""
    import torch

    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("plan", help=f"a YAML plan ({example_plan})")
    parser.add_argument("--out_dir", default=None, help="overrides the plan's out_dir")
    parser.add_argument("--report_only", action="store_true", help="report the finished runs; run nothing")
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    plan = load(args.plan, args.out_dir)
    command = command_line(f"python -m {module}", sys.argv[1:] if argv is None else argv)
    print(report(run(plan, command, args.report_only)))


def source_version() -> str:
    """The commit of the checkout this library runs from (``-dirty`` with uncommitted changes)."""
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git)"
    return done.stdout.strip() or "unknown (not a git checkout)"


def command_line(program: str, argv: Sequence[str]) -> str:
    """A command as a user types it: ``program`` and the arguments, quoted for the shell."""
    return " ".join([program, shlex.join(argv)]) if argv else program


def write_report(
    path: str | Path | None,
    title: str,
    body: str,
    command: str,
    device: str | Any = "cpu",
    launched_at: str | None = None,
    timing: str = "wall-clock seconds",
) -> str:
    """A Markdown report: title, the command and the commit, the machine, then ``body``; written
    atomically to ``path`` when one is given.

    ``launched_at``: the commit when a long experiment started (``source_version()`` then); the
    report names it, and the commit at the end too where the two differ.
    """
    finished_at = source_version()
    version = (
        finished_at
        if launched_at in (None, finished_at)
        else f"{launched_at} when it started, {finished_at} when it finished"
    )
    text = (
        f"# {title}\n\n"
        f"Command (from the repository root, at commit {version}):\n\n    {command}\n\n"
        f"Machine:\n\n{machine_description(device)}\n"
        f"- Times are {timing}; run finished {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n\n{body}\n"
    )
    if path:
        io.atomic_write_text(Path(path), text)
    return text


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, spec: str = ".4f", missing: str = "—") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)
