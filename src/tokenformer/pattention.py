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

import contextlib
import contextvars
import ctypes
import functools
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

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


_TO_FLOAT32 = (torch.float32, torch.bfloat16, torch.float16)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """``torch.promote_types(dtype, torch.float32)``, without a call into torch for the float
    dtypes (it runs a few times per layer and token when decoding)."""
    if dtype in _TO_FLOAT32:
        return torch.float32
    return torch.promote_types(dtype, torch.float32)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(_accumulate_dtype(t.dtype))


def _l2_normalise(a: torch.Tensor, scale: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    # The norm is taken in (at least) float32 even under bf16 autocast: a sum of n squares in
    # bf16 loses the digits that make the normalised scores agree with the fp32 model.
    square = _at_least_fp32(a).square().sum(dim=-1, keepdim=True)
    if extra is not None:  # entries that count towards the norm but are not normalised (a ghost)
        square = square + _at_least_fp32(extra).square().sum(dim=-1, keepdim=True)
    norm = square.sqrt().clamp_min(_NORM_EPS)
    return a * (scale / norm).to(a.dtype)


def normalise_scores(
    scores: torch.Tensor, norm: str, tau: torch.Tensor, ghost_scores: torch.Tensor | None = None
) -> torch.Tensor:
    """``theta(A)`` of the paper, over the last (parameter-token) axis: the plain reference.

    ``ghost_scores`` (``l2_norm_gelu`` only) are ``x @ ghost^T`` of a pruned layer: they add to
    each row's norm as the removed tokens' scores did (see :mod:`tokenformer.pruning`).
    """
    if ghost_scores is not None and norm != "l2_norm_gelu":
        raise ValueError(f"a ghost norm exists for norm='l2_norm_gelu' only, got norm={norm!r}")
    if norm == "l2_norm_gelu":
        return F.gelu(_l2_normalise(scores, tau, ghost_scores))
    if norm == "gelu_l2_norm":
        return _l2_normalise(F.gelu(scores), tau)
    if norm == "softmax":
        # exp(A) / ||exp(A)||_1 * n, with n = tau^2 frozen at creation. F.softmax subtracts the
        # row maximum, so large scores cannot overflow (the release's plain exp can).
        return F.softmax(_at_least_fp32(scores), dim=-1).to(scores.dtype) * (tau * tau).to(scores.dtype)
    raise ValueError(f"unknown Pattention norm {norm!r}; allowed: {', '.join(NORMS)}")


# The fused path, for one Pattention or a group of S Pattentions that read the same input (the
# attention's query, key and value): their key tokens are concatenated, so the scores of the whole
# group are one matrix product ``x [N, d_in] @ keys^T -> [N, S * n]``; each segment of n scores is
# normalised with its own tau, and the value products run as one batched product. Done naively,
# ``theta`` takes several passes over the [N, S * n] score matrix and autograd keeps three such
# matrices; here forward and backward are a registered operator pair (``tokenformer::
# pattention_forward`` / ``pattention_backward``) that keeps what backward needs and nothing more.
# ``torch.compile`` sees each as one opaque node (its fake implementation gives the shapes); with
# the Triton kernels (``triton_kernels.py``) each [N, S * n] matrix is written once and read where
# it is needed, the normalisation folded into the neighbouring products.
#
# Forward returns ``(out [S, N, d_out], probs, aux, row_scale)``: the last three are what backward
# needs (a custom operator can keep only its inputs and outputs). Per implementation:
#   torch, l2_norm_gelu:  probs = GeLU(z) and aux = z = A * r, r = tau / ||A|| per row and segment
#   torch, gelu_l2_norm:  probs = GeLU(A) * r and aux = A, r = tau / ||GeLU(A)||
#   torch, softmax:       probs = n * softmax(A); aux and row_scale empty
#   triton, l2_norm_gelu: aux = A only (probs empty: recomputed from A where it is read)


def _row_norm(t):
    # Row reductions of bf16 tensors accumulate in float32 inside the kernels and round only the
    # result: as precise as the reference's float32 copy of the score matrix, without it.
    norm = torch.linalg.vector_norm(t, dim=-1, keepdim=True)
    return _cast(norm, _accumulate_dtype(t.dtype)).clamp_min(_NORM_EPS)


def _row_dot(a, b, tau):
    """``(a . b) / tau^2`` per row and segment, in the dtype of ``a``."""
    if a.is_contiguous() and b.is_contiguous():
        # As a batch of dot products: no [N, S, n] temporary of the products.
        dots = torch.bmm(a.view(-1, 1, a.shape[-1]), b.view(-1, b.shape[-1], 1)).view(*a.shape[:-1], 1)
    else:
        dots = (a * b).sum(-1, keepdim=True)
    return (dots / (tau * tau)).to(a.dtype)


def _segments(keys: torch.Tensor, tau: torch.Tensor) -> tuple[int, int]:
    """``(S, n)``: the number of segments and the parameter tokens per segment."""
    return tau.shape[0], keys.shape[0] // tau.shape[0]


def _torch_forward(x, keys, values, tau, norm):
    (s, n), rows = _segments(keys, tau), x.shape[0]
    scores = torch.mm(x, keys.t())
    a, t = scores.view(rows, s, n), _cast(tau.view(s, 1), _accumulate_dtype(x.dtype))
    if norm == "l2_norm_gelu":
        row_scale = t / _row_norm(a)
        probs = F.gelu(a.mul_(_cast(row_scale, a.dtype)))
    elif norm == "gelu_l2_norm":
        probs = F.gelu(a)
        row_scale = t / _row_norm(probs)
        probs.mul_(_cast(row_scale, a.dtype))
    else:
        # n * softmax(A), n = tau^2 frozen at creation; softmax subtracts the row maximum.
        probs = torch.softmax(a, dim=-1).mul_((t * t).to(a.dtype))
        scores, row_scale = scores.new_empty(0), scores.new_empty(0)
    if s == 1:  # the same product as a batch of one, without the batch's bookkeeping
        out = torch.mm(probs.view(rows, n), values).unsqueeze(0)
    else:
        out = torch.bmm(probs.transpose(0, 1), values.view(s, n, -1))
    return out, probs.view(rows, s * n), scores, row_scale.view(rows, -1) if row_scale.numel() else row_scale


def _torch_backward(grad_out, x, keys, values, tau, probs, aux, row_scale, norm):
    (s, n), rows = _segments(keys, tau), x.shape[0]
    p, t = probs.view(rows, s, n), _cast(tau.view(s, 1), _accumulate_dtype(x.dtype))
    grad_values = torch.bmm(p.permute(1, 2, 0), grad_out).view(s * n, -1)
    # dL/dS, written as [N, S, n]; every step below works in place in that buffer.
    grad = x.new_empty(rows, s, n)
    torch.bmm(grad_out, values.view(s, n, -1).transpose(1, 2), out=grad.transpose(0, 1))
    if norm == "l2_norm_gelu":
        # With z = A * r, r = tau / ||A||: dL/dA = r * (h - z * (h . z) / tau^2), h = dL/dz.
        z = aux.view(rows, s, n)
        torch.ops.aten.gelu_backward.grad_input(grad, z, grad_input=grad)
        grad.addcmul_(z, _row_dot(grad, z, t), value=-1)
    elif norm == "gelu_l2_norm":
        # With S = G * r, r = tau / ||G||: dL/dG = r * (dS - S * (dS . S) / tau^2); then GeLU'.
        grad.addcmul_(p, _row_dot(grad, p, t), value=-1)
        torch.ops.aten.gelu_backward.grad_input(grad, aux.view(rows, s, n), grad_input=grad)
    else:
        # S = n * softmax(A): dL/dA = S * (dS - (dS . S) / n), n = tau^2.
        grad.sub_(_row_dot(grad, p, t)).mul_(p)
    grad = grad.view(rows, s * n)
    if row_scale.numel() == 0:
        return grad @ keys, grad.T @ x, grad_values
    scale = row_scale.to(x.dtype)
    if s == 1:  # one scale per row: applied on the narrow [N, d_in] side instead of a pass over [N, n]
        return (grad @ keys).mul_(scale), grad.T @ (x * scale), grad_values
    grad.view(rows, s, n).mul_(scale.unsqueeze(-1))
    return grad @ keys, grad.T @ x, grad_values


@torch.library.custom_op("tokenformer::pattention_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tau: torch.Tensor, norm: str, use_triton: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``theta(x @ keys^T)`` per segment times the segment's values: ``x [N, d_in]``, ``keys [S*n, d_in]``,
    ``values [S*n, d_out]``, ``tau [S]`` -> ``(out [S, N, d_out], probs, aux, row_scale)``."""
    return _forward_impl(x, keys, values, tau, norm, use_triton)


def _forward_impl(x, keys, values, tau, norm, use_triton):
    if use_triton:
        from . import triton_kernels

        return triton_kernels.forward(x, keys, values, tau, _NORM_EPS)
    return _torch_forward(x, keys, values, tau, norm)


@_forward_op.register_fake
def _(x, keys, values, tau, norm, use_triton):
    (s, n), rows = _segments(keys, tau), x.shape[0]
    out = x.new_empty(s, rows, values.shape[-1])
    scale_dtype = _accumulate_dtype(x.dtype)
    if use_triton:
        return out, x.new_empty(0), x.new_empty(rows, s * n), x.new_empty(rows, s, dtype=scale_dtype)
    if norm == "softmax":
        return out, x.new_empty(rows, s * n), x.new_empty(0), x.new_empty(0)
    return out, x.new_empty(rows, s * n), x.new_empty(rows, s * n), x.new_empty(rows, s, dtype=scale_dtype)


@torch.library.custom_op("tokenformer::pattention_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    tau: torch.Tensor,
    probs: torch.Tensor,
    aux: torch.Tensor,
    row_scale: torch.Tensor,
    norm: str,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(x, keys, values)`` of :func:`_forward_op` from what it returned."""
    if use_triton:
        from . import triton_kernels

        return triton_kernels.backward(grad_out, x, keys, values, tau, aux, row_scale)
    return _torch_backward(grad_out, x, keys, values, tau, probs, aux, row_scale, norm)


@_backward_op.register_fake
def _(grad_out, x, keys, values, tau, probs, aux, row_scale, norm, use_triton):
    return torch.empty_like(x), torch.empty_like(keys), torch.empty_like(values)


def _reference_group(x, keys, values, tau, norm):
    """The plain formula with :func:`_forward_op`'s arguments and output ``[S, N, d_out]``."""
    if tau.shape[0] == 1:
        return (normalise_scores(F.linear(x, keys), norm, tau) @ values).unsqueeze(0)
    (s, n), rows = _segments(keys, tau), x.shape[0]
    probs = normalise_scores((x @ keys.T).view(rows, s, n), norm, tau.view(s, 1))
    return torch.bmm(probs.transpose(0, 1), values.view(s, n, -1))


def _setup_context(ctx, inputs, output):
    x, keys, values, tau, norm, use_triton = inputs
    _, probs, aux, row_scale = output
    ctx.norm, ctx.use_triton = norm, use_triton
    ctx.save_for_backward(x, keys, values, tau, probs, aux, row_scale)
    ctx.mark_non_differentiable(probs, aux, row_scale)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, *_):
    x, keys, values, tau, probs, aux, row_scale = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None, None
    if torch.is_grad_enabled():
        # A graph of the gradient is wanted (create_graph=True, or a torch.func transform): the
        # operator's saved intermediates do not record how they depend on x and the keys, so the
        # gradient is taken through the plain formula instead, whose every step is differentiable.
        _, vjp = torch.func.vjp(lambda *t: _reference_group(*t, tau, ctx.norm), x, keys, values)
        grads = vjp(grad_out)
    else:
        grads = _backward_op(grad_out, x, keys, values, tau, probs, aux, row_scale, ctx.norm, ctx.use_triton)
    return (*grads, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _FusedPattention(torch.autograd.Function):
    """The registered operator with its autograd, in the form ``torch.func`` transforms accept
    (``grad``, ``vjp``, ``jacrev``, ``jvp``, ``hessian``, ``vmap``); eager calls go through it."""

    @staticmethod
    def forward(x, keys, values, tau, norm, use_triton):
        return _forward_op(x, keys, values, tau, norm, use_triton)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:4])

    backward = staticmethod(_backward)

    @staticmethod
    def jvp(ctx, x_t, keys_t, values_t, *_):
        x, keys, values, tau = ctx.saved_tensors
        primals = (x, keys, values)
        tangents = tuple(
            torch.zeros_like(p) if t is None else t for p, t in zip(primals, (x_t, keys_t, values_t), strict=True)
        )
        out_t = torch.func.jvp(lambda *t: _reference_group(*t, tau, ctx.norm), primals, tangents)[1]
        return out_t, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, keys, values, tau, norm, use_triton):
        x_dim, *weight_dims = in_dims[:4]
        if all(d is None for d in weight_dims):
            # Only the input is batched: the batch joins the token axis.
            x = x.movedim(x_dim, 0)
            batch, rows = x.shape[:2]
            out, *saved = _FusedPattention.apply(x.reshape(batch * rows, -1), keys, values, tau, norm, use_triton)
            saved = [t.view(batch, rows, *t.shape[1:]) if t.numel() else t for t in saved]
            dims = (1, *(0 if t.numel() else None for t in saved))
            return (out.view(out.shape[0], batch, rows, -1), *saved), dims
        args = (x, keys, values, tau)
        per_sample = [
            _FusedPattention.apply(
                *(a if d is None else a.select(d, i) for a, d in zip(args, in_dims, strict=False)), norm, use_triton
            )
            for i in range(info.batch_size)
        ]
        return tuple(torch.stack(parts) for parts in zip(*per_sample, strict=True)), (0, 0, 0, 0)


