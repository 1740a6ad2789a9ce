import math

import pytest
import torch
from conftest import tiny_config
from reference import our_weights, reference_logits

from tokenformer import TokenformerConfig, TokenformerLM, count_parameters
from tokenformer.model import apply_rotary, rotary_cos_sin
from tokenformer.vision import explicit_attention


def test_logits_match_plain_float64_reference():
    model = TokenformerLM(tiny_config()).double()
    ids = torch.randint(0, 97, (2, 11))
    logits = model(ids)
    assert logits.shape == (2, 11, 97)
    cfg = model.config
    expected = reference_logits(
        our_weights(model.state_dict(), cfg.n_layers),
        ids,
        cfg.n_heads,
        cfg.rotary_pct,
        cfg.rope_base,
        cfg.layernorm_eps,
    )
    assert ((logits - expected).abs().max() / expected.abs().max()).item() < 1e-10


def test_rotary_scores_depend_on_relative_position_only():
    cfg = tiny_config()
    q, k = torch.randn(1, 1, 1, cfg.head_dim), torch.randn(1, 1, 1, cfg.head_dim)

    def score(m, n):
        cm, sm = rotary_cos_sin(cfg, torch.tensor([m]))
        cn, sn = rotary_cos_sin(cfg, torch.tensor([n]))
        return (apply_rotary(q, cm, sm) * apply_rotary(k, cn, sn)).sum().item()

    assert score(7, 3) == pytest.approx(score(27, 23), rel=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)


def test_rotary_gradient_is_the_inverse_rotation():
    cfg = tiny_config(rotary_pct=0.5)
    cos, sin = rotary_cos_sin(cfg, torch.arange(5), torch.float64)
    # [B, H, T, head_dim] as a view of [B, T, H, head_dim], the layout the model passes in.
    x = torch.randn(2, 5, cfg.n_heads, cfg.head_dim, dtype=torch.float64).transpose(1, 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: apply_rotary(t, cos, sin), (x,))
    assert apply_rotary(x, cos, sin).stride() == x.stride()


def test_logits_depend_on_order_of_earlier_tokens():
    # A batch-first port that slices the release's rotary cache by batch applies position 0's
    # rotation (the identity) everywhere: a one-layer model then cannot tell the order of the
    # earlier tokens. Ours must, and must not without rotary. (The release's value init: with the
    # default's small values, the attention's share of the logits starts below the threshold.)
    ids = torch.tensor([[3, 9, 4, 7]])
    swapped = torch.tensor([[9, 3, 4, 7]])
    for rotary_pct, differs in ((0.25, True), (0.0, False)):
        model = TokenformerLM(tiny_config(n_layers=1, rotary_pct=rotary_pct, value_scale=1.0))
        gap = (model(ids)[0, -1] - model(swapped)[0, -1]).abs().max().item()
        assert (gap > 1e-4) if differs else (gap < 1e-6), (rotary_pct, gap)


@pytest.mark.parametrize("mask", [None, "no_self", "causal"])
def test_explicit_attention_equals_sdpa(mask):
    q, k, v = (torch.randn(3, 2, 7, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    allowed = {
        None: None,
        "no_self": ~torch.eye(7, dtype=torch.bool),
        "causal": torch.ones(7, 7, dtype=torch.bool).tril(),
    }[mask]
    ours = explicit_attention(q, k, v, allowed)
    theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(ours.sum(), (q, k, v))
    for ours_grad, theirs_grad in zip(grads, torch.autograd.grad(theirs.sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-10, atol=1e-12)


def test_explicit_attention_in_bf16_keeps_the_dtype_and_matches_float32():
    q, k, v = (torch.randn(2, 2, 16, 8) for _ in range(3))
    allowed = ~torch.eye(16, dtype=torch.bool)
    low = explicit_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), allowed)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), explicit_attention(q, k, v, allowed), rtol=0.05, atol=0.05)


def test_causal():
    model = TokenformerLM(tiny_config())
    ids = torch.randint(0, 97, (1, 10))
    changed = ids.clone()
    changed[0, 7] = (ids[0, 7] + 1) % 97
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-6


