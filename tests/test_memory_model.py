"""The language model with sparse memory layers (docs/sparse-memory.md)."""

import math

import pytest
import torch
from conftest import tiny_config

from tokenformer import (
    PRESETS,
    SparsePattention,
    TokenformerConfig,
    TokenformerLM,
    count_parameters,
    grow,
    grow_memory,
    load_model,
    memory_usage,
    save_model,
    stack_layers,
    training_flops_per_token,
)
from tokenformer.flops import memory_flops_per_token
from tokenformer.sparse_pattention import SparseMemory

MEMORY = dict(memory_layers=[1], memory_sub_keys=4, memory_top_k=3, memory_heads=2)


def test_memory_is_off_by_default_and_every_preset_without_it_is_unchanged():
    config = tiny_config()
    assert config.memory_layers == []
    model = TokenformerLM(config)
    assert all(block.memory is None for block in model.layers)
    assert not any("memory" in key for key in model.state_dict())
    for name in PRESETS:
        preset = TokenformerConfig.from_preset(name)
        if not preset.memory_layers:
            assert count_parameters(preset, active=True) == count_parameters(preset)


@pytest.mark.parametrize("position", ["beside", "replace"])
def test_memory_layers_build_count_and_run(position):
    config = tiny_config(**MEMORY, memory_position=position)
    model = TokenformerLM(config)
    memory = model.layers[1].memory
    assert isinstance(memory, SparseMemory) and isinstance(memory[0], SparsePattention)
    assert model.layers[0].memory is None
    assert (model.layers[1].mlp is None) == (position == "replace")
    assert model.layers[1].modules_of_kind("ffn") == ([] if position == "replace" else [("mlp", model.layers[1].mlp)])
    assert sum(p.numel() for p in model.parameters()) == count_parameters(config)
    # Active: the sub-keys (2 heads x 4 x 32) and 3 values per head, instead of 16.
    assert count_parameters(config) - count_parameters(config, active=True) == 2 * (16 - 3) * 32
    ids = torch.randint(0, config.vocab_size, (2, 8))
    logits, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    assert memory[0].value_param_tokens.grad.abs().sum() > 0
    assert memory[0].sub_key_tokens.grad.abs().sum() > 0


def test_flops_count_what_a_token_computes():
    config = tiny_config(**MEMORY)
    d = config.d_model
    # Per head: sub-key scores 2 * 4 * d, 3 * 3 candidate sums, 3 gathered values 2 * 3 * d.
    assert memory_flops_per_token(config) == 2 * (2 * 4 * d + 9 + 2 * 3 * d)
    plain = training_flops_per_token(tiny_config())
    assert training_flops_per_token(config) == plain + 3 * memory_flops_per_token(config)
    replaced = tiny_config(**MEMORY, memory_position="replace")
    ffn = 2 * 2 * d * config.ffn_tokens
    assert training_flops_per_token(replaced) == training_flops_per_token(config) - 3 * ffn


def test_save_load_round_trip_and_generation_with_cache(tmp_path):
    model = TokenformerLM(tiny_config(**MEMORY, memory_query_norm="batch")).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    save_model(model, tmp_path / "memory")
    loaded = load_model(tmp_path / "memory").eval()
    assert loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
        full = model.generate(ids, 4, temperature=0)
        # Cached decoding reads the memory token by token: it must continue as a full forward would.
        again = [ids]
        for _ in range(4):
            again.append(model(torch.cat(again, 1))[:, -1].argmax(-1, keepdim=True))
    assert torch.equal(full, torch.cat(again, 1))


def test_memory_presets_are_valid_and_sparse():
    for name in ("cpu-1M-memory", "cpu-5M-memory"):
        config = TokenformerConfig.from_preset(name)
        assert config.memory_layers
        assert count_parameters(config, active=True) < count_parameters(config)


def test_memory_values_have_their_own_group():
    model = TokenformerLM(tiny_config(**MEMORY))
    groups = {g["name"]: g for g in model.param_groups(0.1, memory_lr_scale=4.0)}
    values = groups["memory"]["params"]
    assert values == [model.layers[1].memory[0].value_param_tokens]
    assert groups["memory"]["weight_decay"] == 0.0 and groups["memory"]["lr_scale"] == 4.0
    assert not any(p is values[0] for name in ("decay", "no_decay") for p in groups[name]["params"])
    decayed = {g["name"]: g["weight_decay"] for g in model.param_groups(0.1, memory_weight_decay=0.01)}
    assert decayed["memory"] == 0.01
    assert [g["name"] for g in TokenformerLM(tiny_config()).param_groups(0.1)] == ["decay", "no_decay"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(memory_layers=[2]), r"memory_layers=\[2\] is invalid; allowed: a list of distinct layer indices 0..1"),
        (dict(memory_layers=[1, 1]), "memory_layers=.* is invalid; allowed: a list of distinct"),
        (dict(memory_sub_keys=0), "memory_sub_keys=0 is invalid; allowed: a positive integer or a non-empty list"),
        (dict(memory_sub_keys=[]), r"memory_sub_keys=\[\] is invalid"),
        (dict(memory_top_k=17), r"memory_top_k=17 is invalid; allowed: at most memory_sub_keys\*\*2 = 16"),
        (dict(memory_heads=0), "memory_heads=0 is invalid; allowed: a positive integer"),
        (dict(memory_position="after"), "memory_position='after' is invalid; allowed: beside, replace"),
        (dict(memory_query_norm="rms"), "memory_query_norm='rms' is invalid; allowed: none, layer, batch"),
    ],
)
def test_memory_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**{**MEMORY, **overrides})


