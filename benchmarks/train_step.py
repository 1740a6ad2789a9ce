"""Whole-model training and generation throughput: TokenFormer against the parameter-matched
Transformer (``config.parameter_matched_linear()``: same code path, bias-free Linear Q/K/V/O and
a Linear-GELU-Linear MLP whose width absorbs the difference in parameters). In both models the
query, key and value projections run as one group.

A training step is a forward with targets, backward and an AdamW step (the trainer's optimizer:
the fused implementation on CPU and CUDA) on a fixed batch of random tokens. Both models are
timed in the same rounds (see ``common.py``). bf16 is autocast with float32 weights.
``compiled`` wraps the model in ``torch.compile``, ``compiled-blocks`` each of its blocks (the
optimizer step stays eager in both arms). MFU divides the model's training FLOPs
(``tokenformer.flops``, attention included) per second by the throughput of a large matmul of
the same dtype timed in the same run. Generation is greedy decoding with the KV cache, eager.
``peak GiB`` is the most memory allocated during one training step above what was allocated
before it (model, optimizer state and batch).

    python benchmarks/train_step.py --out benchmarks/results/train_step-cpu.md
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from common import (
    add_common_arguments,
    fmt_ms,
    interleaved_times,
    median,
    paired_ratio,
    peak_memory_bytes,
    repeats_for,
    setup,
    write_report,
)

from tokenformer import Pattention, TokenformerConfig, TokenformerLM, training_flops_per_token
from tokenformer.experiments.runner import markdown_table
from tokenformer.pattention import IMPLS
from tokenformer.train import TrainConfig
from tokenformer.train.trainer import make_optimizer

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def matmul_peak_flops(device: torch.device, precision: str, size: int, repeats: int, clock: str) -> float:
    """FLOP/s of a ``size``-cubed matmul in ``precision`` (median of ``repeats``)."""
    a = torch.randn(size, size, device=device, dtype=PRECISIONS[precision])
    b = torch.randn(size, size, device=device, dtype=PRECISIONS[precision])
    times = interleaved_times({"mm": lambda: a @ b}, repeats, 1, device, clock)["mm"]
    return 2 * size**3 / median(times)


class Arm:
    """One model with its optimizer, a training step and greedy generation."""

    def __init__(
        self, config: TokenformerConfig, impl: str, device: torch.device, precision: str, mode: str, backend: str
    ) -> None:
        torch.manual_seed(0)
        self.config = config
        self.model = TokenformerLM(config).to(device)
        for module in self.model.modules():
            if isinstance(module, Pattention):
                module.impl = impl
        self.optimizer = make_optimizer(self.model, TrainConfig(lr=1e-3, weight_decay=0.1))
        self.forward = torch.compile(self.model, backend=backend) if mode == "compiled" else self.model
        if mode == "compiled-blocks":
            # Each block compiled on its own: the layers share one compiled graph, so compiling
            # a deep model takes the time of one block (embedding, head and loss stay eager).
            for block in self.model.layers:
                block.compile(backend=backend)
        self.device, self.precision = device, precision

    def train_step(self, ids: torch.Tensor) -> None:
        with autocast(self.device, self.precision):
            _, loss = self.forward(ids[:, :-1], ids[:, 1:])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def generate(self, prompt: torch.Tensor, new_tokens: int) -> None:
        with autocast(self.device, self.precision):
            self.model.generate(prompt, new_tokens, temperature=0)


def configs(preset: str, impls: list[str]) -> dict[str, tuple[TokenformerConfig, str]]:
    """Arm name -> (config, Pattention impl): TokenFormer with each of ``impls``, then the Transformer."""
    tokenformer = TokenformerConfig.from_preset(preset)
    arms = {"tokenformer" if impl == "auto" else f"tokenformer ({impl} impl)": (tokenformer, impl) for impl in impls}
    arms["transformer"] = (tokenformer.parameter_matched_linear(), "auto")
    return arms


TRAIN_HEADERS = [
    "preset",
    "precision",
    "mode",
    "model",
    "median step ms",
    "tokens/s",
    "x transformer",
    "MFU",
    "peak GiB",
]
MODES = ("eager", "compiled", "compiled-blocks")
GEN_HEADERS = ["preset", "precision", "model", "median ms", "new tokens/s", "x transformer"]


def train_rows(preset, precision, mode, device, args, peak) -> list[list[object]]:
    impls = args.impls if mode == "eager" else args.compiled_impls or args.impls
    arms = {
        name: Arm(cfg, impl, device, precision, mode, args.compile_backend)
        for name, (cfg, impl) in configs(preset, impls).items()
    }
    gen = torch.Generator().manual_seed(1)
    vocab = next(iter(arms.values())).config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=gen).to(device)
    steps = {name: (lambda arm=arm: arm.train_step(ids)) for name, arm in arms.items()}
    times = interleaved_times(steps, repeats_for(args, precision), args.warmup, device, args.clock)
    peaks = {name: peak_memory_bytes(step, device) for name, step in steps.items()}
    tokens = args.batch * args.seq
    rows = []
    for name, arm in arms.items():
        step = median(times[name])
        flops = training_flops_per_token(arm.config, args.seq) * tokens / step
        rows.append(
            [
                preset,
                precision,
                mode,
                name,
                fmt_ms(step),
                f"{tokens / step:,.0f}",
                f"{1 / paired_ratio(times, name, 'transformer'):.3f}",
                f"{flops / peak:.1%}",
                f"{peaks[name] / 2**30:.2f}",
            ]
        )
    print(markdown_table(TRAIN_HEADERS, rows), flush=True)
    return rows


def generation_rows(preset, precision, device, args) -> list[list[object]]:
    arms = {
        name: Arm(cfg, impl, device, precision, "eager", args.compile_backend)
        for name, (cfg, impl) in configs(preset, args.impls).items()
    }
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(
        0, next(iter(arms.values())).config.vocab_size, (args.gen_batch, args.gen_prompt), generator=gen
    )
    prompt = prompt.to(device)
    times = interleaved_times(
        {name: (lambda arm=arm: arm.generate(prompt, args.gen_tokens)) for name, arm in arms.items()},
        args.gen_repeats,
        1,
        device,
        args.clock,
    )
    rows = []
    for name in arms:
        t = median(times[name])
        rows.append(
            [
                preset,
                precision,
                name,
                fmt_ms(t),
                f"{args.gen_batch * args.gen_tokens / t:,.0f}",
                f"{1 / paired_ratio(times, name, 'transformer'):.3f}",
            ]
        )
    print(markdown_table(GEN_HEADERS, rows), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["cpu-1M", "cpu-5M"])
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=["eager", "compiled"],
        help="compiled: the whole model through torch.compile; compiled-blocks: each block on its own",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--peak-size", type=int, default=2048, help="side of the square matmul that measures the peak")
    parser.add_argument("--gen-batch", type=int, default=1)
    parser.add_argument("--gen-prompt", type=int, default=16)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--gen-repeats", type=int, default=7, help="timed rounds of generation per case")
    parser.add_argument("--no-generation", action="store_true")
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=IMPLS,
        default=["auto"],
        help="TokenFormer arms, one per Pattention implementation (auto: the library's choice)",
    )
    parser.add_argument(
        "--compiled-impls",
        nargs="+",
        choices=IMPLS,
        default=None,
        help="TokenFormer arms when compiled (default: --impls)",
    )
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend (aot_eager traces as inductor does without generating code: quick checks)",
    )
    add_common_arguments(parser, repeats=10)
    args = parser.parse_args(argv)
    device = setup(args)
    peaks = {p: matmul_peak_flops(device, p, args.peak_size, 5, args.clock) for p in args.precisions}
    train, generation = [], []
    for preset in args.presets:
        for precision in args.precisions:
            for mode in args.modes:
                train += train_rows(preset, precision, mode, device, args, peaks[precision])
            if not args.no_generation:
                generation += generation_rows(preset, precision, device, args)
    peak_lines = "\n".join(f"- {p}: {peaks[p] / 1e9:,.1f} GFLOP/s ({args.peak_size}^3 matmul)" for p in args.precisions)
    body = (
        f"Batch {args.batch} x {args.seq} tokens per step. `x transformer` is the median over rounds of the "
        "transformer's step time divided by the arm's in the same round (throughput relative to the "
        f"transformer; > 1 means faster).\n\nMatmul peak measured in this run:\n\n{peak_lines}\n\n"
        "## Training step\n\n" + markdown_table(TRAIN_HEADERS, train)
    )
    if generation:
        body += (
            f"\n\n## Generation (greedy, KV cache, eager)\n\nBatch {args.gen_batch}, prompt {args.gen_prompt} tokens, "
            f"{args.gen_tokens} new tokens.\n\n" + markdown_table(GEN_HEADERS, generation)
        )
    title = "Training and generation throughput: TokenFormer vs parameter-matched Transformer"
    print(write_report(args.out, title, device, args.clock, body))


if __name__ == "__main__":
    main()
