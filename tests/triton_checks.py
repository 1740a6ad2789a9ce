"""Checks of the Triton kernels against the Pattention formula in float64, importable without
pytest so that a GPU machine without it can run them: ``python tests/triton_checks.py cuda``.
``test_triton_kernels.py`` runs them under pytest, on the CPU through Triton's interpreter
(``TRITON_INTERPRET=1``, set before triton is imported)."""

from __future__ import annotations

import math
import sys

import torch

from tokenformer import Pattention, TokenformerConfig, TokenformerLM
from tokenformer.pattention import _use_triton, pattention, pattention_group


def formula(x, keys, values, tau):
    """``GeLU(A / ||A|| * tau) @ V`` written out in float64 (exact GeLU)."""
    x, keys, values = x.double(), keys.double(), values.double()
    a = x @ keys.T
    z = a / a.norm(dim=-1, keepdim=True) * tau
    return 0.5 * z * (1 + torch.erf(z / math.sqrt(2))) @ values


def _outputs_and_grads(group, dtype, x, keys, values, weights) -> list[torch.Tensor]:
    """Outputs of ``group(x, keys, values)`` and the gradients of a weighted sum of them."""
    count = len(keys)
    leaves = [t.to(dtype).requires_grad_() for t in (x, *keys, *values)]
    outs = group(leaves[0], leaves[1 : 1 + count], leaves[1 + count :])
    loss = sum((o * w.to(o.dtype)).sum() for o, w in zip(outs, weights, strict=True))
    return [*outs, *torch.autograd.grad(loss, leaves)]


def _relative_errors(impl, dtype, x, keys, values, taus, weights) -> list[float]:
    """Max |error| / max |exact| of the outputs and of every gradient, against the formula."""
    exact = _outputs_and_grads(
        lambda x, ks, vs: [formula(x, k, v, t) for k, v, t in zip(ks, vs, taus, strict=True)],
        torch.float64, x, keys, values, weights,
    )  # fmt: skip
    got = _outputs_and_grads(
        lambda x, ks, vs: pattention_group(x, ks, vs, taus, impl=impl), dtype, x, keys, values, weights
    )
    return [((g.double() - e).abs().max() / e.abs().max()).item() for g, e in zip(got, exact, strict=True)]


def check_kernels(device: str) -> None:
    """Outputs and gradients of impl='triton' equal the formula in float32 and float64 to rounding,
    and in bfloat16 about as closely as the plain formula does, for one Pattention and for a
    group of three, with rows of scores longer than one tile and more input rows than one tile;
    float64 gradcheck passes; compiled equals eager."""
    gen = torch.Generator().manual_seed(0)
    for count, rows, d_in, n, d_out in ((1, 5, 12, 30, 7), (3, 37, 40, 70, 24)):
        x = torch.randn(rows, d_in, generator=gen).to(device)
        keys = [(torch.randn(n, d_in, generator=gen) * 0.5).to(device) for _ in range(count)]
        values = [torch.randn(n, d_out, generator=gen).to(device) for _ in range(count)]
        weights = [torch.randn(rows, d_out, generator=gen).to(device) for _ in range(count)]
        for dtype, bound in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
            taus = [torch.tensor(n**0.5 * (1 + 0.25 * i), dtype=dtype, device=device) for i in range(count)]
            errors = _relative_errors("triton", dtype, x, keys, values, taus, weights)
            assert max(errors) < bound, (count, rows, d_in, n, d_out, dtype, errors)
        taus = [torch.tensor(n**0.5 * (1 + 0.25 * i), device=device) for i in range(count)]
        plain = _relative_errors("reference", torch.bfloat16, x, keys, values, taus, weights)
        triton = _relative_errors("triton", torch.bfloat16, x, keys, values, taus, weights)
        # The interpreter rounds float32 to bfloat16 by truncation (GPUs round to nearest),
        # which doubles the rounding error of every stored matrix: hence the factor 3.
        assert max(triton) < 3 * max(plain) and max(triton) < 0.05, (count, plain, triton)
    x, keys, values = (
        torch.randn(*s, dtype=torch.float64, device=device, requires_grad=True) for s in ((3, 6), (9, 6), (9, 5))
    )
    tau = torch.tensor(3.0, dtype=torch.float64, device=device)
    # fast_mode checks random projections of the Jacobian: a few launches instead of hundreds.
    assert torch.autograd.gradcheck(lambda *t: pattention(*t, tau, impl="triton"), (x, keys, values), fast_mode=True)
    check_compiled_layer(device)


def check_compiled_layer(device: str) -> None:
    """The Triton operator under torch.compile (one opaque node) equals eager."""
    torch._dynamo.reset()
    layer = Pattention(16, 8, 40, impl="triton").to(device)
    x = torch.randn(3, 5, 16, device=device, requires_grad=True)
    params = (x, layer.key_param_tokens, layer.value_param_tokens)
    eager = layer(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), params)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    grads = torch.autograd.grad(compiled.square().sum(), params)
    torch.testing.assert_close(compiled, eager)
    for got, expected in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, expected)


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
    """Under torch.compile (inductor) with the Triton operator, results equal eager."""
    torch._dynamo.reset()
    config = TokenformerConfig(
        vocab_size=97, d_model=32, n_layers=2, n_heads=4, qkv_tokens=24, proj_tokens=20, ffn_tokens=40, max_seq_len=64
    )
    model = TokenformerLM(config).cuda()
    ids = torch.randint(0, 97, (2, 16), device="cuda")
    eager_logits, eager_loss = model(ids[:, :-1], ids[:, 1:])
    eager_loss.backward()
    eager_grad = model.layers[0].attention.query.key_param_tokens.grad.clone()
    model.zero_grad()
    logits, loss = torch.compile(model, fullgraph=True)(ids[:, :-1], ids[:, 1:])
    loss.backward()
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.layers[0].attention.query.key_param_tokens.grad, eager_grad, rtol=1e-3, atol=1e-5)


if __name__ == "__main__":
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    check_kernels(device)
    if device == "cuda":
        check_cuda_auto_choice_and_bf16()
        check_compiled_model_on_cuda()
    print(f"triton checks passed on {device}")
