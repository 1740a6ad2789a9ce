"""Activation checkpointing (``--activation_checkpointing``): the memory of a training step and
its time, with and without.

One training step is forward with targets, backward and the AdamW step of an eager language model
on a fixed batch of random tokens. Per preset and arm:

- ``peak step memory``: the allocator's peak during the step above what was allocated before it
  (CUDA's counters; on CPU replayed from the profiler's allocation events, see ``common.py``);
- ``peak RSS``: the peak resident set of a fresh process over two steps, less its resident set
  before the first (``/proc/self/status``; includes the optimizer state the first step creates,
  the same in both arms);
- ``saved activations``: bytes autograd keeps for backward, as seen outside the blocks;
- ``median ms``: the step's time, both arms in the same rounds (see ``common.py``).

    python benchmarks/activation_checkpointing.py --threads 1 --clock cpu \
        --out benchmarks/results/activation_checkpointing-cpu.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from common import (
    add_common_arguments,
    fmt_mib,
    fmt_ms,
    interleaved_times,
    median,
    paired_ratio,
    peak_memory_bytes,
    saved_activation_bytes,
    setup,
    status_bytes,
    write_report,
)

from tokenformer import TokenformerConfig, TokenformerLM
from tokenformer.experiments.runner import markdown_table
from tokenformer.model import set_activation_checkpointing

ARMS = {"kept": False, "checkpointed": True}
HEADERS = [
    "preset",
    "batch x seq",
    "arm",
    "peak step memory MiB",
    "peak RSS MiB",
    "saved activations MiB",
    "median ms",
    "x kept time",
]


def build(preset: str, batch: int, seq_len: int, checkpointed: bool, device: torch.device):
    """A model, its optimizer and one training step's function."""
    torch.manual_seed(0)
    config = TokenformerConfig.from_preset(preset, max_seq_len=max(seq_len, 256))
    model = TokenformerLM(config).to(device).train()
    if checkpointed:
        set_activation_checkpointing(model)
    optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4, fused=device.type in ("cpu", "cuda"))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len + 1), generator=gen).to(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(ids[:, :-1], ids[:, 1:])[1].backward()
        optimizer.step()

    return model, ids, step


def rss_child(args: argparse.Namespace) -> None:
    """Run in a fresh process: print the peak RSS of two training steps above the RSS before
    them, in bytes. (Not ``ru_maxrss``: after fork and exec it starts at the parent's size.)"""
    device = setup(args)
    _, _, step = build(args.presets[0], args.batch, args.seq_len, args.arm == "checkpointed", device)
    before = status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    step()
    step()
    print(json.dumps({"rss_growth": status_bytes("VmHWM") - before}))


def rss_growth(args: argparse.Namespace, preset: str, arm: str) -> int:
    command = [sys.executable, __file__, "--rss-arm", arm, "--presets", preset, "--device", args.device]
    command += ["--batch", str(args.batch), "--seq-len", str(args.seq_len)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["rss_growth"]


def rows_for(preset: str, device: torch.device, args: argparse.Namespace) -> list[list[object]]:
    steps, memory = {}, {}
    for arm, checkpointed in ARMS.items():
        model, ids, step = build(preset, args.batch, args.seq_len, checkpointed, device)
        step()  # the optimizer state exists from here on, in both arms
        memory[arm] = {
            "peak": peak_memory_bytes(step, device),
            "rss": rss_growth(args, preset, arm),
            "saved": saved_activation_bytes(
                lambda model=model, ids=ids: model(ids[:, :-1], ids[:, 1:])[1].backward(), list(model.parameters())
            ),
        }
        steps[arm] = step
    times = interleaved_times(steps, args.repeats, args.warmup, device, args.clock)
    rows = []
    for arm in ARMS:
        rows.append(
            [
                preset,
                f"{args.batch} x {args.seq_len}",
                arm,
                fmt_mib(memory[arm]["peak"]),
                fmt_mib(memory[arm]["rss"]),
                fmt_mib(memory[arm]["saved"]),
                fmt_ms(median(times[arm])),
                f"{paired_ratio(times, arm, 'kept'):.2f}",
            ]
        )
    ratios = [memory["checkpointed"][k] / (memory["kept"][k] or float("nan")) for k in ("peak", "rss")]
    print(f"{preset}: peak step memory x{ratios[0]:.2f}, peak RSS growth x{ratios[1]:.2f}", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, repeats=5)
    parser.add_argument("--presets", nargs="+", default=["cpu-1M", "cpu-5M"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rss-arm", choices=list(ARMS), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_arm is not None:
        args.arm = args.rss_arm
        rss_child(args)
        return
    device = setup(args)
    rows = [row for preset in args.presets for row in rows_for(preset, device, args)]
    body = (
        "`x kept time` is the median over rounds of the checkpointed step's time divided by the "
        "kept step's in the same round. Memory columns are described in the script's docstring.\n\n"
        + markdown_table(HEADERS, rows)
    )
    title = "Activation checkpointing: memory and time of a training step"
    print(write_report(args.out, title, device, args.clock, body))


if __name__ == "__main__":
    main()
