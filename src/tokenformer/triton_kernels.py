"""Triton kernels for Pattention with ``l2_norm_gelu`` (CUDA; the CPU under ``TRITON_INTERPRET=1``).

For a group of S Pattentions of n parameter tokens each reading ``x [N, d_in]`` (S = 1 for one
layer, 3 for the attention's query, key and value), with ``keys [S*n, d_in]``, ``values
[S*n, d_out]``, scores ``A = x @ keys^T [N, S*n]``, ``r = tau / ||A||`` per row and segment,
``z = A * r`` and ``P = GeLU(z)``. Every [N, S*n] matrix is written once and read where it is
needed, with the normalisation folded into the matrix products around it:

forward
    scores:  ``A = x @ keys^T``; the epilogue stores A and each tile's per-row sum of squares
             (a [N, S, tiles] buffer: no atomics, so results do not depend on scheduling).
    values:  ``out_s = GeLU(A_s * r_s) @ V_s``; the prologue sums the row's partial squares and
             scales and activates each A tile as it loads it. P is never stored.
backward (``grad_out [S, N, d_out]``)
    ``h = (grad_out_s @ V_s^T) * GeLU'(z)``; the epilogue stores h and per-row partials of h . z.
    ``grad V_s = GeLU(A_s r_s)^T @ grad_out_s``, the forward prologue on transposed tiles.
    ``grad A = r * (h - z * (h . z) / tau^2)``, element-wise in place of h; then the two plain
    products ``grad x = grad A @ keys`` and ``grad keys = grad A^T @ x`` (cuBLAS through torch).

Products accumulate in float32 (float64 for float64 inputs); the GeLU and the scaling run in the
accumulation dtype; stored matrices are in the input dtype.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Score tiles per row segment are this wide in the products whose epilogue writes per-tile
# partial sums: fixed, so the partial buffers can be sized before the launch. Small under the
# interpreter, so that short test rows span several tiles.
SCORE_TILE = 32 if _INTERPRET else 128
_INTERPRETED = tl.constexpr(_INTERPRET)
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


def _configs(tiles: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    """(BM, BN, BK, warps, stages) candidates; one small tile under the interpreter."""
    if _INTERPRET:
        return [triton.Config({"BM": 32, "BN": SCORE_TILE, "BK": 32})]
    return [triton.Config({"BM": m, "BN": n, "BK": k}, num_warps=w, num_stages=s) for m, n, k, w, s in tiles]


# Candidates for Hopper-class GPUs; the autotuner times them once per shape and dtype.
_TILES = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 32, 4, 3)]
_FIXED_N_TILES = [(m, SCORE_TILE, k, w, s) for m, n, k, w, s in _TILES if n == 128] + [(64, SCORE_TILE, 32, 4, 3)]


def _prune(configs, named_args, **_):
    # float64 tiles need four times the memory of bf16 ones: the smallest candidate only.
    if next(iter(named_args.values())).dtype == torch.float64:
        return [min(configs, key=lambda c: c.kwargs["BM"] * c.kwargs["BN"] * c.kwargs["BK"])]
    return configs


_PRUNE = {"early_config_prune": _prune}


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    if _INTERPRETED:
        # The interpreter multiplies bf16 tiles as their raw bits; a product of two bf16 numbers
        # is exact in the accumulation dtype, so that is where they are multiplied there.
        a = a.to(acc.dtype)
        b = b.to(acc.dtype)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def _gelu(z):
    return 0.5 * z * (1.0 + tl.erf(z * _INV_SQRT2))


@triton.jit
def _gelu_slope(z):
    return 0.5 * (1.0 + tl.erf(z * _INV_SQRT2)) + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI


@triton.jit
def _tile(m_tiles, n_tiles, GROUP: tl.constexpr):
    """This program's (row tile, column tile), in groups of GROUP row tiles so that neighbouring
    programs share operands in the L2 cache; the segment is the second grid axis."""
    pid = tl.program_id(0)
    width = GROUP * n_tiles
    first = (pid // width) * GROUP
    size = tl.minimum(m_tiles - first, GROUP)
    return first + (pid % width) % size, (pid % width) // size


@triton.jit
def _row_scale(partials_ptr, rows, row_ok, seg, S, T, tau, eps, BT: tl.constexpr, ACC: tl.constexpr):
    """``tau / ||A row segment||`` from the per-tile sums of squares."""
    tiles = tl.arange(0, BT)
    ptrs = partials_ptr + (rows[:, None] * S + seg) * T + tiles[None, :]
    squares = tl.sum(tl.load(ptrs, mask=row_ok[:, None] & (tiles[None, :] < T), other=0.0).to(ACC), axis=1)
    return tau / tl.maximum(tl.sqrt(squares), eps)


@triton.autotune(configs=_configs(_FIXED_N_TILES), key=["n", "D"], prune_configs_by=_PRUNE)
@triton.jit
def _scores_kernel(
    x_ptr, k_ptr, a_ptr, sq_ptr, N, n, D, S, T,
    stride_xm, stride_xk, stride_kn, stride_kk,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _tile(tl.cdiv(N, BM), tl.cdiv(n, BN), 8)
    seg = tl.program_id(1)
    rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    row_ok, col_ok = rows < N, cols < n
    tokens = seg * n + cols
    acc = tl.zeros((BM, BN), dtype=ACC)
    for start in range(0, D, BK):
        ks = start + tl.arange(0, BK)
        k_ok = ks < D
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk, row_ok[:, None] & k_ok[None, :], 0.0)
        kt = tl.load(
            k_ptr + tokens[None, :] * stride_kn + ks[:, None] * stride_kk, col_ok[None, :] & k_ok[:, None], 0.0
        )
        acc = _dot(xt, kt, acc, PRECISION)
    out = a_ptr + rows[:, None] * (S * n) + tokens[None, :]
    tl.store(out, acc.to(a_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    # Columns past n were loaded as zero keys: they add nothing to the sums.
    tl.store(sq_ptr + (rows * S + seg) * T + pid_n, tl.sum(acc * acc, axis=1), mask=row_ok)


@triton.autotune(configs=_configs(_TILES), key=["n", "Dout"], prune_configs_by=_PRUNE)
@triton.jit
def _values_kernel(
    a_ptr, sq_ptr, tau_ptr, v_ptr, out_ptr, scale_ptr, N, n, Dout, S, T, eps,
    stride_vn, stride_vd,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, ACC: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _tile(tl.cdiv(N, BM), tl.cdiv(Dout, BN), 8)
    seg = tl.program_id(1)
    rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    row_ok, col_ok = rows < N, cols < Dout
    tau = tl.load(tau_ptr + seg).to(ACC)
    scale = _row_scale(sq_ptr, rows, row_ok, seg, S, T, tau, eps, BT, ACC)
    if pid_n == 0:
        tl.store(scale_ptr + rows * S + seg, scale, mask=row_ok)
    acc = tl.zeros((BM, BN), dtype=ACC)
    for start in range(0, n, BK):
        ks = start + tl.arange(0, BK)
        k_ok = ks < n
        a = tl.load(a_ptr + rows[:, None] * (S * n) + (seg * n + ks)[None, :], row_ok[:, None] & k_ok[None, :], 0.0)
        p = _gelu(a.to(ACC) * scale[:, None])
        v = tl.load(
            v_ptr + (seg * n + ks)[:, None] * stride_vn + cols[None, :] * stride_vd,
            k_ok[:, None] & col_ok[None, :],
            0.0,
        )  # noqa: E501
        acc = _dot(p.to(v.dtype), v, acc, PRECISION)
    out = out_ptr + (seg * N + rows[:, None]) * Dout + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(configs=_configs(_FIXED_N_TILES), key=["n", "Dout"], prune_configs_by=_PRUNE)
@triton.jit
def _grad_probs_kernel(
    g_ptr, v_ptr, a_ptr, scale_ptr, h_ptr, dot_ptr, N, n, Dout, S, T,
    stride_vn, stride_vd,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _tile(tl.cdiv(N, BM), tl.cdiv(n, BN), 8)
    seg = tl.program_id(1)
    rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    row_ok, col_ok = rows < N, cols < n
    tokens = seg * n + cols
    acc = tl.zeros((BM, BN), dtype=ACC)
    for start in range(0, Dout, BK):
        ks = start + tl.arange(0, BK)
        k_ok = ks < Dout
        g = tl.load(g_ptr + (seg * N + rows[:, None]) * Dout + ks[None, :], row_ok[:, None] & k_ok[None, :], 0.0)
        vt = tl.load(
            v_ptr + tokens[None, :] * stride_vn + ks[:, None] * stride_vd, col_ok[None, :] & k_ok[:, None], 0.0
        )
        acc = _dot(g, vt, acc, PRECISION)
    ok = row_ok[:, None] & col_ok[None, :]
    offsets = rows[:, None] * (S * n) + tokens[None, :]
    scale = tl.load(scale_ptr + rows * S + seg, mask=row_ok, other=0.0).to(ACC)
    z = tl.load(a_ptr + offsets, mask=ok, other=0.0).to(ACC) * scale[:, None]
    h = acc * _gelu_slope(z)
    tl.store(h_ptr + offsets, h.to(h_ptr.dtype.element_ty), mask=ok)
    tl.store(dot_ptr + (rows * S + seg) * T + pid_n, tl.sum(h * z, axis=1), mask=row_ok)


@triton.autotune(configs=_configs(_TILES), key=["n", "Dout"], prune_configs_by=_PRUNE)
@triton.jit
def _grad_values_kernel(
    a_ptr, scale_ptr, g_ptr, out_ptr, N, n, Dout, S,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # Rows of this product are parameter tokens, its reduction runs over the N input tokens.
    pid_m, pid_n = _tile(tl.cdiv(n, BM), tl.cdiv(Dout, BN), 8)
    seg = tl.program_id(1)
    tokens = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    token_ok, col_ok = tokens < n, cols < Dout
    acc = tl.zeros((BM, BN), dtype=ACC)
    for start in range(0, N, BK):
        rows = (start + tl.arange(0, BK)).to(tl.int64)
        row_ok = rows < N
        at = tl.load(
            a_ptr + rows[None, :] * (S * n) + (seg * n + tokens)[:, None], token_ok[:, None] & row_ok[None, :], 0.0
        )
        scale = tl.load(scale_ptr + rows * S + seg, mask=row_ok, other=0.0).to(ACC)
        pt = _gelu(at.to(ACC) * scale[None, :])
        g = tl.load(g_ptr + (seg * N + rows[:, None]) * Dout + cols[None, :], row_ok[:, None] & col_ok[None, :], 0.0)
        acc = _dot(pt.to(g.dtype), g, acc, PRECISION)
    out = out_ptr + (seg * n + tokens[:, None]) * Dout + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=token_ok[:, None] & col_ok[None, :])


@triton.jit
def _grad_scores_kernel(
    h_ptr, a_ptr, scale_ptr, dot_ptr, tau_ptr, N, n, S, T,
    BM: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    # dL/dA = r * (h - z * c) = r * h - (c * r^2) * A with c = (h . z) / tau^2; h is overwritten.
    seg = tl.program_id(2)
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    row_ok, col_ok = rows < N, cols < n
    tiles = tl.arange(0, BT)
    partials = tl.load(
        dot_ptr + (rows[:, None] * S + seg) * T + tiles[None, :], row_ok[:, None] & (tiles[None, :] < T), 0.0
    )
    tau = tl.load(tau_ptr + seg).to(ACC)
    scale = tl.load(scale_ptr + rows * S + seg, mask=row_ok, other=0.0).to(ACC)
    c = tl.sum(partials.to(ACC), axis=1) / (tau * tau)
    ok = row_ok[:, None] & col_ok[None, :]
    offsets = rows[:, None] * (S * n) + (seg * n + cols)[None, :]
    h = tl.load(h_ptr + offsets, mask=ok, other=0.0).to(ACC)
    a = tl.load(a_ptr + offsets, mask=ok, other=0.0).to(ACC)
    grad = scale[:, None] * h - (c * scale * scale)[:, None] * a
    tl.store(h_ptr + offsets, grad.to(h_ptr.dtype.element_ty), mask=ok)


def _accumulate(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _precision(dtype: torch.dtype) -> str:
    # float32 products are exact unless the user allowed TF32 for matmuls, as torch's are; the
    # setting means nothing to 16-bit operands.
    if dtype == torch.float64 or (dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def _segments(keys: torch.Tensor, tau: torch.Tensor) -> tuple[int, int, int]:
    s = tau.shape[0]
    n = keys.shape[0] // s
    return s, n, triton.cdiv(n, SCORE_TILE)


def _grid(rows: int, cols: int, s: int):
    return lambda meta: (triton.cdiv(rows, meta["BM"]) * triton.cdiv(cols, meta["BN"]), s)


def forward(x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tau: torch.Tensor, eps: float):
    """``(out [S, N, d_out], empty, A [N, S*n], row_scale [N, S])``: the contract of
    ``tokenformer::pattention_forward`` (see ``pattention.py``); ``eps`` is the floor of a row's norm."""
    (s, n, t), (rows, d_in), d_out = _segments(keys, tau), x.shape, values.shape[-1]
    acc, precision = _accumulate(x.dtype), _precision(x.dtype)
    scores = x.new_empty(rows, s * n)
    squares = torch.empty(rows, s, t, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    row_scale = torch.empty(rows, s, device=x.device, dtype=squares.dtype)
    out = x.new_empty(s, rows, d_out)
    if rows:
        _scores_kernel[_grid(rows, n, s)](
            x, keys, scores, squares, rows, n, d_in, s, t, *x.stride(), *keys.stride(), ACC=acc, PRECISION=precision
        )
        _values_kernel[_grid(rows, d_out, s)](
            scores, squares, tau, values, out, row_scale, rows, n, d_out, s, t, eps, *values.stride(),
            BT=triton.next_power_of_2(t), ACC=acc, PRECISION=precision,
        )  # fmt: skip
    return out, x.new_empty(0), scores, row_scale


def backward(grad_out, x, keys, values, tau, scores, row_scale):
    """Gradients ``(x, keys, values)`` from :func:`forward`'s saved ``scores`` and ``row_scale``."""
    (s, n, t), rows, d_out = _segments(keys, tau), x.shape[0], values.shape[-1]
    acc, precision = _accumulate(x.dtype), _precision(x.dtype)
    grad_out = grad_out.contiguous()
    grad = torch.empty_like(scores)
    dots = torch.empty(rows, s, t, device=x.device, dtype=row_scale.dtype)
    grad_values = torch.empty_like(values)
    if rows:
        _grad_probs_kernel[_grid(rows, n, s)](
            grad_out, values, scores, row_scale, grad, dots, rows, n, d_out, s, t, *values.stride(),
            ACC=acc, PRECISION=precision,
        )  # fmt: skip
        _grad_values_kernel[_grid(n, d_out, s)](
            scores, row_scale, grad_out, grad_values, rows, n, d_out, s, ACC=acc, PRECISION=precision
        )
        block = 32 if _INTERPRET else 64
        _grad_scores_kernel[(triton.cdiv(rows, block), triton.cdiv(n, block), s)](
            grad, scores, row_scale, dots, tau, rows, n, s, t,
            BM=block, BN=block, BT=triton.next_power_of_2(t), ACC=acc,
        )  # fmt: skip
    else:
        grad_values.zero_()
    return grad @ keys, grad.T @ x, grad_values