def _fused(x, keys, values, tau, norm, use_triton) -> torch.Tensor:
    """``[S, N, d_out]`` through the registered operator."""
    if torch.compiler.is_compiling():
        return _forward_op(x, keys, values, tau, norm, use_triton)[0]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, keys, values)):
        return _FusedPattention.apply(x, keys, values, tau, norm, use_triton)[0]
    # Inference (generation): the implementation itself, without the dispatcher's per-call cost.
    return _forward_impl(x, keys, values, tau, norm, use_triton)[0]


IMPLS = ("auto", "reference", "fused", "triton")


# Looked up once, without importing it: the check also runs while torch.compile traces.
_TRITON_INSTALLED = (
    importlib.util.find_spec("triton") is not None
    and importlib.util.find_spec(".triton_kernels", __package__) is not None
)


def triton_available() -> bool:
    """Whether the Triton kernels can run: the optional ``triton`` package is installed (``pip install
    'tokenformer[triton]'``) and so is their module, which the code a model directory carries for
    transformers leaves out."""
    return _TRITON_INSTALLED


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
    return impl == "auto" and x.is_cuda and norm == "l2_norm_gelu" and triton_available()


def _plain(impl: str, x: torch.Tensor, taus: Sequence[torch.Tensor]) -> bool:
    """Whether the plain formula runs instead of the registered operator."""
    if impl == "reference" or any(t.requires_grad for t in taus):
        return True
    if torch.jit.is_tracing():  # TorchScript (and the ONNX export built on it) knows no registered operator
        return True
    # On the CPU the compiler generates faster code for the whole formula (its normalisation
    # fused with the neighbouring element-wise work) than for an operator it cannot look into.
    return impl == "auto" and x.device.type == "cpu" and torch.compiler.is_compiling()


