"""Sparse memory layers in training: the language model's training step with a product-key memory
(docs/sparse-memory.md) beside the FFN of some blocks, against the same model without one.

A training step is forward with targets, backward and the trainer's AdamW step (``make_optimizer``:
the memory's values in a group of their own, the fused implementation) on a fixed batch of random
tokens. Every variant is timed in the same rounds (see ``common.py``); ``x dense`` is the median
over rounds of the dense model's step time divided by the variant's (its tokens/s relative to
the dense model's). Per variant also:

- ``parameters`` and ``active``: all trainable parameters, and those one token reads
  (``tokenformer.count_parameters``); ``train MFLOP/token``: ``tokenformer.flops``, which counts
  what a token computes;
- ``optimizer MiB``: AdamW's state after a step. A memory's value gradient is dense (zero outside
  the rows read), so the step updates and keeps moments for every row;
- ``peak RSS MiB``: the peak resident set (``VmHWM``) of a fresh process that builds the variant
  alone and takes ``--rss-steps`` steps, so that the variants' memory does not add up.

The default shape is the last stage of configs/scaling/cpu-d128.yaml (``cpu-1M`` with 3 layers,
256/256/1024 parameter tokens, vocabulary 4096, batch 16 x 64 tokens); the memories sit in block
1 with ``top_k`` 32 of ``sub_keys**2`` tokens.

    python benchmarks/memory_layer.py --out benchmarks/results/memory_layer-cpu.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from common import (
    add_common_arguments,
    fmt_mib,
    fmt_ms,
    interleaved_times,
    median,
    paired_ratio,
    setup,
    status_bytes,
    write_report,
)

from tokenformer import TokenformerConfig, TokenformerLM, count_parameters, training_flops_per_token
from tokenformer.experiments.runner import cpu_model, markdown_table
from tokenformer.train import TrainConfig
from tokenformer.train.trainer import make_optimizer

DENSE = "dense"
HEADERS = [
    "variant",
    "memory tokens",
    "parameters",
    "active",
    "train MFLOP/token",
    "median step ms",
    "tokens/s",
    "x dense",
    "optimizer MiB",
    "peak RSS MiB",
]


def variant_name(sub_keys: int) -> str:
    return f"memory {sub_keys}^2"


def variants(args: argparse.Namespace) -> dict[str, TokenformerConfig]:
    """Variant name -> config: the dense model, then one memory per ``--sub-keys``."""
    shape = dict(
        n_layers=args.n_layers,
        qkv_tokens=args.qkv_tokens,
        proj_tokens=args.proj_tokens,
        ffn_tokens=args.ffn_tokens,
        value_scale=args.value_scale,
        vocab_size=args.vocab_size,
        max_seq_len=args.seq,
    )
    found = {DENSE: TokenformerConfig.from_preset(args.preset, **shape)}
    for sub_keys in args.sub_keys:
        found[variant_name(sub_keys)] = TokenformerConfig.from_preset(
            args.preset, **shape, memory_layers=args.memory_layers, memory_sub_keys=sub_keys, memory_top_k=args.top_k
        )
    return found


class Variant:
    """One model with the trainer's optimizer and a training step on a fixed batch."""

    def __init__(self, config: TokenformerConfig, device: torch.device, batch: int, seq: int) -> None:
        torch.manual_seed(0)
        self.config = config
        self.model = TokenformerLM(config).to(device).train()
        self.optimizer = make_optimizer(self.model, TrainConfig(lr=1e-3, weight_decay=0.1))
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=gen).to(device)

    def train_step(self) -> None:
        _, loss = self.model(self.ids[:, :-1], self.ids[:, 1:])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_bytes(self) -> int:
        return sum(t.nbytes for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t))


