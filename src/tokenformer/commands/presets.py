"""``tokenformer presets``: the named model presets of every family."""

from __future__ import annotations

from ..config import PRESETS, TokenformerConfig
from ..flops import count_parameters, count_vision_parameters, training_flops_per_token
from ..vision import VISION_PRESETS, VisionConfig


def presets() -> None:
    """List the named model presets: language models (parameters, those a token reads, training
    FLOPs per token), then vision models."""
    print(
        f"{'preset':<14} {'layers':>6} {'d':>5} {'qkv':>5} {'proj':>5} {'ffn':>6} "
        f"{'params':>10} {'non-emb':>10} {'active':>10} {'train GFLOP/tok':>16}"
    )
    for name in PRESETS:
        c = TokenformerConfig.from_preset(name)
        print(
            f"{name:<14} {c.n_layers:>6} {c.d_model:>5} {c.qkv_tokens:>5} {c.proj_tokens:>5} {c.ffn_tokens:>6} "
            f"{count_parameters(c) / 1e6:>9.2f}M {count_parameters(c, non_embedding=True) / 1e6:>9.2f}M "
            f"{count_parameters(c, active=True) / 1e6:>9.2f}M {training_flops_per_token(c) / 1e9:>16.3f}"
        )
    print(f"\n{'vision preset':<14} {'image':>9} {'patch':>5} {'tokens':>6} {'layers':>6} {'d':>5} {'params':>10}")
    for name in VISION_PRESETS:
        v = VisionConfig.from_preset(name)
        image = f"{v.in_channels}x{v.image_size}x{v.image_size}"
        print(
            f"{name:<14} {image:>9} {v.patch_size:>5} {v.seq_len:>6} {v.n_layers:>6} {v.d_model:>5} "
            f"{count_vision_parameters(v) / 1e6:>9.2f}M"
        )