def test_loss_with_targets():
    model = TokenformerLM(tiny_config())
    ids = torch.randint(0, 97, (2, 8))
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = -100
    logits, loss = model(ids, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    # Fresh init: the loss is close to log(vocab).
    assert abs(loss.item() - math.log(97)) < 0.5


def test_chunked_prefill_with_cache_matches_full_forward():
    from tokenformer.model import KVCache

    model = TokenformerLM(tiny_config())
    ids = torch.randint(0, 97, (2, 12))
    full = model(ids)
    cache = KVCache(model.config.n_layers, 12)
    parts = [model(ids[:, :5], cache=cache), model(ids[:, 5:9], cache=cache), model(ids[:, 9:], cache=cache)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def step_by_step_greedy(model, ids, n):
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize("projection", ["pattention", "linear"])
def test_cached_greedy_generation_equals_full_forward(projection):
    model = TokenformerLM(tiny_config(projection=projection)).eval()
    prompt = torch.randint(0, 97, (3, 4))
    out = model.generate(prompt, 20, temperature=0)
    assert out.shape == (3, 24)
    assert torch.equal(out, step_by_step_greedy(model, prompt, 20))


def test_a_cache_that_grows_in_small_chunks_generates_the_same(monkeypatch):
    from tokenformer.model import KVCache

    monkeypatch.setattr(KVCache, "CHUNK", 2)  # grown seven times on the way to 24 tokens
    model = TokenformerLM(tiny_config()).eval()
    prompt = torch.randint(0, 97, (3, 4))
    assert torch.equal(model.generate(prompt, 20, temperature=0), step_by_step_greedy(model, prompt, 20))


def test_sampling_options():
    model = TokenformerLM(tiny_config()).eval()
    prompt = torch.randint(0, 97, (2, 3))
    greedy = model.generate(prompt, 8, temperature=0)
    assert torch.equal(model.generate(prompt, 8, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 8, top_p=1e-6), greedy)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(
        model.generate(prompt, 8, temperature=1.5, generator=g1),
        model.generate(prompt, 8, temperature=1.5, generator=g2),
    )
    sampled = torch.stack([model.generate(prompt, 8, temperature=5.0, top_k=40) for _ in range(4)])
    assert sampled.unique().numel() > greedy.unique().numel()


def test_eos_pads_finished_rows():
    model = TokenformerLM(tiny_config()).eval()
    prompt = torch.randint(0, 97, (1, 3))
    first = model.generate(prompt, 1, temperature=0)[0, -1].item()
    out = model.generate(prompt, 10, temperature=0, eos_token_id=first)
    assert out.shape == (1, 4) and out[0, -1].item() == first


def test_linear_baseline_shares_code_path():
    cfg = tiny_config(projection="linear")
    model = TokenformerLM(cfg)
    assert not any("param_tokens" in n for n, _ in model.named_parameters())
    assert model.layers[0].mlp.fc1.weight.shape == (cfg.ffn_tokens, cfg.d_model)
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model(torch.randint(0, 97, (1, 5))).shape == (1, 5, 97)


def test_parameter_matched_linear():
    cfg = TokenformerConfig.from_preset("cpu-1M")
    matched = cfg.parameter_matched_linear()
    assert matched.projection == "linear" and matched.ffn_tokens == 6 * cfg.d_model
    assert count_parameters(matched) == count_parameters(cfg)


@pytest.mark.parametrize(
    ("preset", "overrides", "shape"),
    [
        ("cpu-0.3M", dict(n_layers=3, qkv_tokens=128, proj_tokens=128, ffn_tokens=512), (104, 4)),
        ("cpu-1M", dict(n_layers=3, qkv_tokens=256, proj_tokens=256, ffn_tokens=1024), (208, 8)),
        ("150M", {}, (888, 12)),  # 16 d^2 a block: d_model about sqrt(4/3) x 768
    ],
)
def test_standard_linear_has_the_usual_shape_and_the_parameters(preset, overrides, shape):
    cfg = TokenformerConfig.from_preset(preset, **overrides)
    standard = cfg.standard_linear()
    assert standard.projection == "linear" and standard.ffn_tokens == 4 * standard.d_model
    assert (standard.d_model, standard.n_heads) == shape
    assert standard.d_model % 8 == 0 and standard.rotary_dims % 2 == 0
    ratio = count_parameters(standard, non_embedding=True) / count_parameters(cfg, non_embedding=True)
    assert 0.95 <= ratio <= 1.05
    with torch.device("meta"):
        built = TokenformerLM(standard)
    assert sum(p.numel() for p in built.parameters()) == count_parameters(standard)


def test_standard_linear_errors():
    with pytest.raises(ValueError, match="no standard-shape Transformer within 0% of the parameters of d_model=32"):
        tiny_config(qkv_tokens=25).standard_linear(tolerance=0.0)
    with pytest.raises(ValueError, match="standard_linear needs uniform token counts"):
        tiny_config(layer_tokens=[{"qkv": 24, "proj": 20, "ffn": 40}] * 2).standard_linear()


RELEASED = {"150M": 151.88e6, "450M": 454.17e6, "900M": 903.25e6, "1.5B": 1.587e9}


@pytest.mark.parametrize("name", RELEASED)
def test_released_preset_parameter_counts(name):
    cfg = TokenformerConfig.from_preset(name)
    with torch.device("meta"):
        model = TokenformerLM(cfg)
    built = sum(p.numel() for p in model.parameters())
    assert built == count_parameters(cfg)
    digits = 3 if name == "1.5B" else 2
    scale = 1e9 if name == "1.5B" else 1e6
    assert round(built / scale, digits) == round(RELEASED[name] / scale, digits)


@pytest.mark.parametrize("name,target", [("cpu-0.3M", 0.3e6), ("cpu-1M", 1e6), ("cpu-5M", 5e6)])
def test_cpu_presets_sizes(name, target):
    n = count_parameters(TokenformerConfig.from_preset(name), non_embedding=True)
    assert 0.8 * target <= n <= 1.25 * target


def test_config_errors_name_value_and_allowed():
    with pytest.raises(ValueError, match="config field n_heads=5 is invalid; allowed: a divisor of d_model=32"):
        tiny_config(n_heads=5)
    with pytest.raises(ValueError, match="rotary dims must be even.*gives 3"):
        tiny_config(rotary_pct=3 / 8)
    with pytest.raises(ValueError, match="config field norm='relu' is invalid; allowed: l2_norm_gelu"):
        tiny_config(norm="relu")
    with pytest.raises(ValueError, match="config field projection='mlp' is invalid; allowed: pattention, linear"):
        tiny_config(projection="mlp")
    with pytest.raises(ValueError, match="unknown preset 'gpt5'; allowed: 150M"):
        TokenformerConfig.from_preset("gpt5")
    with pytest.raises(ValueError, match="config field d_model=0 is invalid; allowed: a positive integer"):
        tiny_config(d_model=0)


def test_input_errors():
    model = TokenformerLM(tiny_config())
    with pytest.raises(ValueError, match="token id 97 out of range; allowed: 0 <= id < vocab_size=97"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="token id -1 out of range"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="sequence length 65 exceeds max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="top_p must lie in"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 2, top_p=1.5)


def test_config_round_trip(tmp_path):
    cfg = tiny_config(norm="gelu_l2_norm")
    cfg.save(tmp_path / "config.json")
    assert TokenformerConfig.load(tmp_path / "config.json") == cfg
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['colour'\]"):
        TokenformerConfig.from_dict({**cfg.to_dict(), "colour": 1})


def test_param_groups_no_decay_on_norms():
    model = TokenformerLM(tiny_config())
    decay, no_decay = model.param_groups(0.1)
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert ids(no_decay) == {id(model.final_norm.weight), id(model.final_norm.bias)}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert id(model.word_embeddings.weight) in ids(decay)
    assert len(ids(decay)) + len(ids(no_decay)) == len(list(model.parameters()))
