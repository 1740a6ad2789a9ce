import pytest
import torch

from tokenformer import NORMS, SparsePattention
from tokenformer.pattention import normalise_scores


def layer(**overrides):
    args = dict(in_features=8, out_features=6, sub_keys=4, top_k=3, heads=2, dtype=torch.float64)
    return SparsePattention(**{**args, **overrides})


def grads(module, x):
    for p in (*module.parameters(), x):
        p.grad = None
    out = module(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), [p.grad.clone() for p in module.parameters()], x.grad.clone()


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("query_norm", ["none", "layer", "batch"])
def test_every_token_selected_equals_the_dense_pattention(norm, query_norm):
    sparse = layer(top_k=16, norm=norm, query_norm=query_norm).eval()
    with torch.no_grad():
        sparse.value_param_tokens.normal_()
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    out, param_grads, input_grad = grads(sparse, x)
    dense_out, dense_param_grads, dense_input_grad = grads(sparse.to_dense(), x)
    torch.testing.assert_close(out, dense_out)
    torch.testing.assert_close(input_grad, dense_input_grad)
    for grad, dense_grad in zip(param_grads, dense_param_grads, strict=True):
        torch.testing.assert_close(grad, dense_grad)


def test_dense_reference_keys_are_the_sub_key_pairs():
    sparse = layer()
    keys = sparse.to_dense().keys()
    sub = sparse.sub_key_tokens
    assert keys.shape == (2, 16, 8)
    torch.testing.assert_close(keys[1, 2 * 4 + 3], torch.cat((sub[1, 0, 2], sub[1, 1, 3])), rtol=0, atol=0)


def test_selection_is_the_top_k_of_all_product_scores():
    sparse = layer(top_k=5)
    x = torch.randn(7, 8, dtype=torch.float64)
    scores, tokens = sparse.select(x)
    every = torch.einsum("nd,htd->nht", x, sparse.to_dense().keys())  # [N, heads, 16]
    best = every.topk(5, dim=-1)
    torch.testing.assert_close(scores, best.values)
    offsets = torch.arange(2).view(1, 2, 1) * 16
    assert torch.equal(tokens.sort(-1).values, (best.indices + offsets).sort(-1).values)


def test_output_normalises_the_selected_scores_with_tau_sqrt_k():
    sparse = layer(top_k=5, heads=1)
    assert float(sparse.tau) == pytest.approx(5**0.5)
    x = torch.randn(4, 8, dtype=torch.float64)
    scores, tokens = sparse.select(x)
    weights = normalise_scores(scores, "l2_norm_gelu", torch.tensor(5**0.5, dtype=torch.float64))
    expected = (weights.unsqueeze(-1) * sparse.value_param_tokens[tokens]).sum((1, 2))
    torch.testing.assert_close(sparse(x), expected)


def test_value_gradient_reaches_the_selected_rows_only():
    sparse = layer(top_k=2, heads=1)
    x = torch.randn(1, 8, dtype=torch.float64)
    sparse(x).sum().backward()
    _, tokens = sparse.select(x)
    touched = sparse.value_param_tokens.grad.abs().sum(-1) != 0
    assert touched.nonzero().flatten().tolist() == sorted(tokens.flatten().tolist())
    assert sparse.sub_key_tokens.grad.abs().sum() > 0


def test_float32_and_shapes():
    sparse = SparsePattention(8, 6, sub_keys=4, top_k=3)
    assert sparse(torch.randn(2, 3, 8)).shape == (2, 3, 6)
    assert sparse.num_tokens == 16 and sparse.candidates == 3
    assert sparse.value_param_tokens.shape == (16, 6) and sparse.sub_key_tokens.shape == (1, 2, 4, 4)


def test_state_dict_round_trip():
    sparse = layer(query_norm="batch")
    sparse(torch.randn(4, 8, dtype=torch.float64))  # moves the running statistics
    copy = layer(query_norm="batch")
    copy.load_state_dict(sparse.state_dict())
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(copy.eval()(x), sparse.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(in_features=7), "in_features must be even .* got 7"),
        (dict(in_features=0), "in_features must be a positive integer, got 0"),
        (dict(sub_keys=0), "sub_keys must be a positive integer, got 0"),
        (dict(top_k=17), r"top_k must be an integer from 1 to sub_keys\*\*2 = 16, got 17"),
        (dict(top_k=0), r"top_k must be an integer from 1 to sub_keys\*\*2 = 16, got 0"),
        (dict(heads=0), "heads must be a positive integer, got 0"),
        (dict(query_norm="rms"), "unknown SparsePattention query_norm 'rms'; allowed: none, layer, batch"),
        (dict(norm="relu"), "unknown Pattention norm 'relu'; allowed"),
        (dict(tau=-1.0), "tau must be a finite number > 0 or None"),
    ],
)
def test_bad_arguments_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        layer(**overrides)


def test_bad_input_width_is_refused():
    with pytest.raises(ValueError, match=r"expects inputs \[..., in_features=8\], got \(2, 6\)"):
        layer()(torch.randn(2, 6, dtype=torch.float64))
