"""The ``tokenformer`` command line. Subcommands are plain functions; jsonargparse builds the
parser (flags, ``--config`` YAML files and ``--help`` with defaults) from their signatures."""

from __future__ import annotations

from typing import Optional

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


def convert(
    src: str,
    dst: str,
    from_hub: bool = False,
    revision: Optional[str] = None,
    preset: Optional[str] = None,
    n_heads: Optional[int] = None,
    tokenizer: Optional[str] = None,
    overwrite: bool = False,
) -> None:
    """Convert a released checkpoint (GPT-NeoX layout pytorch_model.bin) into a model directory of ours.

    Args:
        src: a pytorch_model.bin or a directory holding one; with --from_hub, a hub id
            (Haiyang-W/TokenFormer-150M) or a released size (150M, 450M, 900M, 1.5B).
        dst: the directory to write (config.json + model.safetensors [+ tokenizer files]).
        from_hub: download src from the Hugging Face hub (needs network access).
        revision: hub revision (branch, tag or commit) with --from_hub.
        preset: the config preset; default: the released size downloaded, else read from the tensor shapes.
        n_heads: head count when no released preset has the checkpoint's width and depth.
        tokenizer: a tokenizer.json to store beside the model; default with --from_hub: GPT-NeoX-20B's.
        overwrite: replace a model already in dst.
    """
    from .interop.convert import convert_from_hub, convert_released

    if from_hub:
        path = convert_from_hub(
            src, dst, preset, revision=revision, n_heads=n_heads, tokenizer=tokenizer, overwrite=overwrite
        )
    else:
        path = convert_released(src, dst, preset, n_heads=n_heads, tokenizer=tokenizer, overwrite=overwrite)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    CLI({"presets": presets, "convert": convert}, args=argv)


if __name__ == "__main__":
    main()
