"""Triton kernels for the ``l2_norm_gelu`` step of Pattention (CUDA; the CPU under
``TRITON_INTERPRET=1``).

One program per row of the ``[N, n]`` score matrix. Forward reads the row twice (sum of squares,
then scale and GeLU) and writes the normalised scores in place plus the GeLU output; backward
reads the gradient and the normalised scores twice (row dot product, then the gradient) and
writes the score gradient. The second read of a row is served from cache. Arithmetic is in
float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Longer rows are processed in chunks of this many columns.
MAX_BLOCK = 4096
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _gelu_and_slope(z):
    cdf = 0.5 * (1.0 + tl.erf(z * _INV_SQRT2))
    return z * cdf, cdf + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI


@triton.jit
def _load_chunk(row_ptr, start, n_cols, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    cols = start + tl.arange(0, BLOCK)
    mask = cols < n_cols
    return cols, mask, tl.load(row_ptr + cols, mask=mask, other=0.0).to(COMPUTE)


@triton.jit
def _forward_kernel(scores_ptr, probs_ptr, scale_ptr, tau_ptr, n_cols, eps, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    scores_row = scores_ptr + row * n_cols
    squares = tl.zeros([BLOCK], dtype=COMPUTE)
    for start in range(0, n_cols, BLOCK):
        _, _, a = _load_chunk(scores_row, start, n_cols, BLOCK, COMPUTE)
        squares += a * a
    norm = tl.maximum(tl.sqrt(tl.sum(squares, axis=0)), eps)
    scale = tl.load(tau_ptr).to(COMPUTE) / norm
    tl.store(scale_ptr + row, scale)
    for start in range(0, n_cols, BLOCK):
        cols, mask, a = _load_chunk(scores_row, start, n_cols, BLOCK, COMPUTE)
        z = a * scale
        gelu, _ = _gelu_and_slope(z)
        tl.store(scores_row + cols, z.to(scores_ptr.dtype.element_ty), mask=mask)
        tl.store(probs_ptr + row * n_cols + cols, gelu.to(probs_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(grad_ptr, normalised_ptr, out_ptr, tau_ptr, n_cols, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    # dL/dA / s = h - z * (h . z) / tau^2 with h = dL/dS * GeLU'(z).
    row = tl.program_id(0).to(tl.int64)
    grad_row = grad_ptr + row * n_cols
    z_row = normalised_ptr + row * n_cols
    dots = tl.zeros([BLOCK], dtype=COMPUTE)
    for start in range(0, n_cols, BLOCK):
        _, _, z = _load_chunk(z_row, start, n_cols, BLOCK, COMPUTE)
        _, _, grad = _load_chunk(grad_row, start, n_cols, BLOCK, COMPUTE)
        _, slope = _gelu_and_slope(z)
        dots += grad * slope * z
    tau = tl.load(tau_ptr).to(COMPUTE)
    k = tl.sum(dots, axis=0) / (tau * tau)
    for start in range(0, n_cols, BLOCK):
        cols, mask, z = _load_chunk(z_row, start, n_cols, BLOCK, COMPUTE)
        _, _, grad = _load_chunk(grad_row, start, n_cols, BLOCK, COMPUTE)
        _, slope = _gelu_and_slope(z)
        tl.store(out_ptr + row * n_cols + cols, (grad * slope - z * k).to(out_ptr.dtype.element_ty), mask=mask)


def _launch_config(n_cols: int, dtype: torch.dtype) -> dict:
    block = min(triton.next_power_of_2(max(n_cols, 1)), MAX_BLOCK)
    compute = tl.float64 if dtype == torch.float64 else tl.float32
    return {"BLOCK": block, "COMPUTE": compute, "num_warps": 8 if block >= 2048 else 4}


def l2_norm_gelu_forward(scores: torch.Tensor, tau: torch.Tensor):
    """Same contract as the torch version in ``pattention.py``: overwrites ``scores`` (any
    leading shape) with the normalised scores and returns ``(probs, row_scale, (normalised,))``."""
    shape = scores.shape
    flat = scores.reshape(-1, shape[-1]).contiguous()
    rows, n_cols = flat.shape
    probs = torch.empty_like(flat)
    row_scale = torch.empty(rows, 1, device=flat.device, dtype=torch.promote_types(flat.dtype, torch.float32))
    if rows:
        from .pattention import _NORM_EPS

        _forward_kernel[(rows,)](flat, probs, row_scale, tau, n_cols, _NORM_EPS, **_launch_config(n_cols, flat.dtype))
    return probs.view(shape), row_scale.view(*shape[:-1], 1), (flat.view(shape),)


def l2_norm_gelu_backward(grad_probs: torch.Tensor, tau: torch.Tensor, normalised: torch.Tensor) -> torch.Tensor:
    grad_probs = grad_probs.contiguous()
    rows, n_cols = grad_probs.shape
    out = torch.empty_like(grad_probs)
    if rows:
        _backward_kernel[(rows,)](grad_probs, normalised, out, tau, n_cols, **_launch_config(n_cols, grad_probs.dtype))
    return out
