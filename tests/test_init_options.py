"""The Pattention score scale and initialisation as configuration (``tau_scale``, ``fixed_tau``,
``key_std``, ``value_init``, ``value_scale``) and the Transformer baseline's analogues
(``linear_std``, ``out_scale``): what each sets, that growth stays exact under every choice, that
the choice survives every way a model is stored, and clear errors."""

import math

import pytest
import torch
from conftest import tiny_config, tiny_train_options

from tokenformer import TokenformerLM, VisionConfig, grow
from tokenformer.families import load_model, save_model
from tokenformer.pattention import Pattention

OPTIONS = {
    "release": {},
    "tau_halved": {"tau_scale": 0.5},
    "fixed_tau_per_kind": {"fixed_tau": {"qkv": 3.0, "ffn": 5.0}},
    "small_values": {"value_scale": 1 / 16},
    "fan_in": {"value_init": "fan_in", "value_scale": {"qkv": 0.25, "proj": 0.5}},
    "keys_and_values": {"key_std": {"proj": 0.1}, "value_init": {"ffn": "fan_in"}, "tau_scale": {"ffn": 0.25}},
}


def pattentions(model):
    """(kind, layer) of every Pattention in the blocks."""
    for block in model.layers:
        for name in ("query", "key", "value"):
            yield "qkv", getattr(block.attention, name)
        yield "proj", block.attention.proj
        yield "ffn", block.mlp


def test_each_field_sets_what_it_says():
    config = tiny_config(
        tau_scale={"qkv": 0.5},
        fixed_tau={"proj": 2.0},
        key_std={"ffn": 0.05},
        value_init={"qkv": "fan_in"},
        value_scale={"qkv": 0.1, "ffn": 0.5},
    )
    model = TokenformerLM(config)
    wang = 2 / (config.n_layers * math.sqrt(config.d_model))
    expected = {
        "qkv": (0.5 * math.sqrt(24), 0.02, 0.1 / math.sqrt(24)),
        "proj": (2.0, 0.02, wang / 64),  # the language model's default value_scale
        "ffn": (math.sqrt(40), 0.05, 0.5 * wang),
    }
    for kind, layer in pattentions(model):
        tau, key_std, value_std = expected[kind]
        assert float(layer.tau) == pytest.approx(tau)
        assert (layer.key_std, layer.value_std) == pytest.approx((key_std, value_std))
    # The drawn tokens follow those stds (a few hundred draws per layer: within 20%).
    big = TokenformerLM(tiny_config(d_model=64, qkv_tokens=256, value_init="fan_in", value_scale=0.5))
    values = big.layers[0].attention.query.value_param_tokens
    assert float(values.detach().std()) == pytest.approx(0.5 / 16, rel=0.2)


def test_defaults_are_the_release_but_small_values():
    model = TokenformerLM(tiny_config())
    for _kind, layer in pattentions(model):
        assert float(layer.tau) == pytest.approx(math.sqrt(layer.num_tokens))
        assert layer.value_std == pytest.approx(2 / (2 * math.sqrt(32)) / 64)
    vision = VisionConfig.from_preset("fmnist-0.3M")
    assert vision.pattention_init("ffn", 64)["value_std"] == pytest.approx(vision.value_init_std)
    # The Transformer twin's residual outputs start 16 times below the wang std (the ViT's do not).
    linear = tiny_config(projection="linear")
    assert linear.linear_init_std(writes_residual=True) == pytest.approx(linear.value_init_std / 16)
    assert linear.linear_init_std(writes_residual=False) == linear.init_std
    assert vision.replace(projection="linear").linear_init_std(writes_residual=True) == vision.value_init_std


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("norm", ["l2_norm_gelu", "gelu_l2_norm"])
def test_growth_is_exact_under_every_option(name, norm):
    model = TokenformerLM(tiny_config(norm=norm, **OPTIONS[name])).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # weights that moved away from their init
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        before = model(ids)
        taus = [float(layer.tau) for _, layer in pattentions(model)]
        record = grow(model, qkv_tokens=40, proj_tokens=33, ffn_tokens=80)
        after = model(ids)
    assert record.function_preserving
    assert [float(layer.tau) for _, layer in pattentions(model)] == taus  # tau frozen at creation
    assert (after - before).abs().max().item() <= 1e-5


def test_grown_values_follow_the_rule_at_the_new_count():
    model = TokenformerLM(tiny_config(d_model=64, ffn_tokens=64, value_init="fan_in", value_scale=0.5))
    grow(model, ffn_tokens=64 + 400)
    new = model.layers[0].mlp.value_param_tokens[64:]
    assert float(new.detach().std()) == pytest.approx(0.5 / math.sqrt(464), rel=0.1)


