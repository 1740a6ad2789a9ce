import copy

import pytest
import torch
from conftest import tiny_config

from tokenformer import (
    TokenformerConfig,
    TokenformerLM,
    TokenUpdateScale,
    carry_optimizer_state,
    count_parameters,
    grow,
    growth_summary,
    stack_layers,
)
from tokenformer.io import load_weights, save_weights


def trained(model, steps=3, lr=1e-2):
    """A few AdamW steps, so that growth is tested on weights that moved from their init."""
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=lr)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 16))
        _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("norm", ["l2_norm_gelu", "gelu_l2_norm"])
def test_growth_preserves_logits_on_1m_preset(norm):
    model = TokenformerLM(TokenformerConfig.from_preset("cpu-1M", norm=norm))
    trained(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 64))
    with torch.no_grad():
        before = model(ids)
        record = grow(model, qkv_tokens=192, proj_tokens=160, ffn_tokens=768)
        after = model(ids)
    assert record.function_preserving
    assert (after - before).abs().max().item() <= 1e-5
    assert model.config.qkv_tokens == 192 and model.config.ffn_tokens == 768
    assert sum(p.numel() for p in model.parameters()) == count_parameters(model.config)


def test_growth_keeps_old_tokens_and_tau():
    model = TokenformerLM(tiny_config())
    layer = model.layers[1].attention.key
    old_keys, old_values, old_tau = (
        layer.key_param_tokens.detach().clone(),
        layer.value_param_tokens.detach().clone(),
        layer.tau.item(),
    )
    grow(model, qkv_tokens=30)
    assert layer.num_tokens == 30 and layer.tau.item() == old_tau
    assert torch.equal(layer.key_param_tokens[:24], old_keys) and torch.equal(layer.value_param_tokens[:24], old_values)
    assert torch.count_nonzero(layer.key_param_tokens[24:]) == 0
    assert torch.count_nonzero(layer.value_param_tokens[24:]) == 6 * 32  # not a dead saddle
    assert model.layers[0].attention.proj.num_tokens == 20  # other kinds untouched


def test_new_tokens_receive_gradient():
    model = TokenformerLM(tiny_config())
    grow(model, ffn_tokens=48)
    ids = torch.randint(0, 97, (2, 12))
    model(ids[:, :-1], ids[:, 1:])[1].backward()
    mlp = model.layers[0].mlp
    assert mlp.key_param_tokens.grad[40:].abs().sum() > 0
    assert mlp.value_param_tokens.grad[40:].abs().sum() == 0  # zero scores: values learn once keys move


def test_softmax_growth_is_not_function_preserving():
    model = TokenformerLM(tiny_config(norm="softmax"))
    ids = torch.randint(0, 97, (1, 10))
    before = model(ids)
    with pytest.warns(UserWarning, match="softmax"):
        record = grow(model, qkv_tokens=40)
    assert not record.function_preserving
    assert (model(ids) - before).abs().max() > 1e-5


def test_random_key_init_changes_function():
    model = TokenformerLM(tiny_config())
    ids = torch.randint(0, 97, (1, 10))
    before = model(ids)
    record = grow(model, ffn_tokens=64, key_init="random")
    assert not record.function_preserving
    assert (model(ids) - before).abs().max() > 1e-4


def test_grown_model_survives_save_and_load(tmp_path):
    model = TokenformerLM(tiny_config())
    trained(model)
    grow(model, qkv_tokens=32, ffn_tokens=56, layers=[1])
    assert model.config.layer_tokens[0] == {"qkv": 24, "proj": 20, "ffn": 40}
    assert model.config.layer_tokens[1] == {"qkv": 32, "proj": 20, "ffn": 56}
    save_weights(model.state_dict(), tmp_path / "model.safetensors")
    model.config.save(tmp_path / "config.json")
    restored = TokenformerLM(TokenformerConfig.load(tmp_path / "config.json"))
    restored.load_state_dict(load_weights(tmp_path / "model.safetensors"))
    ids = torch.randint(0, 97, (2, 10))
    torch.testing.assert_close(restored(ids), model(ids), rtol=0, atol=0)
    # tau stays at sqrt of the count at creation, not of the count now.
    assert restored.layers[1].attention.query.tau.item() == pytest.approx(24**0.5)
    assert growth_summary(restored)[1]["attention.query"] == {"tokens": 32, "tau": pytest.approx(24**0.5)}


def test_linear_baseline_grows_mlp_net2net_style():
    model = TokenformerLM(tiny_config(projection="linear"))
    trained(model)
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        before = model(ids)
        record = grow(model, ffn_tokens=64)
        after = model(ids)
    assert record.function_preserving
    assert (after - before).abs().max().item() <= 1e-6
    assert model.layers[0].mlp.fc1.weight.shape == (64, 32) and model.layers[0].mlp.fc2.weight.shape == (32, 64)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(model.config)


