"""Checks of the Triton kernels against the plain Pattention formula, importable without
pytest so that a GPU machine without it can run them: ``python tests/triton_checks.py cuda``.
``test_triton_kernels.py`` runs them under pytest."""

from __future__ import annotations

import sys

import torch

from tokenformer import Pattention, TokenformerConfig, TokenformerLM
from tokenformer.pattention import _use_triton, pattention


def check_kernels(device: str) -> None:
    """Output and gradients of impl='triton' equal the reference; float64 gradcheck passes."""
    gen = torch.Generator().manual_seed(0)
    # 30 tokens fit one block; 4500 take two chunks of MAX_BLOCK per row.
    for rows, d, n in ((5, 12, 30), (3, 8, 4500)):
        x = torch.randn(rows, d, generator=gen).to(device)
        keys = (torch.randn(n, d, generator=gen) * 0.5).to(device)
        values, weight = torch.randn(n, 7, generator=gen).to(device), torch.randn(rows, 7, generator=gen).to(device)
        tau = torch.tensor(n**0.5, device=device)
        results = {}
        for impl in ("reference", "triton"):
            leaves = [t.clone().requires_grad_() for t in (x, keys, values)]
            out = pattention(*leaves, tau, impl=impl)
            results[impl] = [out, *torch.autograd.grad((out * weight).sum(), leaves)]
        for got, expected in zip(results["triton"], results["reference"], strict=True):
            error = ((got - expected).abs().max() / expected.abs().max()).item()
            assert error < 1e-5, (rows, d, n, error)
    x, keys, values = (
        torch.randn(*s, dtype=torch.float64, device=device, requires_grad=True) for s in ((3, 6), (9, 6), (9, 5))
    )
    tau = torch.tensor(3.0, dtype=torch.float64, device=device)
    # fast_mode checks random projections of the Jacobian: a few launches instead of hundreds.
    assert torch.autograd.gradcheck(lambda *t: pattention(*t, tau, impl="triton"), (x, keys, values), fast_mode=True)


def check_cuda_auto_choice_and_bf16() -> None:
    assert _use_triton("auto", torch.zeros(2, 8, device="cuda"), "l2_norm_gelu")  # chosen without being asked for
    layer = Pattention(64, 32, 128).cuda()
    x = torch.randn(16, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        triton_out = layer(x)
        layer.impl = "reference"
        reference = layer(x)
    torch.testing.assert_close(triton_out.float(), reference.float(), rtol=0.02, atol=0.02)


def check_compiled_model_on_cuda() -> None:
    """Under torch.compile (inductor) the fused torch ops are traced; results equal eager."""
    config = TokenformerConfig(
        vocab_size=97, d_model=32, n_layers=2, n_heads=4, qkv_tokens=24, proj_tokens=20, ffn_tokens=40, max_seq_len=64
    )
    model = TokenformerLM(config).cuda()
    ids = torch.randint(0, 97, (2, 16), device="cuda")
    eager_logits, eager_loss = model(ids[:, :-1], ids[:, 1:])
    eager_loss.backward()
    eager_grad = model.layers[0].mlp.key_param_tokens.grad.clone()
    model.zero_grad()
    logits, loss = torch.compile(model, fullgraph=True)(ids[:, :-1], ids[:, 1:])
    loss.backward()
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.layers[0].mlp.key_param_tokens.grad, eager_grad, rtol=1e-3, atol=1e-5)


if __name__ == "__main__":
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    check_kernels(device)
    if device == "cuda":
        check_cuda_auto_choice_and_bf16()
        check_compiled_model_on_cuda()
    print(f"triton checks passed on {device}")
