"""Pattention layer forward+backward against the two-matmul floor and an equal-parameter MLP.

For input ``x [T, d]`` (requiring grad, as inside a network) and ``n`` parameter tokens, each arm
computes an output of shape ``[T, d]`` and back-propagates a fixed gradient into ``x`` and its
weights:

- ``floor``: ``(x @ K^T) @ V``, the same two products with nothing in between (6 matmuls in all);
- ``mlp``: ``Linear(d, n) -> GELU -> Linear(n, d)``, the same 2dn weights, no biases;
- ``reference``: Pattention, the plain formula (``impl="reference"``);
- ``fused``: Pattention, the registered operator with torch ops inside (``impl="fused"``);
- ``triton``: Pattention, the registered operator with the Triton kernels (when triton is
  installed: on CUDA, or on the CPU under ``TRITON_INTERPRET=1``, which checks the path, not its speed).

bf16 means autocast with float32 weights, as in mixed-precision training. ``--compile`` adds
``torch.compile`` versions of the mlp, reference and fused arms (timed against the same eager
floor). Saved activations are the bytes autograd keeps for backward beyond the input and the
weights; peak memory is the most allocated during a step above what was allocated before it.

    python benchmarks/pattention.py --out benchmarks/results/pattention-cpu.md
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os

import torch
import torch.nn.functional as F
from common import (
    add_common_arguments,
    fmt_mib,
    fmt_ms,
    interleaved_times,
    median,
    paired_ratio,
    peak_memory_bytes,
    repeats_for,
    saved_activation_bytes,
    setup,
    write_report,
)

from tokenformer.experiments.runner import markdown_table
from tokenformer.pattention import pattention, triton_available

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        t, d, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like TxDxN (e.g. 4096x256x768), got {text!r}") from None
    return t, d, n


class Case:
    """Inputs, weights and the forward function of every arm for one shape and dtype."""

    def __init__(self, shape: tuple[int, int, int], dtype: str, device: torch.device, compile_arms: bool) -> None:
        t, d, n = shape
        gen = torch.Generator(device="cpu").manual_seed(0)

        def param(*size: int, std: float) -> torch.Tensor:
            return (torch.randn(*size, generator=gen) * std).to(device).requires_grad_()

        self.device = device
        self.dtype = DTYPES[dtype]
        self.x = param(t, d, std=1.0)
        self.keys, self.values = param(n, d, std=0.02), param(n, d, std=0.02)
        self.w1, self.w2 = param(n, d, std=0.02), param(d, n, std=0.02)
        self.tau = torch.tensor(math.sqrt(n), device=device)
        self.grad = torch.randn(t, d, generator=gen).to(device)
        forwards = {
            "floor": lambda: (self.x @ self.keys.T) @ self.values,
            "mlp": lambda: F.linear(F.gelu(F.linear(self.x, self.w1)), self.w2),
            "reference": lambda: pattention(self.x, self.keys, self.values, self.tau, impl="reference"),
            "fused": lambda: pattention(self.x, self.keys, self.values, self.tau, impl="fused"),
        }
        if triton_available() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
            forwards["triton"] = lambda: pattention(self.x, self.keys, self.values, self.tau, impl="triton")
        if compile_arms:
            for name in ("mlp", "reference", "fused"):
                forwards[f"{name} compiled"] = torch.compile(forwards[name], fullgraph=True)
        self.forwards = forwards

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def forward(self, name: str) -> torch.Tensor:
        with self.autocast():
            return self.forwards[name]()

    def step(self, name: str) -> None:
        for p in (self.x, self.keys, self.values, self.w1, self.w2):
            p.grad = None
        self.forward(name).backward(self.grad.to(self.dtype))

    def weights_and_input(self) -> list[torch.Tensor]:
        return [self.x, self.keys, self.values, self.w1, self.w2]


def run_case(shape, dtype, device, args) -> list[list[object]]:
    case = Case(shape, dtype, device, args.compile)
    arms = {name: (lambda name=name: case.step(name)) for name in case.forwards}
    times = interleaved_times(arms, repeats_for(args, dtype), args.warmup, device, args.clock)
    saved = {
        name: saved_activation_bytes(lambda name=name: case.forward(name), case.weights_and_input())
        for name in case.forwards
        if "compiled" not in name
    }
    peak = {name: peak_memory_bytes(arms[name], device) for name in saved}
    t, d, n = shape
    rows = []
    for name in case.forwards:
        eager = name in saved
        rows.append(
            [
                f"T={t} d={d} n={n}",
                dtype,
                name,
                fmt_ms(median(times[name])),
                f"{paired_ratio(times, name, 'floor'):.3f}",
                fmt_mib(saved[name]) if eager else "-",
                f"{saved[name] / saved['mlp']:.2f}" if eager else "-",
                fmt_mib(peak[name]) if eager else "-",
                f"{peak[name] / peak['mlp']:.2f}" if eager else "-",
            ]
        )
    print(markdown_table(HEADERS, rows), flush=True)
    return rows


HEADERS = ["shape", "dtype", "arm", "median ms", "x floor", "saved MiB", "saved x MLP", "peak MiB", "peak x MLP"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes", type=parse_shape, nargs="+", default=[(4096, 256, 768), (4096, 512, 2048)], metavar="TxDxN"
    )
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd arms")
    add_common_arguments(parser, repeats=15)
    args = parser.parse_args(argv)
    device = setup(args)
    rows = []
    for shape in args.shapes:
        for dtype in args.dtypes:
            rows += run_case(shape, dtype, device, args)
    body = (
        "Forward+backward of one layer; `x floor` is the median over rounds of the arm's time divided "
        "by the floor's time in the same round (the floor is eager in every row). Saved and peak "
        "memory are measured on the eager arms.\n\n" + markdown_table(HEADERS, rows)
    )
    title = "Pattention layer: time and memory against the matmul floor and an MLP"
    print(write_report(args.out, title, device, args.clock, body))


if __name__ == "__main__":
    main()