@pytest.mark.usefixtures("one_thread")
def test_training_scales_the_memory_learning_rate_and_resumes(tmp_path, corpus_file, cache_dir):
    from conftest import tiny_train_options

    from tokenformer.train import TrainConfig, Trainer

    def trainer(**overrides):
        options = tiny_train_options(corpus_file, cache_dir, tmp_path / "run", max_steps=2, ckpt_interval=2)
        options["model_overrides"] = {**options["model_overrides"], **MEMORY, "memory_layers": [0]}
        return Trainer(TrainConfig(**{**options, "memory_lr_scale": 3.0, **overrides}))

    first = trainer()
    first.fit()
    first.close()
    groups = {g["name"]: g for g in first.optimizer.param_groups}
    assert groups["memory"]["lr"] == pytest.approx(3.0 * groups["decay"]["lr"])
    assert groups["memory"]["weight_decay"] == 0.0
    # A resumed run takes the options in force.
    resumed = trainer(resume="auto", max_steps=3, memory_lr_scale=2.0, memory_weight_decay=0.01)
    resumed.fit()
    resumed.close()
    groups = {g["name"]: g for g in resumed.optimizer.param_groups}
    assert groups["memory"]["lr"] == pytest.approx(2.0 * groups["decay"]["lr"])
    assert groups["memory"]["weight_decay"] == 0.01


def test_vision_blocks_take_a_memory_too():
    from tokenformer import TokenformerViT, VisionConfig
    from tokenformer.flops import count_vision_parameters

    config = VisionConfig.from_preset("fmnist-0.3M", **MEMORY)
    model = TokenformerViT(config)
    assert sum(p.numel() for p in model.parameters()) == count_vision_parameters(config)
    logits = model(torch.randn(2, 1, 28, 28))
    assert logits.shape == (2, config.num_classes)


def test_the_released_layout_refuses_a_memory():
    from tokenformer.interop.released import ours_to_released

    with pytest.raises(ValueError, match=r"the released layout has no sparse memory; .* layers \[1\]"):
        ours_to_released(TokenformerLM(tiny_config(**MEMORY)))


def trained(model, steps=3):
    """A few AdamW steps at a high rate, so that growth is tested on weights far from their init."""
    optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=1e-2)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 12))
        _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("query_norm", ["none", "batch"])
def test_grow_memory_keeps_the_function_exactly_and_trains_the_new_table(tmp_path, query_norm):
    model = TokenformerLM(tiny_config(**MEMORY, memory_query_norm=query_norm))
    trained(model)
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    with torch.no_grad():
        before = model(ids)
        record = grow_memory(model, sub_keys=5)
        after = model(ids)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert record.before == [4] and record.after == [4, 5] and model.config.memory_sub_keys == [4, 5]
    table = model.layers[1].memory[1]
    assert table.num_tokens == 25 and not table.training
    assert [name for name, _ in record.new_parameters][:2] == [
        "layers.1.memory.1.sub_key_tokens",
        "layers.1.memory.1.value_param_tokens",
    ]
    assert sum(p.numel() for p in model.parameters()) == count_parameters(model.config)
    # The new values get gradient from the first step (random keys, zero values).
    model.train()
    _, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    assert table.value_param_tokens.grad.abs().sum() > 0
    # The grown model saves and loads with its tables.
    save_model(model.eval(), tmp_path / "grown")
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "grown").eval()(ids), model(ids), rtol=0, atol=0)


def test_grow_memory_errors():
    with pytest.raises(ValueError, match=r"grow_memory needs a model with a sparse memory; .*memory_layers=\[\]"):
        grow_memory(TokenformerLM(tiny_config()), sub_keys=4)
    model = TokenformerLM(tiny_config(**{**MEMORY, "memory_top_k": 5}))
    with pytest.raises(ValueError, match="sub_keys=2 is invalid; allowed: .* memory_top_k=5 \\(at least 3\\)"):
        grow_memory(model, sub_keys=2)
    # Memories are named by layer index: depth growth, which moves and copies blocks, is refused.
    for what, call in (("grow", lambda m: grow(m, n_layers=3)), ("stack_layers", lambda m: stack_layers(m, 3))):
        with pytest.raises(ValueError, match=rf"{what} cannot grow the depth of a model with a sparse memory"):
            call(model)
        assert model.config.n_layers == 2 and len(model.layers) == 2


