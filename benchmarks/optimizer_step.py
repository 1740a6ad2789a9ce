"""AdamW's step: torch's default implementation against ``foreach`` and ``fused`` (the one the
trainer picks on CPU and CUDA), alone and inside a whole training step.

``optimizer step`` times ``AdamW.step()`` over the model's parameter groups (weight decay on the
matrices) with fixed random gradients. ``training step`` is forward with targets, backward and
the optimizer step of the eager model on a fixed batch (random tokens for a language-model
preset, random images for a vision preset), one copy of the model per implementation, all timed
in the same rounds (see ``common.py``).

    python benchmarks/optimizer_step.py --out benchmarks/results/optimizer_step-cpu.md
"""

from __future__ import annotations

import argparse

import torch
from common import (
    add_common_arguments,
    fmt_ms,
    interleaved_times,
    median,
    paired_ratio,
    setup,
    write_report,
)

from tokenformer import TokenformerConfig, TokenformerLM
from tokenformer.experiments.runner import markdown_table
from tokenformer.vision import VISION_PRESETS, TokenformerViT, VisionConfig

IMPLEMENTATIONS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
HEADERS = ["preset", "parameters", "tensors", "measure", "implementation", "median ms", "x default"]


def build(preset: str, device: torch.device) -> tuple[torch.nn.Module, callable]:
    """The model and a function that makes one training batch's loss."""
    gen = torch.Generator().manual_seed(0)
    if preset in VISION_PRESETS:
        config = VisionConfig.from_preset(preset)
        model = TokenformerViT(config).to(device)
        images = torch.randn(128, config.in_channels, config.image_size, config.image_size, generator=gen).to(device)
        labels = torch.randint(0, config.num_classes, (128,), generator=gen).to(device)
        return model, lambda m: m(images, labels)[1]
    config = TokenformerConfig.from_preset(preset)
    model = TokenformerLM(config).to(device)
    ids = torch.randint(0, config.vocab_size, (8, 257), generator=gen).to(device)
    return model, lambda m: m(ids[:, :-1], ids[:, 1:])[1]


def rows_for(preset: str, device: torch.device, args: argparse.Namespace) -> list[list[object]]:
    model, loss_of = build(preset, device)
    tensors = list(model.parameters())
    parameters = sum(p.numel() for p in tensors)
    rows = []
    # The optimizer step alone, on one model with fixed gradients.
    for p in tensors:
        p.grad = torch.randn_like(p)
    optimizers = {
        name: torch.optim.AdamW(model.param_groups(0.1), lr=1e-4, **kw) for name, kw in IMPLEMENTATIONS.items()
    }
    times = interleaved_times(
        {name: opt.step for name, opt in optimizers.items()}, args.repeats, args.warmup, device, args.clock
    )
    rows += [
        [
            preset,
            f"{parameters:,}",
            len(tensors),
            "optimizer step",
            name,
            f"{median(times[name]) * 1e3:.2f}",
            f"{1 / paired_ratio(times, name, 'default'):.2f}",
        ]
        for name in IMPLEMENTATIONS
    ]
    # A whole eager training step, one copy of the model per implementation.
    copies = {}
    for name, kw in IMPLEMENTATIONS.items():
        copy, _ = build(preset, device)
        copy.load_state_dict(model.state_dict())
        copies[name] = (copy, torch.optim.AdamW(copy.param_groups(0.1), lr=1e-4, **kw))

    def train_step(copy: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        loss_of(copy).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = interleaved_times(
        {name: (lambda c=c: train_step(*c)) for name, c in copies.items()},
        args.repeats,
        args.warmup,
        device,
        args.clock,
    )
    rows += [
        [
            preset,
            f"{parameters:,}",
            len(tensors),
            "training step",
            name,
            fmt_ms(median(times[name])),
            f"{1 / paired_ratio(times, name, 'default'):.3f}",
        ]
        for name in IMPLEMENTATIONS
    ]
    print(markdown_table(HEADERS, rows), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, repeats=30)
    parser.add_argument("--presets", nargs="+", default=["fmnist-0.3M", "cpu-1M", "cpu-5M"])
    args = parser.parse_args(argv)
    device = setup(args)
    rows = [row for preset in args.presets for row in rows_for(preset, device, args)]
    body = (
        "`x default` is the median over rounds of the default implementation's time divided by the "
        "arm's in the same round (> 1: faster). Language-model presets train on 8 x 256 tokens, "
        "vision presets on 128 images.\n\n" + markdown_table(HEADERS, rows)
    )
    print(write_report(args.out, "AdamW step: default vs foreach vs fused", device, args.clock, body))


if __name__ == "__main__":
    main()
