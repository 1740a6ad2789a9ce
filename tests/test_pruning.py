import math

import pytest
import torch
from conftest import tiny_config

from tokenformer import (
    Pattention,
    TokenformerConfig,
    TokenformerLM,
    TokenformerViT,
    VisionConfig,
    calibration_scores,
    count_parameters,
    grow,
    load_model,
    prune,
    prune_pattention,
    save_model,
)
from tokenformer.flops import forward_flops_per_token
from tokenformer.pruning import ghost_factor, magnitude_scores, prune_like, prune_optimizer_state


def moved(model, scale=0.02):
    """Weights moved away from their init (as after training), so that every token matters."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


def gelu(t):
    return 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_prune_after_grow_restores_the_original_logits(dtype, tolerance):
    model = moved(TokenformerLM(tiny_config())).to(dtype)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        before = model(ids)
        grow(model, qkv_tokens=30, proj_tokens=26, ffn_tokens=56)
        record = prune(model, qkv_tokens=24, proj_tokens=20, ffn_tokens=40)
        after = model(ids)
    assert (after - before).abs().max().item() <= tolerance
    assert record.function_preserving and all(rank == 0 for rank in record.ghost_ranks.values())
    # Exactly the grown (zero-key) tokens went: the old tokens, in their old order, and no ghost.
    assert model.state_dict().keys() == original.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())
    assert model.config == tiny_config()


def test_prune_after_grow_in_some_layers_with_measured_importance():
    model = moved(TokenformerLM(tiny_config()))
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        before = model(ids)
        grow(model, ffn_tokens=64, layers=[1])
        scores = calibration_scores(model, [ids])
        assert torch.count_nonzero(scores["layers.1.mlp"][40:]) == 0  # zero keys score zero
        prune(model, ffn_tokens=40, layers=[1], scores=scores)
        assert (model(ids) - before).abs().max().item() <= 1e-5
    assert model.config.layer_tokens is None and model.config.ffn_tokens == 40


def test_a_ghost_norm_layer_equals_the_formula_in_float64():
    torch.manual_seed(1)
    layer = Pattention(12, 9, 30, dtype=torch.float64)
    with torch.no_grad():
        layer.key_param_tokens.normal_()
        layer.value_param_tokens.normal_()
    keys, values, tau = layer.key_param_tokens.detach().clone(), layer.value_param_tokens.detach().clone(), layer.tau
    kept = prune_pattention(layer, 18, scores=torch.rand(30, dtype=torch.float64))
    removed = torch.tensor([i for i in range(30) if i not in kept.tolist()])
    assert layer.ghost_rank == 12  # min(removed, d_in)
    x = torch.randn(5, 7, 12, dtype=torch.float64)
    a_kept = x @ keys[kept].T
    ghost_square = (x @ keys[removed].T).square().sum(-1, keepdim=True)
    expected = gelu(a_kept * tau / torch.sqrt(a_kept.square().sum(-1, keepdim=True) + ghost_square)) @ values[kept]
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    # The kept scores are normalised exactly as before pruning: each kept token's normalised score is unchanged.
    a_full = x @ keys.T
    unpruned = gelu(a_full * tau / a_full.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(
        gelu(a_kept * tau / (a_kept.square().sum(-1, keepdim=True) + ghost_square).sqrt()), unpruned[..., kept]
    )


def test_pruning_twice_accumulates_the_ghost_and_a_lower_rank_approximates_it():
    torch.manual_seed(2)
    layer = Pattention(16, 8, 40, dtype=torch.float64)
    with torch.no_grad():
        layer.key_param_tokens.normal_()
    keys = layer.key_param_tokens.detach().clone()
    first = prune_pattention(layer, 36)  # 4 removed: a rank-4 ghost
    assert layer.ghost_rank == 4
    second = prune_pattention(layer, 20)
    assert layer.ghost_rank == 16
    kept = first[second]
    removed = torch.tensor([i for i in range(40) if i not in kept.tolist()])
    torch.testing.assert_close(layer.ghost.T @ layer.ghost, keys[removed].T @ keys[removed], rtol=0, atol=1e-10)
    factor = ghost_factor(keys[removed], rank=6)
    assert factor.shape == (6, 16)
    exact = (keys[removed].T @ keys[removed]).trace()
    assert 0.3 * exact < (factor.T @ factor).trace() < exact  # the strongest directions, not all the energy


def test_without_the_ghost_the_kept_scores_are_renormalised():
    model = moved(TokenformerLM(tiny_config()))
    ids = torch.randint(0, 97, (2, 16))
    copy = moved(TokenformerLM(tiny_config()))
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        prune(model, ffn_tokens=30, ghost=True)
        prune(copy, ffn_tokens=30, ghost=False)
    assert model.config.ghost_ranks == [{"mlp": 10}, {"mlp": 10}] and copy.config.ghost_ranks is None
    assert copy.layers[0].mlp.ghost is None
    assert not torch.equal(model(ids), copy(ids))


@pytest.mark.parametrize("norm", ["gelu_l2_norm", "softmax"])
def test_norms_without_an_exact_ghost_prune_without_one_and_refuse_it(norm):
    model = TokenformerLM(tiny_config(norm=norm))
    with pytest.raises(ValueError, match=f"ghost=True needs norm='l2_norm_gelu'.*norm='{norm}'"):
        prune(model, ffn_tokens=30, ghost=True)
    assert model.config.ffn_tokens == 40  # nothing changed
    record = prune(model, ffn_tokens=30)
    assert not record.ghost and model.config.ghost_ranks is None


def test_clear_errors_and_nothing_changes():
    model = TokenformerLM(tiny_config())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"at least 1 token; allowed: an integer from 1 to 40"):
        prune(model, ffn_tokens=0)
    with pytest.raises(ValueError, match=r"prune cannot grow: qkv_tokens=30 is above layer 0's current 24"):
        prune(model, qkv_tokens=30)
    with pytest.raises(ValueError, match=r"layers \[2\] out of range; allowed: 0..1"):
        prune(model, ffn_tokens=20, layers=[2])
    with pytest.raises(ValueError, match="at least one of"):
        prune(model)
    with pytest.raises(ValueError, match="nothing to prune: ffn_tokens=40 equals the current count"):
        prune(model, ffn_tokens=40)
    with pytest.raises(TypeError, match="ffn_tokens=20.5 is not an integer"):
        prune(model, ffn_tokens=20.5)
    with pytest.raises(ValueError, match=r"scores has no entry for 'layers.1.mlp'"):
        prune(model, ffn_tokens=20, scores={"layers.0.mlp": torch.ones(40)})
    with pytest.raises(ValueError, match=r"must have shape \[40\]"):
        prune(model, ffn_tokens=20, scores={"layers.0.mlp": torch.ones(41), "layers.1.mlp": torch.ones(40)})
    with pytest.raises(ValueError, match="ghost_rank=4 needs the ghost norm"):
        prune(model, ffn_tokens=20, ghost=False, ghost_rank=4)
    with pytest.raises(ValueError, match="allowed: an integer from 1 to 24"):
        prune_pattention(model.layers[0].attention.key, 25)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    linear = TokenformerLM(tiny_config(projection="linear"))
    with pytest.raises(ValueError, match="allowed: ffn_tokens only"):
        prune(linear, qkv_tokens=10)


def test_importance_rules_and_zero_keys():
    model = moved(TokenformerLM(tiny_config()))
    mlp = model.layers[0].mlp
    with torch.no_grad():
        mlp.key_param_tokens[3].zero_()
    magnitude = magnitude_scores(mlp)
    expected = mlp.key_param_tokens.norm(dim=1) * mlp.value_param_tokens.norm(dim=1)
    expected[3] = 0
    torch.testing.assert_close(magnitude, expected.detach())
    ids = torch.randint(0, 97, (3, 16))
    measured = calibration_scores(model, [ids[:2], ids[2:]])["layers.0.mlp"]
    # By hand: the mean absolute normalised score over every input row, times the value norm.
    inputs = []
    handle = mlp.register_forward_hook(lambda m, i, o: inputs.append(i[0].reshape(-1, 32)))
    with torch.no_grad():
        model(ids)
    handle.remove()
    a = inputs[0] @ mlp.key_param_tokens.T
    s = torch.nn.functional.gelu(a / a.norm(dim=-1, keepdim=True) * mlp.tau)
    torch.testing.assert_close(measured, (s.abs().mean(0) * mlp.value_param_tokens.norm(dim=1)).detach())
    assert measured[3] == 0
    # User scores too: a zero key scores zero, so it goes first; else the lowest score goes.
    scores = {f"layers.{i}.mlp": torch.arange(40.0, 0, -1) for i in range(2)}
    record = prune(model, ffn_tokens=39, scores=scores)
    assert record.kept["layers.0.mlp"].tolist() == [i for i in range(40) if i != 3]
    assert record.kept["layers.1.mlp"].tolist() == list(range(39))


def test_linear_baseline_prunes_mlp_units_and_undoes_net2net_growth():
    model = moved(TokenformerLM(tiny_config(projection="linear")))
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        before = model(ids)
        grow(model, ffn_tokens=64)
        record = prune(model, ffn_tokens=40, scores=calibration_scores(model, [ids]))
        assert record.function_preserving and not record.ghost
        assert (model(ids) - before).abs().max().item() <= 1e-6
        prune(model, ffn_tokens=20)
    assert model.layers[0].mlp.fc1.weight.shape == (20, 32) and model.layers[0].mlp.fc2.weight.shape == (32, 20)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(model.config)


def test_pruned_model_survives_save_and_load_and_counts_its_ghost(tmp_path):
    model = moved(TokenformerLM(tiny_config()))
    prune(model, qkv_tokens=16, ffn_tokens=24, layers=[1])
    prune(model, proj_tokens=12, ghost_rank=5)
    assert model.config.ghost_ranks[0] == {"attention.proj": 5}
    assert model.config.ghost_ranks[1]["mlp"] == 16 and model.config.ghost_ranks[1]["attention.query"] == 8
    assert sum(p.numel() for p in model.parameters()) == count_parameters(model.config)
    ghosts = sum(b.numel() for name, b in model.named_buffers() if name.endswith("ghost"))
    unpruned = model.config.replace(ghost_ranks=None)
    assert forward_flops_per_token(model.config, 16) - forward_flops_per_token(unpruned, 16) == 2 * ghosts
    save_model(model, tmp_path / "pruned")
    loaded = load_model(tmp_path / "pruned")
    ids = torch.randint(0, 97, (2, 16))
    assert loaded.config == model.config
    assert torch.equal(loaded(ids), model(ids))


def test_growth_after_pruning_keeps_the_function_and_the_ghost(tmp_path):
    model = moved(TokenformerLM(tiny_config()))
    prune(model, qkv_tokens=16, ffn_tokens=20)
    ghost = model.layers[0].mlp.ghost.clone()
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        before = model(ids)
        record = grow(model, qkv_tokens=28, ffn_tokens=48, layers=[0])
        assert record.function_preserving
        assert (model(ids) - before).abs().max().item() <= 1e-5
    assert torch.equal(model.layers[0].mlp.ghost, ghost) and model.config.ghost_ranks[0]["mlp"] == 20
    save_model(model, tmp_path / "m")
    assert torch.equal(load_model(tmp_path / "m")(ids), model(ids))


def test_stacking_copies_the_ghosts():
    from tokenformer import stack_layers

    model = moved(TokenformerLM(tiny_config()))
    prune(model, ffn_tokens=30, layers=[1])
    stack_layers(model, 4)
    assert model.config.ghost_ranks == [{}, {"mlp": 10}, {}, {"mlp": 10}]
    assert torch.equal(model.layers[3].mlp.ghost, model.layers[1].mlp.ghost)


def test_optimizer_state_and_a_copy_are_pruned_alike():
    model = moved(TokenformerLM(tiny_config()))
    average = moved(TokenformerLM(tiny_config()), 0.01)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 97, (2, 12))
    model.train()
    model(ids[:, :-1], ids[:, 1:])[1].backward()
    optimizer.step()
    moment = optimizer.state[model.layers[0].mlp.value_param_tokens]["exp_avg"].clone()
    record = prune(model, ffn_tokens=25)
    assert prune_optimizer_state(optimizer, record) == 8  # two moments of 2 tensors in 2 layers
    kept = record.kept["layers.0.mlp"]
    assert torch.equal(optimizer.state[model.layers[0].mlp.value_param_tokens]["exp_avg"], moment[kept])
    model(ids[:, :-1], ids[:, 1:])[1].backward()
    optimizer.step()  # shapes agree
    prune_like(average, record)
    assert average.config == model.config
    assert average.layers[1].mlp.ghost.shape == model.layers[1].mlp.ghost.shape


def test_vision_model_prunes_its_blocks(tmp_path):
    config = VisionConfig.from_preset("fmnist-0.3M", n_layers=2)
    model = moved(TokenformerViT(config))
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        before = model(images)
        grow(model, ffn_tokens=300)
        prune(model, ffn_tokens=256)
        assert (model(images) - before).abs().max().item() <= 1e-5
        prune(model, qkv_tokens=32, ffn_tokens=128, scores=calibration_scores(model, [images]))
    assert model.patch_proj.num_tokens == 64 and model.head.num_tokens == 64
    save_model(model, tmp_path / "vit")
    assert torch.equal(load_model(tmp_path / "vit")(images), model(images))


def test_config_checks_ghost_ranks():
    with pytest.raises(ValueError, match=r"ghost_ranks=.*one mapping per layer \(n_layers=2\)"):
        tiny_config(ghost_ranks=[{}])
    with pytest.raises(ValueError, match=r"ghost_ranks\[1\]=.*a rank from 1 to d_model=32"):
        tiny_config(ghost_ranks=[{}, {"mlp": 33}])
    with pytest.raises(ValueError, match="needs projection='pattention' and norm='l2_norm_gelu'"):
        tiny_config(norm="softmax", ghost_ranks=[{}, {"mlp": 3}])
    with pytest.raises(ValueError, match="names 'attention.bogus', not a Pattention of a block"):
        TokenformerLM(tiny_config(ghost_ranks=[{}, {"attention.bogus": 3}]))
    assert TokenformerConfig.from_dict(tiny_config(ghost_ranks=[{}, {"mlp": 3}]).to_dict()).ghosts(1) == {"mlp": 3}


def test_released_export_refuses_a_pruned_model():
    from tokenformer.interop.released import ours_to_released

    model = TokenformerLM(tiny_config())
    prune(model, ffn_tokens=30)
    with pytest.raises(ValueError, match=r"cannot hold a pruned model's ghost norms.*layers.0.mlp"):
        ours_to_released(model)
    plain = TokenformerLM(tiny_config())
    prune(plain, ffn_tokens=30, ghost=False)
    with pytest.raises(ValueError, match="a grown or pruned model"):
        ours_to_released(plain)


def test_hf_round_trip_of_a_pruned_model(tmp_path):
    pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")
    from transformers import AutoModelForCausalLM

    from tokenformer import to_hf

    model = moved(TokenformerLM(tiny_config()))
    prune(model, qkv_tokens=20, ffn_tokens=24, layers=[0])
    ids = torch.randint(0, 97, (2, 12))
    assert torch.equal(to_hf(model)(ids).logits, model(ids))
    save_model(model, tmp_path / "ours")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert hf.config.ghost_ranks == model.config.ghost_ranks
    assert torch.equal(hf(ids).logits, model(ids))
    hf.save_pretrained(tmp_path / "hf")
    assert torch.equal(load_model(tmp_path / "hf")(ids), model(ids))
