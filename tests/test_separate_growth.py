import copy

import pytest
import torch
from conftest import tiny_config
from test_vision import tiny_vit

from tokenformer import (
    TokenformerLM,
    TokenformerViT,
    TokenUpdateScale,
    grow,
    growth_summary,
    load_model,
    prune,
    quantize_int8,
    save_model,
)
from tokenformer.io import load_weights, save_weights
from tokenformer.pattention import Pattention


def train_steps(model, record, steps=4, lr=1e-2):
    """AdamW steps with the old tokens frozen (weight decay included), everything else frozen."""
    grown = {id(g.param) for g in record.grown}
    for param in model.parameters():
        param.requires_grad_(id(param) in grown)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    scale = TokenUpdateScale(opt, record, old_scale=0.0)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 16))
        _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    scale.remove()


@pytest.mark.parametrize("norm", ["l2_norm_gelu", "gelu_l2_norm", "softmax"])
def test_separate_growth_starts_exactly_at_the_old_function(norm):
    model = TokenformerLM(tiny_config(norm=norm))
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        before = model(ids)
        record = grow(model, qkv_tokens=30, ffn_tokens=50, normalisation="separate")
        after = model(ids)
    assert record.function_preserving and record.normalisation == "separate"
    assert torch.equal(after, before)
    layer = model.layers[0].mlp
    assert layer.split == 40 and layer.num_tokens == 50
    assert layer.split_tau.item() == pytest.approx(10**0.5) and layer.tau.item() == pytest.approx(40**0.5)
    assert torch.count_nonzero(layer.value_param_tokens[40:]) == 0
    assert torch.count_nonzero(layer.key_param_tokens[40:]) == 10 * 32  # random keys: values get gradient
    assert growth_summary(model)[0]["mlp"] == {
        "tokens": 50,
        "tau": pytest.approx(40**0.5),
        "split": 40,
        "split_tau": pytest.approx(10**0.5),
    }
    qkv = {name: 24 for name in ("attention.query", "attention.key", "attention.value")}
    assert model.config.norm_splits == [{**qkv, "mlp": 40}] * 2


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_old_part_is_unchanged_on_every_input_after_training(impl):
    model = TokenformerLM(tiny_config())
    for layer in model.modules():
        if isinstance(layer, Pattention):
            layer.impl = impl
    old = copy.deepcopy(model)
    record = grow(model, qkv_tokens=30, proj_tokens=26, ffn_tokens=50, normalisation="separate")
    train_steps(model, record)
    for (name, layer), old_layer in zip(
        ((n, m) for n, m in model.named_modules() if isinstance(m, Pattention)),
        (m for m in old.modules() if isinstance(m, Pattention)),
        strict=True,
    ):
        x = torch.randn(3, 7, layer.in_features)
        with torch.no_grad():
            old_part, new_part = layer.parts(x)
            assert torch.equal(old_part, old_layer(x)), name
            assert new_part.abs().max() > 0, name  # the new part learned something
            assert torch.equal(layer(x), old_part + new_part)


def test_separate_growth_reloads_from_its_config(tmp_path):
    model = TokenformerLM(tiny_config())
    record = grow(model, ffn_tokens=50, normalisation="separate")
    train_steps(model, record, steps=2)
    save_weights(model.state_dict(), tmp_path / "model.safetensors")
    restored = TokenformerLM(model.config)
    restored.load_state_dict(load_weights(tmp_path / "model.safetensors"))
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert torch.equal(restored(ids), model(ids))
    assert restored.layers[1].mlp.split == 40
    save_model(model, tmp_path / "saved")
    loaded = load_model(tmp_path / "saved")
    assert loaded.layers[0].mlp.split_tau.item() == model.layers[0].mlp.split_tau.item()
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_separate_growth_of_a_vision_model_keeps_its_logits():
    model = TokenformerViT(tiny_vit())
    images = torch.randn(3, 2, 12, 12)
    with torch.no_grad():
        before = model(images)
        grow(model, qkv_tokens=30, ffn_tokens=50, normalisation="separate")
        assert torch.equal(model(images), before)
    assert model.config.norm_splits[1]["mlp"] == 40


def test_a_split_layer_grows_jointly_but_not_separately_again():
    model = TokenformerLM(tiny_config())
    grow(model, ffn_tokens=50, normalisation="separate")
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        before = model(ids)
        grow(model, ffn_tokens=56)  # zero keys join the new group
        assert torch.equal(model(ids), before)
    with pytest.raises(ValueError, match="already normalise two groups"):
        grow(model, ffn_tokens=60, normalisation="separate")
    grow(model, qkv_tokens=30, normalisation="separate")  # another kind may


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"normalisation": "apart"}, "unknown normalisation 'apart'; allowed: joint, separate"),
        ({"n_layers": 3}, "grows the width only"),
        ({"value_std": 0.1}, "starts the new values at zero"),
    ],
)
def test_separate_growth_refuses_what_it_cannot_do(options, match):
    model = TokenformerLM(tiny_config())
    with pytest.raises(ValueError, match=match):
        grow(model, ffn_tokens=50, **{"normalisation": "separate", **options})


def test_layouts_with_one_normalisation_refuse_a_split_model():
    from tokenformer.interop.released import ours_to_released

    model = TokenformerLM(tiny_config())
    grow(model, ffn_tokens=50, normalisation="separate")
    with pytest.raises(ValueError, match="released layout has one normalisation per Pattention"):
        ours_to_released(model)
    with pytest.raises(ValueError, match="prune keeps one normalisation per Pattention"):
        prune(model, ffn_tokens=30)
    with pytest.raises(ValueError, match="int8 Pattentions have one normalisation"):
        quantize_int8(model)