def test_growth_errors():
    model = TokenformerLM(tiny_config())
    with pytest.raises(ValueError, match="cannot shrink: qkv_tokens=10 is below layer 0's current 24"):
        grow(model, qkv_tokens=10)
    with pytest.raises(ValueError, match=r"layers \[5\] out of range; allowed: 0..1"):
        grow(model, ffn_tokens=50, layers=[5])
    with pytest.raises(ValueError, match="unknown key_init 'ones'"):
        grow(model, ffn_tokens=50, key_init="ones")
    with pytest.raises(ValueError, match="at least one of"):
        grow(model)
    linear = TokenformerLM(tiny_config(projection="linear"))
    with pytest.raises(ValueError, match=r"no parameter tokens in its attention; got \['qkv'\]"):
        grow(linear, qkv_tokens=30)
    with pytest.raises(TypeError, match=r"ffn_tokens=300.0 is not an integer; allowed: an integer token count"):
        grow(model, ffn_tokens=300.0)
    with pytest.raises(TypeError, match=r"layers=\[True\] holds non-integers \[True\]; allowed: layer indices 0..1"):
        grow(model, ffn_tokens=50, layers=[True])
    with pytest.raises(ValueError, match=r"layers=\[\] selects no layer; allowed: None \(every layer\)"):
        grow(model, ffn_tokens=50, layers=[])


def test_growth_that_changes_nothing_is_refused():
    model = TokenformerLM(tiny_config())
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"nothing to grow: qkv_tokens=24, ffn_tokens=40 equals the current count"):
        grow(model, qkv_tokens=24, ffn_tokens=40)
    grow(model, ffn_tokens=48, layers=[1])
    with pytest.raises(ValueError, match="nothing to grow: ffn_tokens=48"):
        grow(model, ffn_tokens=48, layers=[1])
    assert model.config.tokens(0)["ffn"] == 40 and model.state_dict()["layers.0.mlp.key_param_tokens"].equal(
        before["layers.0.mlp.key_param_tokens"]
    )


