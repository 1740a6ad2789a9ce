import math

import pytest
import torch
import torch.nn.functional as F

from tokenformer import NORMS, Pattention
from tokenformer.pattention import _use_triton, pattention, pattention_group, reuse_tokens, run_pattentions


def reference(x, keys, values, norm, tau):
    """The facts-file formulas, written out in float64."""
    x, keys, values = x.double(), keys.double(), values.double()
    a = x @ keys.T
    gelu = lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))  # noqa: E731
    if norm == "l2_norm_gelu":
        s = gelu(a / a.norm(dim=-1, keepdim=True) * tau)
    elif norm == "gelu_l2_norm":
        g = gelu(a)
        s = g / g.norm(dim=-1, keepdim=True) * tau
    else:
        e = torch.exp(a - a.max(dim=-1, keepdim=True).values)
        s = e / e.sum(dim=-1, keepdim=True) * tau**2
    return s @ values


@pytest.mark.parametrize("norm", NORMS)
def test_matches_formula_in_float64(norm):
    layer = Pattention(12, 7, 30, norm).double()
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    out = layer(x)
    assert out.shape == (3, 5, 7)
    assert layer.tau.item() == pytest.approx(math.sqrt(30), rel=1e-7)
    expected = reference(x, layer.key_param_tokens, layer.value_param_tokens, norm, layer.tau)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck_float64(norm, impl):
    layer = Pattention(6, 5, 9, norm, impl=impl).double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    fn = lambda inp, k, v: torch.func.functional_call(layer, {"key_param_tokens": k, "value_param_tokens": v}, (inp,))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, layer.key_param_tokens, layer.value_param_tokens))


def test_softmax_stable_for_huge_scores():
    layer = Pattention(4, 3, 8, "softmax")
    with torch.no_grad():
        layer.key_param_tokens.fill_(0).add_(torch.eye(8, 4) * 1e4)
    x = torch.ones(2, 4) * 1.0
    out = layer(x)
    assert torch.isfinite(out).all()
    # All mass lands on the 4 keys with score 1e4, each weighted n/4.
    expected = layer.value_param_tokens[:4].sum(0) * 8 / 4
    torch.testing.assert_close(out[0], expected.detach())


def test_drop_in_for_linear_on_any_leading_shape():
    layer = Pattention(16, 8, 32)
    for shape in [(16,), (2, 16), (2, 3, 4, 16)]:
        assert layer(torch.randn(shape)).shape == shape[:-1] + (8,)
    assert not any(name.endswith("bias") for name, _ in layer.named_parameters())
    assert sorted(n for n, _ in layer.named_parameters()) == ["key_param_tokens", "value_param_tokens"]


def test_zero_input_gives_zero_output_not_nan():
    for norm in NORMS:
        out = Pattention(8, 4, 16, norm)(torch.zeros(3, 8))
        assert torch.isfinite(out).all()


def test_tau_fixed_at_creation_and_saved():
    layer = Pattention(8, 8, 64)
    assert layer.tau.item() == pytest.approx(8.0)
    state = layer.state_dict()
    assert "tau" in state
    other = Pattention(8, 8, 64)
    state["tau"] = torch.tensor(5.0)
    other.load_state_dict(state)
    assert other.tau.item() == 5.0
    torch.testing.assert_close(
        other(torch.ones(2, 8)),
        reference(torch.ones(2, 8), other.key_param_tokens, other.value_param_tokens, "l2_norm_gelu", 5.0).float(),
    )


def test_released_initialisation():
    layer = Pattention(256, 256, 4096, key_std=0.02, value_std=0.005)
    assert layer.key_param_tokens.std().item() == pytest.approx(0.02, rel=0.02)
    assert layer.value_param_tokens.std().item() == pytest.approx(0.005, rel=0.02)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown Pattention norm 'relu'.*l2_norm_gelu"):
        Pattention(4, 4, 4, "relu")
    with pytest.raises(ValueError, match="num_tokens must be a positive integer, got 0"):
        Pattention(4, 4, 0)


def test_bf16_autocast_close_to_fp32():
    layer = Pattention(64, 32, 128)
    x = torch.randn(8, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), layer(x), rtol=0.05, atol=0.02)


def test_backward_reaches_keys_and_values():
    layer = Pattention(8, 8, 16)
    layer(torch.randn(4, 8)).sum().backward()
    assert layer.key_param_tokens.grad.abs().sum() > 0 and layer.value_param_tokens.grad.abs().sum() > 0