def _concat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tuple(tensors))


def _stack(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    return taus[0].reshape(1) if len(taus) == 1 else torch.stack(tuple(taus))


def pattention_group(
    x: torch.Tensor,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    taus: Sequence[torch.Tensor],
    norm: str = "l2_norm_gelu",
    impl: str = "auto",
) -> list[torch.Tensor]:
    """``[pattention(x, k, v, tau, norm, impl) for k, v, tau in zip(keys, values, taus)]`` as one
    score product over the concatenated key tokens and one batched value product.

    Each Pattention of the group keeps its own normalisation and ``tau``. A group with unequal
    token counts or output widths runs each Pattention on its own.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown Pattention impl {impl!r}; allowed: {', '.join(IMPLS)}")
    if not len(keys) == len(values) == len(taus) >= 1:
        raise ValueError(
            f"pattention_group needs as many values and taus as keys (at least one), got "
            f"{len(keys)} keys, {len(values)} values, {len(taus)} taus"
        )
    if len({(k.shape[0], v.shape[-1]) for k, v in zip(keys, values, strict=True)}) > 1:
        return [pattention(x, k, v, t, norm, impl) for k, v, t in zip(keys, values, taus, strict=True)]
    return _group(x, keys, values, taus, norm, impl)


def _group(x, keys, values, taus, norm, impl) -> list[torch.Tensor]:
    lead, d_out = x.shape[:-1], values[0].shape[-1]
    flat = x.reshape(-1, x.shape[-1])
    if _plain(impl, x, taus):
        out = _reference_group(flat, _concat(keys), _concat(values), _stack(taus), norm)
    else:
        use_triton = _use_triton(impl, x, norm)
        # Autocast does not reach into a custom operator: cast on the way in.
        dtype = _compute_dtype(x, keys[0])
        out = _fused(_cast(flat, dtype), *_tokens(keys, values, taus, dtype), norm, use_triton)
    return [part.view(*lead, d_out) for part in out.unbind(0)]


_reused_tokens: contextvars.ContextVar[dict | None] = contextvars.ContextVar("reused_tokens", default=None)


@contextlib.contextmanager
def reuse_tokens():
    """Within this block, calls without autograd keep what they build from the weights from call to
    call instead of building it anew: each group's concatenated key and value tokens (cast to the
    autocast dtype) and, on the CPU, from a weight's ``DECODING_LAYOUT_AFTER``-th use on, a copy of
    it in its decoding layout (:func:`decoding_layout`; the copies take about as much memory as
    the weights while the block lasts).

    For generation (``TokenformerLM.generate`` and the transformers ``generate`` use it), where the
    weights do not change between new tokens; a parameter changed in place inside the block would
    not be seen.
    """
    reset = _reused_tokens.set({})
    try:
        yield
    finally:
        _reused_tokens.reset(reset)


# A kept weight is first used as it is stored; from its DECODING_LAYOUT_AFTER-th use on, in its
# decoding layout. Building that layout copies the weight once, which at the 150M size on the CPU
# took about as long as ten decoding steps: a short generation would not make the copy back.
DECODING_LAYOUT_AFTER = 16


def _kept(
    kind: str, weights: Sequence[torch.Tensor], build: Callable[[bool], Any], taus: Sequence[torch.Tensor] = ()
) -> Any:
    """``build(False)``; within :func:`reuse_tokens` (calls without autograd), kept for these
    ``weights`` (and ``taus``): built once with ``build(False)``, and again with ``build(True)`` (the
    decoding layout) at its ``DECODING_LAYOUT_AFTER``-th use. Only parameters are kept: a weight
    computed from them at every call (an adapter's) is a new tensor each time."""
    # (The compiler cannot trace a context variable: it is only read outside compiled code.)
    cache = None if torch.compiler.is_compiling() or torch.is_grad_enabled() else _reused_tokens.get()
    if cache is None or not all(isinstance(w, nn.Parameter) for w in weights):
        return build(False)
    # Growth and pruning replace a parameter's tensor: its memory or its shape changes.
    key = (kind, *[(t.data_ptr(), t.shape) for t in (*weights, *taus)])
    entry = cache.get(key)
    if entry is None:
        entry = cache[key] = [0, build(False)]
    entry[0] += 1
    if entry[0] == DECODING_LAYOUT_AFTER:
        entry[1] = build(True)
    return entry[1]


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


@functools.cache
def _madvise() -> Callable[..., int] | None:
    """libc's ``madvise`` (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return function


def huge_page_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of the CPU tensor ``t`` in memory that Linux may back with 2 MiB pages
    (transparent huge pages, asked for with ``madvise``; elsewhere an ordinary copy). A decoding
    step streams every weight once: with fewer pages to translate, a 150M step on the CPU took
    0.82x the time, and the copy itself is made in about half the time (far fewer page faults)."""
    copy = torch.empty(t.shape, dtype=t.dtype)
    start, size = copy.data_ptr(), copy.numel() * copy.element_size()
    first, end = -(-start // _HUGE_PAGE) * _HUGE_PAGE, (start + size) // _HUGE_PAGE * _HUGE_PAGE
    madvise = _madvise()
    if madvise is not None and end > first:  # before the first write: its pages are not there yet
        madvise(first, end - first, _MADV_HUGEPAGE)
    return copy.copy_(t)


def decoding_layout(weight: torch.Tensor) -> torch.Tensor:
    """``weight [out, in]`` (the right operand of ``x @ weight.T``) with the same values and shape,
    copied so that decoding reads it fastest on the CPU: along its longer side, on huge pages
    (:func:`huge_page_copy`). Decoding multiplies one row per sequence by every weight, a
    product bound by how fast the weight streams from memory, and the CPU's products stream long
    rows faster than short ones: with ``out >= in`` ``weight.T`` row by row (a vector-matrix
    product), else ``weight`` row by row (dot products). Against the dot products over rows of
    768 this streamed up to 1.4x faster (docs/performance.md). Other devices get ``weight`` itself."""
    if weight.device.type != "cpu":
        return weight
    out_features, in_features = weight.shape
    if out_features >= in_features:
        return huge_page_copy(weight.T).T
    return huge_page_copy(weight)


def _laid_out(weight: torch.Tensor, kept: bool) -> torch.Tensor:
    return decoding_layout(weight) if kept else weight


def reused_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` for ``F.linear``; within :func:`reuse_tokens`, kept in its :func:`decoding_layout`."""
    return _kept("weight", (weight,), lambda kept: _laid_out(weight, kept))


def reused_concat(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(weights)`` for ``F.linear``; within :func:`reuse_tokens`, kept in its decoding layout."""
    return _kept("concat", weights, lambda kept: _laid_out(_concat(weights), kept))


def _tokens(keys, values, taus, dtype):
    """The key and value tokens of a group concatenated in ``dtype``, and its taus as one tensor;
    within :func:`reuse_tokens`, kept in their decoding layout (the values of a single Pattention:
    the group's products read each segment's values as they are stored)."""

    def build(kept: bool):
        keys_, values_ = _cast(_concat(keys), dtype), _cast(_concat(values), dtype)
        if len(values) == 1:  # out = probs @ values: the product's weight is values.T
            values_ = _laid_out(values_.T, kept).T
        elif kept and values_.device.type == "cpu":  # the group's batched product reads them as stored
            values_ = huge_page_copy(values_)
        return _laid_out(keys_, kept), values_, _stack(taus)

    return _kept(f"tokens {dtype}", (*keys, *values), build, taus)


def pattention(
    x: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    tau: torch.Tensor,
    norm: str = "l2_norm_gelu",
    impl: str = "auto",
    ghost: torch.Tensor | None = None,
) -> torch.Tensor:
    """``theta(x @ keys^T) @ values`` over the last axis of ``x``.

    ``impl``: ``"reference"`` is the plain formula (every intermediate kept by autograd);
    ``"fused"`` the registered operator ``tokenformer::pattention_forward`` with its own backward;
    ``"triton"`` that operator with Triton kernels (CUDA; CPU tensors only under
    ``TRITON_INTERPRET=1``); ``"auto"`` picks Triton for CUDA tensors when it is installed, the
    plain formula when compiling for the CPU, and ``"fused"`` otherwise. A trainable ``tau``
    always takes the plain formula.

    ``ghost [r, d_in]``: a pruned layer's ghost factor, whose scores ``x @ ghost^T`` count towards
    each row's norm; such a layer always runs the plain formula (the fused paths have no ghost).
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown Pattention impl {impl!r}; allowed: {', '.join(IMPLS)}")
    if ghost is not None:
        return normalise_scores(F.linear(x, keys), norm, tau, F.linear(x, ghost)) @ values
    return _group(x, (keys,), (values,), (tau,), norm, impl)[0]


class Pattention(nn.Module):
    """A batch-first drop-in for ``nn.Linear(in_features, out_features, bias=False)``.

    Parameters ``key_param_tokens [num_tokens, in_features]`` and ``value_param_tokens
    [num_tokens, out_features]``; the buffer ``tau`` is saved in the state dict. ``tau`` is the
    score scale at creation: ``sqrt(num_tokens)`` unless given, then frozen (never recomputed
    from the token count, so appending tokens keeps the function). ``impl`` chooses the
    implementation (see :func:`pattention`); every choice computes the same function.

    A pruned layer may hold the buffer ``ghost [ghost_rank, in_features]`` (saved in the state
    dict; ``None`` otherwise): a factor of the removed keys' Gram matrix that keeps their share of
    every row's norm (:mod:`tokenformer.pruning`); :meth:`set_ghost` sets or removes it.

    A layer grown with separate normalisation (``grow(..., normalisation="separate")``) has two
    groups of tokens: the first ``split`` (the old ones, with ``tau`` and the ghost) and the rest
    (with the buffer ``split_tau``), each normalised over its own scores only; the output is the
    sum of the groups' outputs (:meth:`parts`). :meth:`set_split` sets it.
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
        self.register_buffer("ghost", None)
        self.split = 0
        self.register_buffer("split_tau", None)
        self.reset_parameters()

    @property
    def num_tokens(self) -> int:
        return self.key_param_tokens.shape[0]

    @property
    def ghost_rank(self) -> int:
        """Rows of the ghost factor (0: none)."""
        return 0 if self.ghost is None else self.ghost.shape[0]

    def set_ghost(self, factor: torch.Tensor | None) -> None:
        """Set the ghost factor ``[rank, in_features]`` (``None`` or zero rows: no ghost)."""
        if factor is not None and (factor.dim() != 2 or factor.shape[1] != self.in_features):
            raise ValueError(
                f"a ghost factor must have shape [rank, in_features={self.in_features}], got {tuple(factor.shape)}"
            )
        if factor is not None and factor.shape[0] and self.norm != "l2_norm_gelu":
            raise ValueError(f"a ghost norm exists for norm='l2_norm_gelu' only, this layer has norm={self.norm!r}")
        keys = self.key_param_tokens
        present = factor is not None and factor.shape[0]
        # Contiguous, as a loaded one is: the same bits then give the same products.
        self.ghost = factor.to(keys.device, keys.dtype).contiguous() if present else None

    def set_split(self, split: int, tau: float) -> None:
        """Normalise tokens ``split:`` apart from the first ``split``, with score scale ``tau``
        (``split=0``: one normalisation over every token)."""
        if not (isinstance(split, int) and not isinstance(split, bool) and 0 <= split < self.num_tokens):
            raise ValueError(
                f"a Pattention split must be an integer from 0 to num_tokens - 1 = {self.num_tokens - 1}, got {split!r}"
            )
        if split and not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"the score scale of a Pattention's second group must be a finite number > 0, got {tau!r}")
        self.split = split
        keys = self.key_param_tokens
        self.split_tau = torch.tensor(float(tau), device=keys.device, dtype=self.tau.dtype) if split else None

    def parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of each normalisation group: ``[old, new]`` for a layer with a split, else
        ``[output]``. The old part is computed exactly as the layer computed it before the split."""
        keys, values = self.key_param_tokens, self.value_param_tokens
        if not self.split:
            return [self._group_output(x, keys, values, self.tau, self.ghost)]
        s = self.split
        return [
            self._group_output(x, keys[:s], values[:s], self.tau, self.ghost),
            self._group_output(x, keys[s:], values[s:], self.split_tau, None),
        ]

    def _group_output(self, x, keys, values, tau, ghost) -> torch.Tensor:
        if ghost is not None:
            return pattention(x, keys, values, tau, self.norm, self.impl, ghost)
        return _group(x, (keys,), (values,), (tau,), self.norm, self.impl)[0]

    def reset_parameters(self) -> None:
        nn.init.normal_(self.key_param_tokens, std=self.key_std)
        nn.init.normal_(self.value_param_tokens, std=self.value_std)
        if not self.tau.is_meta:
            self.tau.fill_(self.initial_tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl not in IMPLS:
            raise ValueError(f"unknown Pattention impl {self.impl!r}; allowed: {', '.join(IMPLS)}")
        parts = self.parts(x)
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]

    def extra_repr(self) -> str:
        ghost = f", ghost_rank={self.ghost_rank}" if self.ghost is not None else ""
        split = f", split={self.split}" if self.split else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_tokens={self.num_tokens}, norm={self.norm!r}{ghost}{split}"
        )


def run_pattentions(layers: Sequence[Pattention], x: torch.Tensor) -> list[torch.Tensor]:
    """``[layer(x) for layer in layers]``, as one group (:func:`pattention_group`) when the layers
    share their norm and implementation (and none has a ghost or a split, or forward hooks: a
    hooked layer is called, so that its hooks see its input and output)."""
    first = layers[0]
    shapes = {(layer.num_tokens, layer.out_features, layer.norm, layer.impl) for layer in layers}
    special = any(layer.ghost is not None or layer.split or _hooked(layer) for layer in layers)
    if len(shapes) > 1 or first.impl not in IMPLS or special:
        return [layer(x) for layer in layers]
    keys = [layer.key_param_tokens for layer in layers]
    values = [layer.value_param_tokens for layer in layers]
    return _group(x, keys, values, [layer.tau for layer in layers], first.norm, first.impl)


def _hooked(layer: nn.Module) -> bool:
    return bool(layer._forward_hooks or layer._forward_pre_hooks)