def test_growth_refuses_a_data_parallel_wrapper():
    """Growing inside DDP would leave its gradient buckets at the old shapes: grow the model inside."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(TokenformerLM(tiny_config()))
        hint = r"got a DistributedDataParallel; pass the model inside it \(DistributedDataParallel.module\)"
        with pytest.raises(TypeError, match=hint):
            grow(wrapped, ffn_tokens=48)
        with pytest.raises(TypeError, match=hint):
            stack_layers(wrapped, 3)
    finally:
        dist.destroy_process_group()


def test_optimizer_state_carried_across_growth():
    model = TokenformerLM(tiny_config())
    opt = trained(model)
    param = model.layers[0].mlp.key_param_tokens
    old_avg = opt.state[param]["exp_avg"].clone()
    step = opt.state[param]["step"].clone()
    grow(model, ffn_tokens=48)
    assert carry_optimizer_state(opt) == 2 * 2 * 2  # 2 layers x (keys, values) x (exp_avg, exp_avg_sq)
    state = opt.state[param]
    assert state["exp_avg"].shape == (48, 32)
    assert torch.equal(state["exp_avg"][:40], old_avg) and torch.count_nonzero(state["exp_avg"][40:]) == 0
    assert torch.equal(state["step"], step)
    # The same optimizer object keeps working on the grown tensors.
    ids = torch.randint(0, 97, (2, 16))
    model(ids[:, :-1], ids[:, 1:])[1].backward()
    opt.step()
    assert torch.isfinite(param).all() and opt.state[param]["exp_avg"][40:].abs().sum() > 0


def _twin_step(old_scale, new_scale):
    torch.manual_seed(3)
    model = TokenformerLM(tiny_config())
    opt = trained(model)
    record = grow(model, ffn_tokens=48)
    carry_optimizer_state(opt)
    scaler = TokenUpdateScale(opt, record, old_scale=old_scale, new_scale=new_scale)
    param = model.layers[0].mlp.key_param_tokens
    before = param.detach().clone()
    ids = torch.randint(0, 97, (2, 16))
    model(ids[:, :-1], ids[:, 1:])[1].backward()
    opt.step()
    scaler.remove()
    return before, param.detach().clone()


def test_freezing_old_tokens_keeps_them_exactly():
    before, after = _twin_step(0.0, 1.0)
    assert torch.equal(after[:40], before[:40])  # weight decay and old moments included
    assert (after[40:] - before[40:]).abs().sum() > 0


def test_separate_learning_rate_for_new_tokens():
    base_before, base_after = _twin_step(1.0, 1.0)
    before, after = _twin_step(1.0, 0.25)
    torch.testing.assert_close(after[:40], base_after[:40])
    torch.testing.assert_close(after[40:] - before[40:], 0.25 * (base_after[40:] - base_before[40:]))


def test_save_model_load_model_round_trip_of_grown_model(tmp_path):
    from tokenformer.families import load_model, save_model

    model = TokenformerLM(tiny_config())
    grow(model, ffn_tokens=48, layers=[0])
    save_model(model, tmp_path / "m")
    restored = load_model(tmp_path / "m")
    ids = torch.randint(0, 97, (1, 9))
    assert torch.equal(restored(ids), model(ids))
    assert restored.config == model.config
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        load_model(tmp_path / "missing")


def test_stack_layers_copies_the_trained_layers_on_top():
    torch.manual_seed(0)
    model = TokenformerLM(TokenformerConfig.from_preset("cpu-0.3M", n_layers=2, vocab_size=64))
    old = [copy.deepcopy(block.state_dict()) for block in model.layers]
    x = torch.randint(0, 64, (2, 12))
    before = model(x)[0]
    record = stack_layers(model, 5)
    assert record.sources == [0, 1, 0, 1, 0] and model.config.n_layers == len(model.layers) == 5
    for i, block in enumerate(model.layers):
        assert block.layer == i
        for name, value in block.state_dict().items():
            assert torch.equal(value, old[record.sources[i]][name])
    # The copies are independent parameters, and the deeper model computes something else.
    assert model.layers[2].mlp.key_param_tokens is not model.layers[0].mlp.key_param_tokens
    assert not torch.allclose(model(x)[0], before)
    # The KV cache follows the new depth: cached generation equals the uncached recomputation.
    generated = model.generate(x[:1, :4], max_new_tokens=5, temperature=0.0)
    for end in range(4, 9):
        assert generated[0, end] == model(generated[:, :end])[0, -1].argmax()


@pytest.mark.parametrize("n_layers", [2, 1, 2.5, True])
def test_stack_layers_refuses_a_depth_that_does_not_grow(n_layers):
    model = TokenformerLM(TokenformerConfig.from_preset("cpu-0.3M", n_layers=2, vocab_size=64))
    with pytest.raises(ValueError, match=rf"n_layers={n_layers!r}.*allowed: an integer > 2"):
        stack_layers(model, n_layers)


@pytest.mark.parametrize("position", ["top", "bottom", "interleave"])
def test_depth_growth_preserves_logits_on_1m_preset(position):
    model = TokenformerLM(TokenformerConfig.from_preset("cpu-1M"))
    trained(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 64))
    with torch.no_grad():
        before = model(ids)
        record = grow(model, ffn_tokens=768, n_layers=6, depth_position=position)
        after = model(ids)
    assert record.function_preserving
    assert (after - before).abs().max().item() <= 1e-5
    assert model.config.n_layers == len(model.layers) == 6 and model.config.ffn_tokens == 768
    assert [block.layer for block in model.layers] == list(range(6))
    assert sum(p.numel() for p in model.parameters()) == count_parameters(model.config)
    assert record.to_dict()["new_layers"] == record.new_layers == [i for i, s in enumerate(record.sources) if s is None]


@pytest.mark.parametrize(
    ("position", "sources"),
    [
        ("top", [0, 1, 2, None, None]),
        ("bottom", [None, None, 0, 1, 2]),
        ("interleave", [0, None, 1, None, 2]),
    ],
)
def test_depth_positions(position, sources):
    model = TokenformerLM(tiny_config(n_layers=3))
    old = list(model.layers)
    record = grow(model, n_layers=5, depth_position=position)
    assert record.sources == sources
    assert [model.layers[i] is old[s] for i, s in enumerate(sources) if s is not None] == [True] * 3
    assert grow(TokenformerLM(tiny_config()), n_layers=6, depth_position="interleave").sources == [
        0,
        None,
        None,
        1,
        None,
        None,
    ]


def test_new_block_is_fresh_with_zero_residual_outputs_that_receive_gradients():
    model = TokenformerLM(tiny_config())
    record = grow(model, n_layers=3)
    block = model.layers[2]
    fresh = TokenformerLM(tiny_config(n_layers=3)).layers[2]
    for name, module in block.pattentions():
        assert module.tau.item() == fresh.get_submodule(name).tau.item()
        assert module.key_param_tokens.std().item() == pytest.approx(0.02, rel=0.3)
    assert torch.count_nonzero(block.attention.proj.value_param_tokens) == 0
    assert torch.count_nonzero(block.mlp.value_param_tokens) == 0
    assert torch.count_nonzero(block.attention.query.value_param_tokens) > 0
    ids = torch.randint(0, 97, (2, 12))
    model(ids[:, :-1], ids[:, 1:])[1].backward()
    assert block.mlp.value_param_tokens.grad.abs().sum() > 0
    assert block.attention.proj.value_param_tokens.grad.abs().sum() > 0
    assert {g.name for g in record.grown} == {f"layers.2.{n}" for n, _ in block.named_parameters()}


def test_linear_baseline_grows_in_depth_exactly():
    model = TokenformerLM(tiny_config(projection="linear"))
    trained(model)
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        before = model(ids)
        grow(model, ffn_tokens=64, n_layers=4, depth_position="interleave")
        after = model(ids)
    assert (after - before).abs().max().item() <= 1e-6
    new = model.layers[1]
    assert torch.count_nonzero(new.attention.proj.weight) == 0 and torch.count_nonzero(new.mlp.fc2.weight) == 0
    assert new.mlp.fc1.weight.shape == (64, 32)


def test_vision_model_grows_in_depth_exactly():
    from test_vision import images_for, tiny_vit

    from tokenformer import TokenformerViT

    model = TokenformerViT(tiny_vit(lsa=True)).eval()
    images = images_for(model.config)
    with torch.no_grad():
        before = model(images)
        grow(model, qkv_tokens=30, n_layers=4, depth_position="bottom")
        after = model(images)
    assert (after - before).abs().max().item() <= 1e-5
    assert model.config.n_layers == 4 and model.config.qkv_tokens == 30


def test_depth_growth_survives_save_load_and_keeps_the_kv_cache_right(tmp_path):
    from tokenformer.families import load_model, save_model

    torch.manual_seed(0)
    model = TokenformerLM(tiny_config())
    trained(model)
    grow(model, ffn_tokens=48, layers=[1], n_layers=3, depth_position="interleave")
    # The new block takes the grown counts of the block below it.
    assert model.config.layer_tokens == [
        {"qkv": 24, "proj": 20, "ffn": 40},
        {"qkv": 24, "proj": 20, "ffn": 40},
        {"qkv": 24, "proj": 20, "ffn": 48},
    ]
    trained(model, steps=1)  # the new block's weights move away from zero
    save_model(model, tmp_path / "m")
    restored = load_model(tmp_path / "m")
    assert restored.config == model.config
    ids = torch.randint(0, 97, (2, 10))
    torch.testing.assert_close(restored(ids), model(ids), rtol=0, atol=0)
    # The grown model's blocks write their KV cache entries under their new indices.
    generated = model.generate(ids[:1, :4], max_new_tokens=5, temperature=0.0)
    for end in range(4, 9):
        assert generated[0, end] == model(generated[:, :end])[0, -1].argmax()
    assert torch.equal(restored.generate(ids[:1, :4], max_new_tokens=5, temperature=0.0), generated)


def test_depth_growth_with_a_generator_is_repeatable():
    model = TokenformerLM(tiny_config())
    twin = copy.deepcopy(model)
    state = torch.get_rng_state()
    grow(model, n_layers=3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    grow(twin, n_layers=3, generator=torch.Generator().manual_seed(5))
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_optimizer_state_carried_across_depth_growth():
    model = TokenformerLM(tiny_config())
    opt = trained(model)
    old = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    record = grow(model, ffn_tokens=48, n_layers=4, depth_position="interleave")
    carry_optimizer_state(opt, record)
    in_groups = {id(p): g["name"] for g in opt.param_groups for p in g["params"]}
    assert set(in_groups) == {id(p) for p in model.parameters()}
    for added in record.added:
        assert in_groups[id(added.param)] == in_groups[id(added.template)]
        state = opt.state[added.param]
        assert state["step"].item() == 0 and torch.count_nonzero(state["exp_avg"]) == 0
        assert state["exp_avg_sq"].shape == added.param.shape
    for param, saved in old.items():
        assert torch.equal(opt.state[param]["step"], saved["step"])
        old_rows = tuple(slice(0, s) for s in saved["exp_avg"].shape)
        assert torch.equal(opt.state[param]["exp_avg"][old_rows], saved["exp_avg"])
    ids = torch.randint(0, 97, (2, 16))
    model(ids[:, :-1], ids[:, 1:])[1].backward()
    opt.step()
    new = model.layers[record.new_layers[0]].mlp.value_param_tokens
    assert opt.state[new]["step"].item() == 1 and new.abs().sum() > 0


def test_depth_growth_errors():
    model = TokenformerLM(tiny_config())
    with pytest.raises(ValueError, match=r"unknown depth_position 'middle'; allowed: top, bottom, interleave"):
        grow(model, n_layers=3, depth_position="middle")
    with pytest.raises(ValueError, match=r"n_layers=1 cannot be grown to; allowed: an integer >= the current 2"):
        grow(model, n_layers=1)
    with pytest.raises(ValueError, match=r"n_layers=2.5 cannot be grown to"):
        grow(model, n_layers=2.5)
    with pytest.raises(ValueError, match=r"nothing to grow: n_layers=2 equals"):
        grow(model, n_layers=2)
    assert model.config.n_layers == len(model.layers) == 2
