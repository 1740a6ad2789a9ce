"""The ``tokenformer`` command line. Subcommands are plain functions; jsonargparse builds the
parser (flags, ``--config`` YAML files and ``--help`` with defaults) from their signatures."""

from __future__ import annotations

from jsonargparse import CLI

from .config import PRESETS, TokenformerConfig
from .flops import count_parameters, training_flops_per_token


def presets() -> None:
    """List the named model presets with their parameter counts and training FLOPs per token."""
    print(f"{'preset':<12} {'layers':>6} {'d':>5} {'qkv':>5} {'proj':>5} {'ffn':>6} {'params':>10} {'non-emb':>10} {'train GFLOP/tok':>16}")
    for name in PRESETS:
        c = TokenformerConfig.from_preset(name)
        print(
            f"{name:<12} {c.n_layers:>6} {c.d_model:>5} {c.qkv_tokens:>5} {c.proj_tokens:>5} {c.ffn_tokens:>6} "
            f"{count_parameters(c) / 1e6:>9.2f}M {count_parameters(c, non_embedding=True) / 1e6:>9.2f}M "
            f"{training_flops_per_token(c) / 1e9:>16.3f}"
        )


def main(argv: list[str] | None = None) -> None:
    CLI({"presets": presets}, args=argv)


if __name__ == "__main__":
    main()
