"""Shared measuring code for the benchmark scripts: interleaved repeats, saved-activation and
peak-memory accounting. Reports (command, commit, machine, Markdown tables) are the experiments'
own: :mod:`tokenformer.experiments.runner`.

Every arm of a comparison is timed in the same rounds, one call each, in an order that rotates
from round to round, so that load from other processes falls on all arms alike. Reported:
the median time per arm and the median over rounds of each arm's time divided by the
baseline's time in the same round.

``--clock cpu`` times the CPU seconds this process used instead of wall-clock seconds: on a
machine shared with other jobs, with ``--threads 1``, it leaves out the time the process waited
for a core (with several threads it would count threads spinning at barriers).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # time this checkout's code, whichever tokenformer is installed

from tokenformer.experiments import runner  # noqa: E402


def add_common_arguments(parser: argparse.ArgumentParser, repeats: int) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds per case")
    parser.add_argument(
        "--repeats-bf16", type=int, default=None, help="timed rounds for bf16 cases (default: --repeats)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (compilation happens here)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--clock", choices=list(CLOCKS), default="wall", help="wall-clock or process CPU time (CPU only)"
    )
    parser.add_argument("--out", default=None, help="write the markdown report here")


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def setup(args: argparse.Namespace) -> torch.device:
    device = torch.device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit(f"--clock cpu measures CPU work; it cannot time a {device.type} device (use --clock wall)")
    # Denormals in late training steps slow CPU kernels by up to 7x.
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    return device


def repeats_for(args: argparse.Namespace, dtype: str) -> int:
    return args.repeats_bf16 if dtype == "bf16" and args.repeats_bf16 else args.repeats


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    arms: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device, clock: str = "wall"
) -> dict[str, list[float]]:
    """Seconds per call of each arm, ``repeats`` rounds after ``warmup`` untimed rounds."""
    now = CLOCKS[clock]
    names = list(arms)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = now()
            arms[name]()
            synchronize(device)
            if round_ >= warmup:
                times[name].append(now() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(times: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over rounds of ``time(name) / time(baseline)`` in the same round."""
    return statistics.median(a / b for a, b in zip(times[name], times[baseline], strict=True))


def saved_activation_bytes(step: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward during ``step()``, leaving
    out those of ``exclude`` (parameters and inputs: they exist whatever the layer keeps)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    del out
    return sum(seen.values())


def peak_memory_bytes(step: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated during ``step()`` above what was allocated before it."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    # CPU: replay the allocator's allocation and free events recorded by the profiler.
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def status_bytes(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of ``/proc/self/status`` in bytes (Linux). For a fresh process's
    peak RSS, ``VmHWM`` rather than ``ru_maxrss``: after fork and exec ``ru_maxrss`` starts at the
    parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise SystemExit(f"no {field} in /proc/self/status: peak RSS needs Linux")


def command_line() -> str:
    return runner.command_line("python " + os.path.relpath(sys.argv[0], ROOT), sys.argv[1:])


def write_report(
    path: str | None, title: str, device: torch.device, clock: str, body: str, launched_at: str | None = None
) -> str:
    """The report as markdown (command, commit, machine, then ``body``); written atomically to
    ``path`` when one is given."""
    timing = "wall-clock seconds" if clock == "wall" else "CPU seconds of this process (--clock cpu)"
    return runner.write_report(path, title, body, command_line(), device, launched_at, timing)


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def fmt_mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"
