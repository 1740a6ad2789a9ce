"""Bidirectional attention on CPU: PyTorch's fused kernel against the explicit softmax(QK^T)V.

The vision model attends over short sequences (16 patches of a Fashion-MNIST image, 64 of a
CIFAR-10 one); on CPU it takes the explicit form up to ``EXPLICIT_ATTENTION_MAX_LEN`` tokens
(``tokenformer.model``). This script measures both forms, each through ``torch.compile``:

- ``attention``: forward + backward of attention alone (4 heads, the ViT's no-self mask) at
  several lengths, ``time(explicit) / time(fused)`` per round, the median over rounds;
- ``training step``: a whole training step (forward, backward, fused AdamW) of ``--preset`` at
  ``--batch-size``, once with the fused kernel everywhere and once with the explicit form.

    python benchmarks/attention.py --threads 2 --out benchmarks/results/attention-cpu.md
"""

from __future__ import annotations

import argparse
import json

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

import tokenformer.vision as model_module
from tokenformer.experiments.runner import markdown_table
from tokenformer.vision import TokenformerViT, VisionConfig, explicit_attention

SHAPES = ((16, 16, 128), (49, 16, 128), (64, 32, 64), (197, 64, 16))  # (tokens, head_dim, batch)
CALLS = 10  # attention calls per timed round


def attention_rows(args: argparse.Namespace, device: torch.device) -> list[list[object]]:
    rows = []
    for length, head_dim, batch in SHAPES:
        q, k, v = (torch.randn(batch, 4, length, head_dim, device=device, requires_grad=True) for _ in range(3))
        others = ~torch.eye(length, dtype=torch.bool, device=device)
        forms = {
            "fused": torch.compile(
                lambda q, k, v, m: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
            ),
            "explicit": torch.compile(explicit_attention),
        }

        def arm(form, q=q, k=k, v=v, others=others):
            def run() -> None:
                for _ in range(CALLS):
                    form(q, k, v, others).sum().backward()

            return run

        times = interleaved_times({name: arm(form) for name, form in forms.items()}, args.repeats, args.warmup, device)
        rows.append(
            [
                length,
                head_dim,
                batch,
                fmt_ms(median(times["fused"]) / CALLS),
                fmt_ms(median(times["explicit"]) / CALLS),
                f"{paired_ratio(times, 'explicit', 'fused'):.3f}",
            ]
        )
    return rows


def training_step_rows(args: argparse.Namespace, device: torch.device) -> list[list[object]]:
    config = VisionConfig.from_preset(args.preset, **args.model_overrides)
    arms, default = {}, model_module.EXPLICIT_ATTENTION_MAX_LEN
    for name, limit in (("fused", 0), ("explicit", default)):
        torch.manual_seed(0)
        model = TokenformerViT(config).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), 1e-3, fused=True)
        compiled = torch.compile(model)
        images = torch.randn(args.batch_size, config.in_channels, config.image_size, config.image_size, device=device)
        labels = torch.randint(0, config.num_classes, (args.batch_size,), device=device)

        # The form is chosen while tracing; torch.compile keeps one graph per limit and picks by it.
        def step(compiled=compiled, optimizer=optimizer, images=images, labels=labels, limit=limit) -> None:
            model_module.EXPLICIT_ATTENTION_MAX_LEN = limit
            for _ in range(args.steps):
                torch.nn.functional.cross_entropy(compiled(images), labels).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        arms[name] = step
    try:
        times = interleaved_times(arms, args.repeats, args.warmup, device)
    finally:
        model_module.EXPLICIT_ATTENTION_MAX_LEN = default
    images = args.steps * args.batch_size
    return [
        [
            name,
            fmt_ms(median(times[name]) / args.steps),
            f"{images / median(times[name]):.0f}",
            f"{paired_ratio(times, name, 'fused'):.3f}",
        ]
        for name in arms
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, repeats=9)
    parser.add_argument("--preset", default="fmnist-0.3M")
    parser.add_argument(
        "--model-overrides",
        type=json.loads,
        default={"patch_shift": 3, "lsa": True, "patch_bias": True, "patch_tokens": 128},
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed round")
    args = parser.parse_args()
    device = setup(args)
    if device.type != "cpu":
        raise SystemExit(f"--device {device}: this benchmark measures the CPU choice of attention form; allowed: cpu")
    body = [
        f"Each arm through `torch.compile`; {args.warmup} untimed rounds (compilation), then {args.repeats} rounds "
        "with the arms interleaved; `explicit/fused` is the median over rounds of the two arms' time ratio in the "
        "same round (< 1: the explicit form is faster).",
        "",
        "## Attention alone (4 heads, no-self mask, forward + backward)",
        "",
        markdown_table(
            ["tokens", "head dim", "batch", "fused ms", "explicit ms", "explicit/fused"], attention_rows(args, device)
        ),
        "",
        f"## Training step of `{args.preset}` with `{json.dumps(args.model_overrides)}`, batch {args.batch_size}",
        "",
        markdown_table(["attention", "median step ms", "img/s", "time / fused"], training_step_rows(args, device)),
        "",
    ]
    print(
        write_report(
            args.out,
            "Bidirectional attention on CPU: fused kernel vs explicit softmax",
            device,
            args.clock,
            "\n".join(body),
        )
    )


if __name__ == "__main__":
    main()
