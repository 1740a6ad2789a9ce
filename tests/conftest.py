import math

import pytest
import torch

from tokenformer import TokenformerConfig

torch.set_flush_denormal(True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(**overrides) -> TokenformerConfig:
    """A model small enough for float64 references: distinct token counts per kind."""
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, qkv_tokens=24, proj_tokens=20, ffn_tokens=40, max_seq_len=64)
    return TokenformerConfig(**{**base, **overrides})


def reference_ops(state: dict[str, torch.Tensor], eps: float):
    """Pattention (``l2_norm_gelu``) and weight-free LayerNorm written out from the paper's
    formulas over a float64 state dict, for reference forward passes that share no code with
    the models."""

    def gelu(t):
        return 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))

    def pattention(x, prefix):
        a = x @ state[prefix + ".key_param_tokens"].T
        s = gelu(a / a.norm(dim=-1, keepdim=True) * state[prefix + ".tau"])
        return s @ state[prefix + ".value_param_tokens"]

    def layer_norm(x):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps)

    return pattention, layer_norm