def test_non_default_tau_survives_save_load_and_hf(tmp_path):
    pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")
    from transformers import AutoModelForCausalLM

    model = TokenformerLM(tiny_config(tau_scale=0.5, fixed_tau={"ffn": 3.0}, value_init="fan_in")).eval()
    ids = torch.randint(0, 97, (2, 12))
    save_model(model, tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    assert loaded.config == model.config
    assert float(loaded.layers[0].mlp.tau) == 3.0
    assert float(loaded.layers[1].attention.key.tau) == pytest.approx(0.5 * math.sqrt(24))
    assert torch.equal(loaded(ids), model(ids))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert float(hf.layers[0].mlp.tau) == 3.0
    assert torch.equal(hf(ids).logits, model(ids))
    hf.save_pretrained(tmp_path / "hf")
    assert torch.equal(load_model(tmp_path / "hf")(ids), model(ids))


def test_non_default_tau_survives_sharded_checkpoints(tmp_path, corpus_file, cache_dir, one_thread):
    from tokenformer.cli import main
    from tokenformer.train import TrainConfig, Trainer, load_checkpoint
    from tokenformer.train.checkpoint import load_sharded_state
    from tokenformer.train.trainer import make_optimizer

    overrides = {"n_layers": 1, "d_model": 32, "n_heads": 2, "qkv_tokens": 16, "proj_tokens": 16, "ffn_tokens": 32}
    options = tiny_train_options(
        corpus_file, cache_dir, tmp_path / "run", max_steps=4, model_overrides={**overrides, "tau_scale": 0.25}
    )
    trainer = Trainer(TrainConfig(**options))
    trainer.fit()
    trainer.close()
    main(["consolidate", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "sharded")])
    loaded = load_checkpoint(tmp_path / "sharded")
    assert loaded.sharded and loaded.model.config.tau_scale == 0.25
    optimizer = make_optimizer(loaded.model, TrainConfig.from_dict(loaded.trainer_state["train_config"]))
    load_sharded_state(tmp_path / "sharded", loaded.model, optimizer)
    assert float(loaded.model.layers[0].attention.query.tau) == pytest.approx(0.25 * 4)
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.model.state_dict().values(), trainer.model.state_dict().values(), strict=True)
    )


def test_vision_patch_and_head_take_their_own_kinds():
    from tokenformer import TokenformerViT

    config = VisionConfig.from_preset("fmnist-0.3M", fixed_tau={"patch": 2.0, "head": 3.0}, value_scale={"head": 0.5})
    model = TokenformerViT(config)
    assert float(model.patch_proj.tau) == 2.0 and float(model.head.tau) == 3.0
    assert model.head.value_std == pytest.approx(0.5 * config.value_init_std)
    with pytest.raises(ValueError, match="config field fixed_tau has unknown token kind"):
        tiny_config(fixed_tau={"patch": 2.0})  # the language model has no patch projection


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("tau_scale", 0.0, "config field tau_scale=0.0 is invalid"),
        ("tau_scale", -1, "config field tau_scale=-1 is invalid"),
        ("tau_scale", float("nan"), "config field tau_scale=nan is invalid"),
        ("fixed_tau", {"qkv": 0}, r"config field fixed_tau\['qkv'\]=0 is invalid"),
        ("fixed_tau", {"mlp": 1.0}, r"config field fixed_tau has unknown token kind\(s\) \['mlp'\]; allowed: qkv"),
        ("key_std", float("inf"), "config field key_std=inf is invalid"),
        ("value_init", "xavier", "config field value_init='xavier' is invalid; allowed: wang or fan_in"),
        ("value_scale", {"ffn": True}, r"config field value_scale\['ffn'\]=True is invalid"),
        ("value_scale", -0.5, "config field value_scale=-0.5 is invalid; allowed: a finite number >= 0"),
        ("linear_std", 0.0, "config field linear_std=0.0 is invalid; allowed: null or a finite number > 0"),
        ("out_scale", -1.0, "config field out_scale=-1.0 is invalid; allowed: a finite number >= 0"),
        ("out_scale", None, "config field out_scale=None is invalid"),
    ],
)
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**{field: value})


def test_pattention_refuses_a_bad_tau():
    with pytest.raises(ValueError, match="Pattention tau must be a finite number > 0"):
        Pattention(4, 4, 8, tau=0.0)
    assert float(Pattention(4, 4, 8, tau=2.5).tau) == 2.5