def test_weight_averaging_refuses_a_batch_normalised_memory_query(tmp_path, corpus_file, cache_dir):
    from conftest import tiny_train_options

    from tokenformer.train import TrainConfig, Trainer

    options = tiny_train_options(corpus_file, cache_dir, tmp_path / "run", ema_decay=0.9)
    options["model_overrides"] = {**options["model_overrides"], **MEMORY, "memory_layers": [0]}
    with pytest.raises(ValueError, match="ema_decay=0.9 cannot average a model with a batch-normalised memory query"):
        Trainer(
            TrainConfig(**{**options, "model_overrides": {**options["model_overrides"], "memory_query_norm": "batch"}})
        )


@pytest.mark.parametrize("position", ["beside", "replace"])
def test_token_growth_and_pruning_leave_the_memory_alone(position):
    from tokenformer import grow, prune

    model = TokenformerLM(tiny_config(**MEMORY, memory_position=position)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    memory = {k: v.clone() for k, v in model.layers[1].memory.state_dict().items()}
    with torch.no_grad():
        before = model(ids)
        grow(model, qkv_tokens=30, ffn_tokens=48)
        torch.testing.assert_close(model(ids), before)
    prune(model, ffn_tokens=20)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(model.config)
    for key, value in model.layers[1].memory.state_dict().items():
        assert torch.equal(value, memory[key]), key


def test_memory_usage_of_a_memory_read_whole_is_complete_and_uniform():
    # top_k == sub_keys**2: every input row selects every token of every head once.
    model = TokenformerLM(tiny_config(**{**MEMORY, "memory_top_k": 16})).train()
    grow_memory(model, sub_keys=4)
    batches = [torch.randint(0, model.config.vocab_size, (2, 5)) for _ in range(3)]
    usage = memory_usage(model, batches)
    assert model.training
    assert list(usage) == ["layers.1.memory.0", "layers.1.memory.1"]
    for stats in usage.values():
        assert stats["tokens"] == stats["selected"] == 2 * 16
        assert stats["share"] == 1.0 and stats["kl_uniform"] == pytest.approx(0.0, abs=1e-12)
        assert torch.equal(stats["counts"], torch.full((32,), 3 * 2 * 5))


class Queries(torch.nn.Module):
    """A memory read by the given queries directly."""

    def __init__(self, table: SparsePattention) -> None:
        super().__init__()
        self.memory = SparseMemory([table])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.memory(x)


def test_memory_usage_counts_every_selection():
    # Two heads of 2 x 2 tokens reading 2-wide queries; head 1's sub-keys are head 0's negated.
    # The score of token (i, j) is x1 * K1_i + x2 * K2_j, so with K1 = K2 = [1, -1] the best token
    # is (sign x1 < 0, sign x2 < 0) in head 0 and the opposite in head 1.
    table = SparsePattention(2, 2, sub_keys=2, top_k=1, heads=2)
    with torch.no_grad():
        half = torch.tensor([[1.0], [-1.0]])
        table.sub_key_tokens.copy_(torch.stack([torch.stack([half, half]), torch.stack([-half, -half])]))
    queries = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    stats = memory_usage(Queries(table), [queries[:3], queries[3:]])["memory.0"]
    # Head 0: (0, 0) twice, (0, 1) once, (1, 1) once; head 1 (tokens 4..7): (1, 1) twice, (1, 0), (0, 0).
    assert stats["counts"].tolist() == [2, 1, 0, 1, 1, 0, 1, 2]
    assert (stats["tokens"], stats["selected"], stats["share"]) == (8, 6, 0.75)
    # p = [2, 1, 0, 1, 1, 0, 1, 2] / 8: sum p log(8 p) = 4 * (2 / 8) log 2 + 4 * (1 / 8) log 1.
    assert stats["kl_uniform"] == pytest.approx(0.5 * math.log(2), rel=1e-12)


def test_memory_usage_refuses_a_model_without_memory():
    refused = r"memory_usage needs a model with a sparse memory; this one has memory_layers=\[\]; allowed: "
    with pytest.raises(ValueError, match=refused):
        memory_usage(TokenformerLM(tiny_config()), [torch.zeros(1, 4, dtype=torch.long)])
    with pytest.raises(ValueError, match="memory_usage needs at least one batch"):
        memory_usage(TokenformerLM(tiny_config(**MEMORY)), [])