def rss_child(args: argparse.Namespace) -> None:
    """Run in a fresh process: build the variant ``--rss-of`` alone, take ``--rss-steps`` steps and
    print the process's peak RSS in bytes."""
    device = setup(args)
    variant = Variant(variants(args)[args.rss_of], device, args.batch, args.seq)
    for _ in range(args.rss_steps):
        variant.train_step()
    print(json.dumps({"peak_rss": status_bytes("VmHWM")}))


def peak_rss(argv: list[str], name: str) -> int:
    """The peak RSS of variant ``name`` trained alone in a fresh process with this run's options."""
    done = subprocess.run([sys.executable, __file__, *argv, "--rss-of", name], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the peak RSS process of {name!r} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss"]


def rows_for(args: argparse.Namespace, argv: list[str], device: torch.device) -> list[list[object]]:
    configs = variants(args)
    # Each in its own process before this one builds any model.
    rss = {name: peak_rss(argv, name) for name in configs}
    arms = {name: Variant(config, device, args.batch, args.seq) for name, config in configs.items()}
    times = interleaved_times(
        {name: arm.train_step for name, arm in arms.items()}, args.repeats, args.warmup, device, args.clock
    )
    tokens = args.batch * args.seq
    rows = []
    for name, arm in arms.items():
        config, step = arm.config, median(times[name])
        memory_tokens = sum(config.memory_heads * s**2 for s in config.memory_tables) * len(config.memory_layers)
        rows.append(
            [
                name,
                f"{memory_tokens:,}",
                f"{count_parameters(config):,}",
                f"{count_parameters(config, active=True):,}",
                f"{training_flops_per_token(config, args.seq) / 1e6:.2f}",
                fmt_ms(step),
                f"{tokens / step:,.0f}",
                f"{1 / paired_ratio(times, name, DENSE):.3f}",
                fmt_mib(arm.optimizer_bytes()),
                fmt_mib(rss[name]),
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-1M")
    parser.add_argument("--n-layers", type=int, default=3)
    parser.add_argument("--qkv-tokens", type=int, default=256)
    parser.add_argument("--proj-tokens", type=int, default=256)
    parser.add_argument("--ffn-tokens", type=int, default=1024)
    parser.add_argument("--value-scale", type=float, default=0.015625)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument(
        "--sub-keys", type=int, nargs="*", default=[256, 1024], help="one memory variant per value (sub_keys**2 tokens)"
    )
    parser.add_argument("--top-k", type=int, default=32, help="tokens each memory reads per input token")
    parser.add_argument("--memory-layers", type=int, nargs="+", default=[1], help="the blocks with a memory")
    parser.add_argument("--rss-steps", type=int, default=3, help="training steps of each peak RSS process")
    parser.add_argument("--rss-of", default=None, help=argparse.SUPPRESS)  # a peak RSS process's variant
    add_common_arguments(parser, repeats=10)
    parser.set_defaults(threads=1)
    args = parser.parse_args(argv)
    if args.rss_of is not None:
        rss_child(args)
        return
    device = setup(args)
    print(f"CPU: {cpu_model()}, torch threads {torch.get_num_threads()}", flush=True)
    table = markdown_table(HEADERS, rows_for(args, argv, device))
    print(table, flush=True)
    memories = ", ".join(variant_name(s) for s in args.sub_keys) or "none"
    body = (
        f"`{args.preset}` with {args.n_layers} layers, {args.qkv_tokens}/{args.proj_tokens}/{args.ffn_tokens} "
        f"qkv/proj/ffn tokens, vocabulary {args.vocab_size}; batch {args.batch} x {args.seq} tokens per step. "
        f"Memories ({memories}) in blocks {args.memory_layers}, top_k {args.top_k}, beside the FFN. "
        "`x dense` is the median over rounds of the dense model's step time divided by the variant's "
        "(> 1 means faster); peak RSS is that of a fresh process per variant over "
        f"`--rss-steps {args.rss_steps}` training steps.\n\n" + table
    )
    print(write_report(args.out, "Training step with a sparse memory layer", device, args.clock, body))


if __name__ == "__main__":
    main()
