"""Pattention: attention from input tokens to learnable parameter tokens.

For input ``X [..., d_in]``, key tokens ``K [n, d_in]`` and value tokens ``V [n, d_out]``::

    A = X @ K^T          # [..., n] scores against every parameter token
    S = theta(A)         # normalisation over the n axis
    out = S @ V          # [..., d_out]

``theta`` is one of the three normalisations of the released code (see ``NORMS``). The scale
``tau`` is fixed when the layer is created (``sqrt(n)`` then) and stored with the weights:
appending parameter tokens must not rescale the scores of the old ones, or growth would change
the function (a 26% output change was measured for 64 -> 96 tokens with a tau that follows n).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")

# Only guards the all-zero row (an all-zero input), where the normalised result is 0 either
# way; any real score row has a norm many orders of magnitude above it.
_NORM_EPS = 1e-12


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"unknown Pattention norm {norm!r}; allowed: {', '.join(NORMS)}")
    return norm


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _l2_normalise(a: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # The norm is taken in (at least) float32 even under bf16 autocast: a sum of n squares in
    # bf16 loses the digits that make the normalised scores agree with the fp32 model.
    norm = _at_least_fp32(a).square().sum(dim=-1, keepdim=True).sqrt().clamp_min(_NORM_EPS)
    return a * (scale / norm).to(a.dtype)


def normalise_scores(scores: torch.Tensor, norm: str, tau: torch.Tensor) -> torch.Tensor:
    """``theta(A)`` of the paper, over the last (parameter-token) axis."""
    if norm == "l2_norm_gelu":
        return F.gelu(_l2_normalise(scores, tau))
    if norm == "gelu_l2_norm":
        return _l2_normalise(F.gelu(scores), tau)
    if norm == "softmax":
        # exp(A) / ||exp(A)||_1 * n, with n = tau^2 frozen at creation. F.softmax subtracts the
        # row maximum, so large scores cannot overflow (the release's plain exp can).
        return F.softmax(_at_least_fp32(scores), dim=-1).to(scores.dtype) * (tau * tau).to(scores.dtype)
    raise ValueError(f"unknown Pattention norm {norm!r}; allowed: {', '.join(NORMS)}")


class Pattention(nn.Module):
    """A batch-first drop-in for ``nn.Linear(in_features, out_features, bias=False)``.

    Parameters ``key_param_tokens [num_tokens, in_features]`` and ``value_param_tokens
    [num_tokens, out_features]``; the buffer ``tau`` is saved in the state dict.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_tokens: int,
        norm: str = "l2_norm_gelu",
        *,
        key_std: float = 0.02,
        value_std: float = 0.02,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features), ("num_tokens", num_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Pattention {name} must be a positive integer, got {value!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.norm = check_norm(norm)
        self.key_std = key_std
        self.value_std = value_std
        factory = {"device": device, "dtype": dtype}
        self.key_param_tokens = nn.Parameter(torch.empty(num_tokens, in_features, **factory))
        self.value_param_tokens = nn.Parameter(torch.empty(num_tokens, out_features, **factory))
        self.register_buffer("tau", torch.tensor(math.sqrt(num_tokens), **factory))
        self.reset_parameters()

    @property
    def num_tokens(self) -> int:
        return self.key_param_tokens.shape[0]

    def reset_parameters(self) -> None:
        nn.init.normal_(self.key_param_tokens, std=self.key_std)
        nn.init.normal_(self.value_param_tokens, std=self.value_std)
        if not self.tau.is_meta:
            self.tau.fill_(math.sqrt(self.num_tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = F.linear(x, self.key_param_tokens)
        return normalise_scores(scores, self.norm, self.tau) @ self.value_param_tokens

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_tokens={self.num_tokens}, norm={self.norm!r}"
        )
