"""The Triton kernels of the l2_norm_gelu step against the plain formula: on the CPU through
Triton's interpreter (in a subprocess: TRITON_INTERPRET is read when kernels are defined) and
on a CUDA GPU when there is one."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokenformer import Pattention, TokenformerLM
from tokenformer.pattention import _use_triton, pattention, triton_available

from conftest import tiny_config

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install 'tokenformer[triton]')")


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
        for got, expected in zip(results["triton"], results["reference"]):
            assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5
    x, keys, values = (torch.randn(*s, dtype=torch.float64, device=device, requires_grad=True) for s in ((3, 6), (9, 6), (9, 5)))
    tau = torch.tensor(3.0, dtype=torch.float64, device=device)
    # fast_mode checks random projections of the Jacobian: a few launches instead of hundreds.
    assert torch.autograd.gradcheck(lambda *t: pattention(*t, tau, impl="triton"), (x, keys, values), fast_mode=True)


@needs_triton
def test_kernels_under_interpreter():
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = f"import sys; sys.path.insert(0, {str(tests)!r}); import test_triton_kernels as t; t.check_kernels('cpu')"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_on_cuda():
    check_kernels("cuda")
    x = torch.zeros(2, 8, device="cuda")
    assert _use_triton("auto", x, "l2_norm_gelu")  # chosen without being asked for
    layer = Pattention(64, 32, 128).cuda()
    x = torch.randn(16, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        triton_out = layer(x)
        layer.impl = "reference"
        reference = layer(x)
    torch.testing.assert_close(triton_out.float(), reference.float(), rtol=0.02, atol=0.02)


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_model_on_cuda_matches_eager():
    model = TokenformerLM(tiny_config()).cuda()
    ids = torch.randint(0, 97, (2, 16), device="cuda")
    eager_logits, eager_loss = model(ids[:, :-1], ids[:, 1:])
    eager_loss.backward()
    eager_grad = model.layers[0].mlp.key_param_tokens.grad.clone()
    model.zero_grad()
    logits, loss = torch.compile(model, fullgraph=True)(ids[:, :-1], ids[:, 1:])
    loss.backward()
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.layers[0].mlp.key_param_tokens.grad, eager_grad, rtol=1e-3, atol=1e-5)