def linears(model):
    """(writes into the residual stream, Linear) of every Linear in the blocks."""
    for block in model.layers:
        for name in ("query", "key", "value"):
            yield False, getattr(block.attention, name)
        yield True, block.attention.proj
        yield False, block.mlp.fc1
        yield True, block.mlp.fc2


@pytest.mark.parametrize(("linear_std", "out_scale"), [(None, 1.0), (0.01, 0.25), (0.05, 0.0)])
def test_transformer_init_fields_set_what_they_say(linear_std, out_scale):
    config = tiny_config(projection="linear", d_model=64, ffn_tokens=256, linear_std=linear_std, out_scale=out_scale)
    model = TokenformerLM(config)
    wang = 2 / (config.n_layers * math.sqrt(64))
    for writes_residual, layer in linears(model):
        std = float(layer.weight.detach().std())
        if writes_residual and out_scale == 0:
            assert not layer.weight.any()
        elif writes_residual:
            assert std == pytest.approx(out_scale * wang, rel=0.15)
        else:
            assert std == pytest.approx(0.02 if linear_std is None else linear_std, rel=0.15)
    # Pattention models ignore them: the same draws with or without.
    torch.manual_seed(0)
    plain = TokenformerLM(tiny_config())
    torch.manual_seed(0)
    ignored = TokenformerLM(tiny_config(linear_std=linear_std, out_scale=out_scale))
    assert all(
        torch.equal(a, b) for a, b in zip(plain.state_dict().values(), ignored.state_dict().values(), strict=True)
    )


def test_zero_residual_outputs_still_learn():
    # Starting the residual-writing layers at zero keeps every layer trainable: the output layers
    # get gradient at once, the rest after one step.
    model = TokenformerLM(tiny_config(projection="linear", out_scale=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 97, (2, 16))
    for _ in range(2):
        optimizer.zero_grad()
        model(ids[:, :-1], ids[:, 1:])[1].backward()
        optimizer.step()
    assert all(layer.weight.grad.abs().sum() > 0 for _, layer in linears(model))


def test_transformer_growth_follows_the_init_fields():
    config = tiny_config(projection="linear", d_model=64, ffn_tokens=64, linear_std=0.05, out_scale=0.5)
    model = TokenformerLM(config).double()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        before = model(ids)
        record = grow(model, ffn_tokens=64 + 400)
        assert record.function_preserving and torch.allclose(model(ids), before, atol=1e-12, rtol=0)
    fc1, fc2 = model.layers[0].mlp.fc1.weight[64:], model.layers[0].mlp.fc2.weight[:, 64:]
    assert float(fc1.detach().std()) == pytest.approx(0.05, rel=0.1) and not fc2.any()
    grow(model, ffn_tokens=1000, key_init="random")
    assert float(model.layers[0].mlp.fc2.weight[:, 464:].std()) == pytest.approx(0.5 * config.value_init_std, rel=0.1)


def test_zero_value_tokens_train_and_refuse_dead_growth():
    config = tiny_config(value_scale={"proj": 0.0, "ffn": 0.0})
    model = TokenformerLM(config)
    assert not model.layers[0].mlp.value_param_tokens.any() and model.layers[0].attention.query.value_param_tokens.any()
    ids = torch.randint(0, 97, (2, 16))
    model(ids[:, :-1], ids[:, 1:])[1].backward()
    assert model.layers[0].mlp.value_param_tokens.grad.abs().sum() > 0
    # Zero new keys with zero new values would never train.
    with pytest.raises(ValueError, match="new proj tokens would have zero keys and zero values"):
        grow(model, qkv_tokens=30, proj_tokens=30)
    assert (model.config.qkv_tokens, model.config.proj_tokens) == (24, 20)  # refused before anything changed
    assert model.layers[0].attention.query.num_tokens == 24
    grow(model, proj_tokens=30, value_std=0.01)
    grow(model, ffn_tokens=50, key_init="random")


def test_token_weight_decay_covers_the_transformers_linears():
    for projection in ("pattention", "linear"):
        model = TokenformerLM(tiny_config(projection=projection))
        groups = {g["name"]: g for g in model.param_groups(0.1, token_weight_decay=0.0)}
        projections = {id(p) for n, p in model.named_parameters() if n.startswith("layers.")}
        assert {id(p) for p in groups["tokens"]["params"]} == projections  # blocks hold no norm weights
        assert groups["tokens"]["weight_decay"] == 0.0
        assert [id(p) for p in groups["decay"]["params"]] == [id(model.word_embeddings.weight)]