def _outputs_and_grads(group, dtype, x, keys, values, weights):
    """Outputs of ``group(x, keys, values)`` (lists of per-layer tokens) and the gradients of a
    weighted sum of them."""
    count = len(keys)
    leaves = [t.to(dtype).requires_grad_() for t in (x, *keys, *values)]
    outs = group(leaves[0], leaves[1 : 1 + count], leaves[1 + count :])
    loss = sum((o * w.to(o.dtype)).sum() for o, w in zip(outs, weights, strict=True))
    return [*outs, *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("norm", NORMS)
def test_every_impl_equals_the_formula(norm, count):
    # Against the formula in float64, for one layer and for a group of three: in float32 both
    # implementations at float32 rounding level (relative to the largest entry) for the outputs
    # and every gradient; in bfloat16 the fused one about as close as the plain one.
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 33, 48, generator=gen, dtype=torch.float64)
    keys = [torch.randn(96, 48, generator=gen, dtype=torch.float64) * 0.5 for _ in range(count)]
    values = [torch.randn(96, 40, generator=gen, dtype=torch.float64) for _ in range(count)]
    weights = [torch.randn(2, 33, 40, generator=gen, dtype=torch.float64) for _ in range(count)]
    taus = [torch.tensor(96**0.5 * (1 + 0.25 * i)) for i in range(count)]
    exact = _outputs_and_grads(
        lambda x, ks, vs: [reference(x, k, v, norm, t) for k, v, t in zip(ks, vs, taus, strict=True)],
        torch.float64, x, keys, values, weights,
    )  # fmt: skip
    errors = {}
    for impl in ("reference", "fused"):
        for dtype in (torch.float32, torch.bfloat16):
            got = _outputs_and_grads(
                lambda x, ks, vs, impl=impl: pattention_group(x, ks, vs, taus, norm, impl),
                dtype,
                x,
                keys,
                values,
                weights,
            )
            errors[impl, dtype] = max(
                ((a.double() - e).abs().max() / e.abs().max()).item() for a, e in zip(got, exact, strict=True)
            )
    assert errors["reference", torch.float32] < 4e-6 and errors["fused", torch.float32] < 4e-6, errors
    assert errors["fused", torch.bfloat16] < 1.5 * errors["reference", torch.bfloat16] + 1e-3, errors


