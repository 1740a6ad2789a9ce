import pytest
import torch
from conftest import tiny_config

from tokenformer import TokenformerLM, grow
from tokenformer.growth import RowUpdateScale
from tokenformer.pattention import normalise_scores
from tokenformer.sparse_finetuning import (
    chosen_tokens,
    freeze_all_but_memory_values,
    freeze_all_but_tokens,
    load_usage,
    memory_tables,
    pattentions,
    save_usage,
    slot_usage,
    token_scores,
    token_usage,
    trainable_rows,
    trainable_slots,
)


def batches(low, high, count=2):
    """Token batches drawn from the ids ``low..high-1`` only: two corpora that use different tokens."""
    return [torch.randint(low, high, (2, 12)) for _ in range(count)]


def train_masked(model, rows):
    """Three AdamW steps (with weight decay) on new-corpus batches, each parameter's update scaled
    per row by ``rows``; the parameters before them, by name."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    mask = RowUpdateScale(opt, rows)
    for ids in batches(50, 97, 3):
        model(ids[:, :-1], ids[:, 1:])[1].backward()
        opt.step()
        opt.zero_grad()
    mask.remove()
    return before


def test_usage_is_each_layers_share_of_the_mean_absolute_normalised_score():
    model = TokenformerLM(tiny_config())
    torch.manual_seed(1)
    usage = token_usage(model, batches(0, 97))
    torch.manual_seed(1)
    assert set(usage) == {name for name, _ in pattentions(model)}
    for name, share in usage.items():
        assert share.dtype == torch.float64 and share.min() >= 0
        assert share.sum().item() == pytest.approx(1.0), name
    layer, inputs = model.layers[1].mlp, []
    handle = layer.register_forward_hook(lambda _m, args, _out: inputs.append(args[0].reshape(-1, 32)))
    with torch.no_grad():
        for ids in batches(0, 97):
            model(ids)
    handle.remove()
    x = torch.cat(inputs)
    mean = normalise_scores(x @ layer.key_param_tokens.T, layer.norm, layer.tau).abs().double().mean(dim=0)
    torch.testing.assert_close(usage["layers.1.mlp"], mean / mean.sum())


def test_usage_counts_both_groups_of_a_separately_grown_layer():
    model = TokenformerLM(tiny_config())
    grow(model, ffn_tokens=50, normalisation="separate")
    usage = token_usage(model, batches(0, 97))
    assert usage["layers.0.mlp"].shape == (50,) and usage["layers.0.mlp"][40:].sum() > 0


def test_scores_favour_tokens_the_new_data_uses_and_the_old_does_not():
    old = {"layer": torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64)}
    new = {"layer": torch.tensor([0.4, 0.1, 0.4, 0.1], dtype=torch.float64)}
    scores = token_scores(new, old)["layer"]
    assert scores.argmax().item() == 2 and scores[3] > scores[0]  # unused by the old data wins
    assert chosen_tokens({"layer": scores}, 2)["layer"].tolist() == [2, 3]
    assert chosen_tokens({"layer": scores}, 9)["layer"].tolist() == [0, 1, 2, 3]  # a budget above the count
    with pytest.raises(ValueError, match="a token budget must be a positive integer, got 0"):
        chosen_tokens({"layer": scores}, 0)
    with pytest.raises(ValueError, match="usage of different layers"):
        token_scores(new, {"other": old["layer"]})


def test_only_the_chosen_rows_move_and_the_rest_stay_bit_for_bit():
    model = TokenformerLM(tiny_config())
    usage_old, usage_new = token_usage(model, batches(0, 40)), token_usage(model, batches(50, 97))
    chosen = chosen_tokens(token_scores(usage_new, usage_old), 3)
    freeze_all_but_tokens(model)
    before = train_masked(model, trainable_rows(model, chosen))
    for name, param in model.named_parameters():
        if not name.endswith(("key_param_tokens", "value_param_tokens")):
            assert torch.equal(param, before[name]), name
            continue
        rows = chosen[name.rsplit(".", 1)[0]]
        frozen = torch.ones(param.shape[0], dtype=torch.bool)
        frozen[rows] = False
        assert torch.equal(param[frozen], before[name][frozen]), name
        assert not torch.equal(param[rows], before[name][rows]), name


def test_usage_statistics_round_trip(tmp_path):
    model = TokenformerLM(tiny_config())
    new, old = token_usage(model, batches(50, 97)), token_usage(model, batches(0, 40))
    save_usage(tmp_path / "usage.safetensors", new, old)
    loaded_new, loaded_old = load_usage(tmp_path / "usage.safetensors")
    assert all(torch.equal(loaded_new[k], new[k]) and torch.equal(loaded_old[k], old[k]) for k in new)


MEMORY = dict(memory_layers=[1], memory_sub_keys=4, memory_top_k=3, memory_heads=2)


def test_slot_usage_is_each_tables_share_of_the_selected_weights():
    model = TokenformerLM(tiny_config(**MEMORY))
    ((name, table),) = memory_tables(model)
    data = batches(0, 97)
    usage = slot_usage(model, data)[name]
    assert usage.shape == (2 * 16,) and usage.dtype == torch.float64
    assert usage.sum().item() == pytest.approx(1.0)
    inputs = []
    handle = table.register_forward_hook(lambda _m, args, _out: inputs.append(args[0].reshape(-1, 32)))
    model.eval()
    with torch.no_grad():
        for ids in data:
            model(ids)
        handle.remove()
        scores, slots = table.select(table.query(torch.cat(inputs)))
        weights = normalise_scores(scores, table.norm, table.tau).abs().double()
    expected = torch.zeros(32, dtype=torch.float64).index_add_(0, slots.flatten(), weights.flatten())
    torch.testing.assert_close(usage, expected / expected.sum())
    with pytest.raises(ValueError, match="slot usage needs a model with a sparse memory; this one has none"):
        slot_usage(TokenformerLM(tiny_config()), batches(0, 97))


def test_only_the_chosen_slots_values_move():
    model = TokenformerLM(tiny_config(**MEMORY))
    usage_old, usage_new = slot_usage(model, batches(0, 40)), slot_usage(model, batches(50, 97))
    chosen = chosen_tokens(token_scores(usage_new, usage_old), 4)
    freeze_all_but_memory_values(model)
    assert len([p for p in model.parameters() if p.requires_grad]) == 1
    before = train_masked(model, trainable_slots(model, chosen))
    ((table_name, _),) = memory_tables(model)
    rows = chosen[table_name]
    for name, param in model.named_parameters():
        if name != f"{table_name}.value_param_tokens":
            assert torch.equal(param, before[name]), name
            continue
        frozen = torch.ones(param.shape[0], dtype=torch.bool)
        frozen[rows] = False
        assert torch.equal(param[frozen], before[name][frozen])
        assert not torch.equal(param[rows], before[name][rows])
    with pytest.raises(ValueError, match="no chosen slots for layers.1.memory.0"):
        trainable_slots(model, {})
