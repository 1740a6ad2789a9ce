"""Pattention: attention from input tokens to learnable parameter tokens.

For input ``X [..., d_in]``, key tokens ``K [n, d_in]`` and value tokens ``V [n, d_out]``::

    A = X @ K^T          # [..., n] scores against every parameter token
    S = theta(A)         # normalisation over the n axis
    out = S @ V          # [..., d_out]

``theta`` is one of the three normalisations of the released code (see ``NORMS``). The scale
``tau`` is fixed when the layer is created (``sqrt(n)`` then) and stored with the weights:
appending parameter tokens must not rescale the scores of the old ones, or growth would change
the function (with a tau that follows n, every old score is rescaled by sqrt(n_new / n_old)).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")

# Only guards the all-zero row (an all-zero input), where the normalised result is 0 either
# way; any real score row has a norm many orders of magnitude above it.
_NORM_EPS = 1e-12


def release_tau(num_tokens: int) -> float:
    """The released code's score scale for ``num_tokens`` parameter tokens: ``sqrt(n)``."""
    return math.sqrt(num_tokens)


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"unknown Pattention norm {norm!r}; allowed: {', '.join(NORMS)}")
    return norm


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(_accumulate_dtype(t.dtype))


def _l2_normalise(a: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # The norm is taken in (at least) float32 even under bf16 autocast: a sum of n squares in
    # bf16 loses the digits that make the normalised scores agree with the fp32 model.
    norm = _at_least_fp32(a).square().sum(dim=-1, keepdim=True).sqrt().clamp_min(_NORM_EPS)
    return a * (scale / norm).to(a.dtype)


def normalise_scores(scores: torch.Tensor, norm: str, tau: torch.Tensor) -> torch.Tensor:
    """``theta(A)`` of the paper, over the last (parameter-token) axis: the plain reference."""
    if norm == "l2_norm_gelu":
        return F.gelu(_l2_normalise(scores, tau))
    if norm == "gelu_l2_norm":
        return _l2_normalise(F.gelu(scores), tau)
    if norm == "softmax":
        # exp(A) / ||exp(A)||_1 * n, with n = tau^2 frozen at creation. F.softmax subtracts the
        # row maximum, so large scores cannot overflow (the release's plain exp can).
        return F.softmax(_at_least_fp32(scores), dim=-1).to(scores.dtype) * (tau * tau).to(scores.dtype)
    raise ValueError(f"unknown Pattention norm {norm!r}; allowed: {', '.join(NORMS)}")


# The fused path. ``theta`` is elementwise work over a [tokens, n] score matrix between two
# matrix products; done naively it takes several passes over that matrix and keeps three such
# matrices for backward. Here the key product and ``theta`` form one autograd function that
# keeps at most one [tokens, n] tensor besides its output (which the value product keeps
# anyway), and backward folds each row's scale tau / ||row|| into the narrow [tokens, d_in]
# side of the key product's gradients instead of a pass over [tokens, n].
#
# Per norm: ``forward(scores, tau) -> (probs, row_scale, saved)`` may overwrite ``scores``;
# ``backward(grad_probs, tau, *saved)`` returns the score gradient divided by ``row_scale``
# (None where there is none: softmax).


# Row reductions of bf16 tensors accumulate in float32 inside the kernels and round only the
# result: as precise as the reference's float32 copy of the [tokens, n] matrix, without it.


def _row_norm(t):
    norm = torch.linalg.vector_norm(t, dim=-1, keepdim=True)
    return _cast(norm, _accumulate_dtype(t.dtype)).clamp_min(_NORM_EPS)


def _row_dot(a, b, tau):
    """``(a . b) / tau^2`` per row."""
    return (a * b).sum(-1, keepdim=True) / (tau * tau)


def _l2_norm_gelu_forward(scores, tau):
    row_scale = tau / _row_norm(scores)
    normalised = scores.mul_(row_scale)
    return F.gelu(normalised), row_scale, (normalised,)


def _l2_norm_gelu_backward(grad_probs, tau, normalised):
    # With z = A * s, s = tau / ||A||: dL/dA = s * (h - z * (h . z) / tau^2), h = dL/dz.
    h = torch.ops.aten.gelu_backward(grad_probs, normalised)
    return h.addcmul_(normalised, _row_dot(h, normalised, tau), value=-1)


def _gelu_l2_norm_forward(scores, tau):
    activated = F.gelu(scores)
    row_scale = tau / _row_norm(activated)
    probs = activated.mul_(row_scale)
    return probs, row_scale, (scores, probs)


def _gelu_l2_norm_backward(grad_probs, tau, scores, probs):
    # With S = G * s, s = tau / ||G||: dL/dG = s * (dS - S * (dS . S) / tau^2); then GeLU'.
    grad_activated = torch.addcmul(grad_probs, probs, _row_dot(grad_probs, probs, tau), value=-1)
    return torch.ops.aten.gelu_backward(grad_activated, scores)


def _softmax_forward(scores, tau):
    probs = torch.softmax(scores, dim=-1).mul_(tau * tau)
    return probs, None, (probs,)


def _softmax_backward(grad_probs, tau, probs):
    # S = n * softmax(A): dL/dA = S * (dS - (dS . S) / n), n = tau^2.
    return (grad_probs - _row_dot(grad_probs, probs, tau)).mul_(probs)


_FUSED = {
    "l2_norm_gelu": (_l2_norm_gelu_forward, _l2_norm_gelu_backward),
    "gelu_l2_norm": (_gelu_l2_norm_forward, _gelu_l2_norm_backward),
    "softmax": (_softmax_forward, _softmax_backward),
}


def _fused_norm(norm: str, use_triton: bool):
    if use_triton:
        from . import triton_kernels

        return triton_kernels.l2_norm_gelu_forward, triton_kernels.l2_norm_gelu_backward
    return _FUSED[norm]


class _NormalisedScores(torch.autograd.Function):
    """``theta(x @ keys^T)`` for ``x [N, d_in]``, ``keys [n, d_in]``; ``tau`` gets no gradient."""

    @staticmethod
    def forward(ctx, x, keys, tau, norm, use_triton):
        probs, row_scale, saved = _fused_norm(norm, use_triton)[0](x @ keys.T, tau)
        ctx.norm, ctx.use_triton = norm, use_triton
        ctx.save_for_backward(x, keys, tau, row_scale, *saved)
        return probs

    @staticmethod
    def backward(ctx, grad_probs):
        x, keys, tau, row_scale, *saved = ctx.saved_tensors
        grad_scores = _fused_norm(ctx.norm, ctx.use_triton)[1](grad_probs, tau, *saved)
        grad_x = grad_keys = None
        if row_scale is not None:
            row_scale = row_scale.to(x.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = grad_scores @ keys
            if row_scale is not None:
                grad_x.mul_(row_scale)
        if ctx.needs_input_grad[1]:
            grad_keys = grad_scores.T @ (x if row_scale is None else x * row_scale)
        return grad_x, grad_keys, None, None, None


IMPLS = ("auto", "reference", "fused", "triton")


@functools.cache
def triton_available() -> bool:
    """Whether the Triton kernels import: the optional ``triton`` package is installed (``pip install
    'tokenformer[triton]'``) and so is their module, which the code a model directory carries for
    transformers leaves out."""
    try:
        from . import triton_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def _compute_dtype(x: torch.Tensor, keys: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(x.dtype, keys.dtype)


def _use_triton(impl: str, x: torch.Tensor, norm: str) -> bool:
    if impl == "triton":
        if norm != "l2_norm_gelu":
            raise ValueError(f"Pattention impl='triton' implements norm='l2_norm_gelu' only, got norm={norm!r}")
        if not triton_available():
            raise ValueError("Pattention impl='triton' needs the triton package (pip install 'tokenformer[triton]')")
        return True
    # Under torch.compile the fused torch ops are traced instead: inductor generates its own
    # kernels for them.
    auto = impl == "auto" and x.is_cuda and norm == "l2_norm_gelu" and not torch.compiler.is_compiling()
    return auto and triton_available()


# torch.compile of the fused function is verified from torch 2.13 on; torch 2.11 traced it to
# wrong values (compiled output and gradients off by up to 100%), so older releases compile the
# plain formula unless impl="fused" is asked for explicitly.
_FUSED_COMPILES = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)


def pattention(
    x: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    tau: torch.Tensor,
    norm: str = "l2_norm_gelu",
    impl: str = "auto",
) -> torch.Tensor:
    """``theta(x @ keys^T) @ values`` over the last axis of ``x``.

    ``impl``: ``"reference"`` is the plain formula (every intermediate kept by autograd);
    ``"fused"`` the fused autograd function; ``"triton"`` its CUDA kernels (CPU tensors only under
    ``TRITON_INTERPRET=1``); ``"auto"`` picks Triton for CUDA tensors when it is installed and
    ``"fused"`` otherwise.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown Pattention impl {impl!r}; allowed: {', '.join(IMPLS)}")
    plain = impl == "reference" or tau.requires_grad
    if impl == "auto" and not _FUSED_COMPILES and torch.compiler.is_compiling():
        plain = True
    if plain:
        return normalise_scores(F.linear(x, keys), norm, tau) @ values
    use_triton = _use_triton(impl, x, norm)
    # Autocast does not reach into a custom autograd function's backward: cast on the way in.
    dtype = _compute_dtype(x, keys)
    x, keys, values = _cast(x, dtype), _cast(keys, dtype), _cast(values, dtype)
    if torch.is_grad_enabled() and (x.requires_grad or keys.requires_grad):
        probs = _NormalisedScores.apply(x.reshape(-1, x.shape[-1]), keys, tau, norm, use_triton)
        probs = probs.view(*x.shape[:-1], probs.shape[-1])
    else:  # inference (generation): no autograd function, nothing saved, fewest ops
        probs = _fused_norm(norm, use_triton)[0](F.linear(x, keys), tau)[0]
    return probs @ values


class Pattention(nn.Module):
    """A batch-first drop-in for ``nn.Linear(in_features, out_features, bias=False)``.

    Parameters ``key_param_tokens [num_tokens, in_features]`` and ``value_param_tokens
    [num_tokens, out_features]``; the buffer ``tau`` is saved in the state dict. ``tau`` is the
    score scale at creation: ``sqrt(num_tokens)`` unless given, then frozen (never recomputed
    from the token count, so appending tokens keeps the function). ``impl`` chooses the
    implementation (see :func:`pattention`); every choice computes the same function.
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
        tau: float | None = None,
        impl: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"unknown Pattention impl {impl!r}; allowed: {', '.join(IMPLS)}")
        for name, value in (("in_features", in_features), ("out_features", out_features), ("num_tokens", num_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Pattention {name} must be a positive integer, got {value!r}")
        if tau is not None and not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"Pattention tau must be a finite number > 0 or None (sqrt(num_tokens)), got {tau!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.norm = check_norm(norm)
        self.key_std = key_std
        self.value_std = value_std
        self.initial_tau = release_tau(num_tokens) if tau is None else float(tau)
        self.impl = impl
        factory = {"device": device, "dtype": dtype}
        self.key_param_tokens = nn.Parameter(torch.empty(num_tokens, in_features, **factory))
        self.value_param_tokens = nn.Parameter(torch.empty(num_tokens, out_features, **factory))
        self.register_buffer("tau", torch.tensor(self.initial_tau, **factory))
        self.reset_parameters()

    @property
    def num_tokens(self) -> int:
        return self.key_param_tokens.shape[0]

    def reset_parameters(self) -> None:
        nn.init.normal_(self.key_param_tokens, std=self.key_std)
        nn.init.normal_(self.value_param_tokens, std=self.value_std)
        if not self.tau.is_meta:
            self.tau.fill_(self.initial_tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pattention(x, self.key_param_tokens, self.value_param_tokens, self.tau, self.norm, self.impl)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_tokens={self.num_tokens}, norm={self.norm!r}"
        )