def _saved_storages(fn) -> list[torch.Size]:
    """Shapes of the distinct storages autograd keeps for backward during ``fn()``."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.shape
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return list(seen.values())


@pytest.mark.parametrize("norm", NORMS)
def test_fused_keeps_one_score_matrix_besides_its_output(norm):
    tokens, d, n = 64, 16, 48
    x = torch.randn(tokens, d, requires_grad=True)
    keys, values = torch.randn(n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)
    tau = torch.tensor(n**0.5)
    score_sized = {
        impl: [
            s
            for s in _saved_storages(lambda impl=impl: pattention(x, keys, values, tau, norm, impl))
            if s.numel() == tokens * n
        ]
        for impl in ("reference", "fused")
    }
    assert len(score_sized["fused"]) <= 2  # the output, kept by the value product, plus at most one
    assert len(score_sized["fused"]) < len(score_sized["reference"])
    # An MLP of the same 2dn weights keeps its hidden layer before and after the GeLU.
    mlp = _saved_storages(lambda: F.linear(F.gelu(F.linear(x, keys)), values.T))
    assert len(score_sized["fused"]) <= len([s for s in mlp if s.numel() == tokens * n])


@pytest.mark.parametrize("norm", NORMS)
def test_fused_under_bf16_autocast(norm):
    layer = Pattention(64, 32, 128, norm)
    x = torch.randn(8, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = layer(x)
        layer.impl = "reference"
        reference = layer(x)
    assert fused.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), reference.float(), rtol=0.02, atol=0.02)
    fused.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.key_param_tokens.grad.dtype == torch.float32
    assert torch.isfinite(layer.key_param_tokens.grad).all() and layer.key_param_tokens.grad.abs().sum() > 0


def test_inference_path_equals_training_path():
    layer = Pattention(16, 8, 40)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        inference = layer(x)
    torch.testing.assert_close(layer(x), inference, rtol=0, atol=0)


def test_non_contiguous_input():
    layer = Pattention(16, 8, 40)
    x = torch.randn(16, 6).T  # [6, 16], transposed
    layer.impl = "reference"
    expected = layer(x)
    layer.impl = "fused"
    torch.testing.assert_close(layer(x), expected)


def test_trainable_tau_gets_a_gradient():
    layer = Pattention(8, 8, 16)
    layer.tau = torch.nn.Parameter(layer.tau.clone())
    layer(torch.randn(3, 8)).sum().backward()
    assert layer.tau.grad is not None and layer.tau.grad.abs() > 0


def test_auto_picks_triton_only_for_cuda_tensors():
    assert not _use_triton("auto", torch.zeros(2, 4), "l2_norm_gelu")
    assert not _use_triton("fused", torch.zeros(2, 4), "l2_norm_gelu")


def test_bad_impl_is_named(monkeypatch):
    with pytest.raises(ValueError, match="unknown Pattention impl 'cuda'; allowed: auto, reference, fused, triton"):
        Pattention(4, 4, 4, impl="cuda")
    with pytest.raises(ValueError, match="unknown Pattention impl 'fast'"):
        pattention(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(3, 4), torch.tensor(1.0), impl="fast")
    with pytest.raises(ValueError, match="implements norm='l2_norm_gelu' only, got norm='softmax'"):
        Pattention(4, 4, 4, "softmax", impl="triton")(torch.zeros(2, 4))
    monkeypatch.setattr("tokenformer.pattention.triton_available", lambda: False)
    with pytest.raises(ValueError, match=r"needs the triton package \(pip install 'tokenformer\[triton\]'\)"):
        Pattention(4, 4, 4, impl="triton")(torch.zeros(2, 4))


def _group_leaves(norm, count, dtype=torch.float64, rows=(2, 9), d_in=10, n=14, d_out=6):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*rows, d_in, generator=gen, dtype=dtype, requires_grad=True)
    keys = [(torch.randn(n, d_in, generator=gen, dtype=dtype) * 0.7).requires_grad_() for _ in range(count)]
    values = [torch.randn(n, d_out, generator=gen, dtype=dtype, requires_grad=True) for _ in range(count)]
    # Distinct taus: each member of a group keeps its own.
    taus = [torch.tensor(n**0.5 * (1 + 0.25 * i), dtype=dtype) for i in range(count)]
    return x, keys, values, taus


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("norm", NORMS)
def test_group_equals_its_layers_one_by_one(norm, impl):
    # The attention's query, key and value run as one group: same outputs and gradients as
    # three separate Pattentions, each with its own tau.
    x, keys, values, taus = _group_leaves(norm, 3)
    leaves = [x, *keys, *values]
    grouped = pattention_group(x, keys, values, taus, norm, impl)
    alone = [reference(x, k, v, norm, t) for k, v, t in zip(keys, values, taus, strict=True)]
    weights = [torch.randn_like(out) for out in alone]
    got = torch.autograd.grad(sum((o * w).sum() for o, w in zip(grouped, weights, strict=True)), leaves)
    expected = torch.autograd.grad(sum((o * w).sum() for o, w in zip(alone, weights, strict=True)), leaves)
    for a, e in zip([*grouped, *got], [*alone, *expected], strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_group_of_unequal_layers_runs_them_one_by_one():
    x, keys, values, taus = _group_leaves("l2_norm_gelu", 2)
    keys[1] = torch.randn(20, keys[0].shape[1], dtype=torch.float64)
    values[1] = torch.randn(20, 3, dtype=torch.float64)
    outs = pattention_group(x, keys, values, taus, impl="fused")
    assert [o.shape for o in outs] == [(2, 9, 6), (2, 9, 3)]
    torch.testing.assert_close(outs[1], reference(x, keys[1], values[1], "l2_norm_gelu", taus[1]))
    with pytest.raises(ValueError, match="needs as many values and taus as keys .* got 2 keys, 2 values, 1 taus"):
        pattention_group(x, keys, values, taus[:1])


@pytest.mark.parametrize("count", [1, 2])
@pytest.mark.parametrize("norm", NORMS)
def test_fused_second_derivatives_equal_the_formula(norm, count):
    # Gradients of gradients (gradient penalties, Hessian-vector products) run through the
    # formula, never through the operator's saved intermediates.
    x, keys, values, taus = _group_leaves(norm, count, rows=(3,), d_in=3, n=5, d_out=2)

    def fn(x, *params):
        outs = pattention_group(x, params[:count], params[count:], taus, norm, "fused")
        return torch.cat([o.flatten() for o in outs])

    assert torch.autograd.gradgradcheck(fn, (x, *keys, *values))


@pytest.mark.parametrize("norm", NORMS)
def test_gradient_penalty_key_gradient_equals_the_formula(norm):
    x, (keys,), (values,), (tau,) = _group_leaves(norm, 1)
    results = {}
    for impl in ("reference", "fused"):
        out = pattention(x, keys, values, tau, norm, impl)
        (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        results[impl] = torch.autograd.grad(out.sum() + grad_x.square().sum(), (keys, values))
    for got, expected in zip(results["fused"], results["reference"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm", NORMS)
def test_torch_func_transforms_match_the_reference(norm):
    x, (keys,), (values,), (tau,) = _group_leaves(norm, 1, rows=(3, 4))
    x, keys, values = x.detach(), keys.detach(), values.detach()

    def loss(impl):
        return lambda x, k, v: pattention(x, k, v, tau, norm, impl).square().sum()

    def same(transform):
        torch.testing.assert_close(transform("fused"), transform("reference"), rtol=1e-10, atol=1e-12)

    for argnums in (0, 1, 2):
        same(lambda impl, a=argnums: torch.func.grad(loss(impl), argnums=a)(x, keys, values))
    same(lambda impl: torch.func.vmap(lambda x: pattention(x, keys, values, tau, norm, impl))(x))
    batched_keys = torch.stack((keys, keys * 2, -keys))
    same(lambda impl: torch.func.vmap(lambda k: pattention(x, k, values, tau, norm, impl))(batched_keys))
    # Per-sample gradients of the keys.
    same(lambda impl: torch.func.vmap(torch.func.grad(loss(impl), argnums=1), in_dims=(0, None, None))(x, keys, values))
    same(lambda impl: torch.func.jacrev(lambda k: pattention(x[0], k, values, tau, norm, impl))(keys))
    same(lambda impl: torch.func.hessian(lambda x: loss(impl)(x, keys, values))(x[0, :2]))


def test_no_grad_outputs_follow_a_fused_optimizer_step():
    # The fused AdamW updates weights in place without bumping their version counters: outside
    # reuse_tokens nothing built from the weights may outlive a call (validation between steps).
    layers = [Pattention(8, 8, 12) for _ in range(3)]
    optimizer = torch.optim.AdamW([p for layer in layers for p in layer.parameters()], lr=0.1, fused=True)
    x = torch.randn(2, 8)
    with torch.no_grad():
        before = run_pattentions(layers, x)
    sum(out.square().sum() for out in run_pattentions(layers, x)).backward()
    optimizer.step()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        after_bf16 = run_pattentions(layers, x)
    with torch.no_grad():
        after = run_pattentions(layers, x)
    for b, a, low, m in zip(before, after, after_bf16, layers, strict=True):
        expected = reference(x, m.key_param_tokens, m.value_param_tokens, "l2_norm_gelu", m.tau).float()
        torch.testing.assert_close(a, expected)
        torch.testing.assert_close(low.float(), expected, rtol=0.05, atol=0.05)
        assert not torch.allclose(a, b)


def test_reuse_tokens_keeps_a_groups_tokens_within_the_block_only():
    layers = [Pattention(8, 8, 12) for _ in range(3)]
    x = torch.randn(2, 8)
    with torch.no_grad(), reuse_tokens():
        first = run_pattentions(layers, x)
        layers[0].value_param_tokens.mul_(2)  # in place: not seen inside the block
        torch.testing.assert_close(run_pattentions(layers, x)[0], first[0], rtol=0, atol=0)
        for layer in layers:  # growth replaces the tensors: seen
            layer.key_param_tokens.data = torch.cat((layer.key_param_tokens.data, torch.zeros(4, 8)))
            layer.value_param_tokens.data = torch.cat((layer.value_param_tokens.data, torch.randn(4, 8)))
        grown = run_pattentions(layers, x)
    with torch.no_grad():
        # Equal up to rounding: on the CPU the kept keys are stored transposed (decoding_layout).
        torch.testing.assert_close(grown, run_pattentions(layers, x))
        torch.testing.assert_close(grown[0], first[0] * 2)
