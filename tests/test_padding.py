"""Batches of sequences of different lengths (attention masks), every layer's hidden states, and
activation checkpointing in TokenformerLM."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from tokenformer import TokenformerLM, grow
from tokenformer.model import KVCache, set_activation_checkpointing

PAD = 5  # any id: padding is masked out, whatever it holds


def grown_model() -> TokenformerLM:
    """Per-layer token counts and a tau that is not sqrt(n): every path the padding must not disturb."""
    model = TokenformerLM(tiny_config())
    grow(model, qkv_tokens=30, ffn_tokens=48, layers=[1])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def rows(lengths: list[int]) -> list[torch.Tensor]:
    return [torch.randint(0, 97, (n,)) for n in lengths]


def left_padded(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), PAD)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, width - len(s) :], mask[i, width - len(s) :] = s, 1
    return ids, mask


def right_padded(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), PAD)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return ids, mask


def test_left_padded_logits_equal_each_row_alone():
    model = grown_model()
    sequences = rows([3, 9, 6])
    ids, mask = left_padded(sequences)
    logits = model(ids, attention_mask=mask)
    for i, s in enumerate(sequences):
        torch.testing.assert_close(logits[i, -len(s) :], model(s[None])[0], rtol=1e-5, atol=1e-5)
    # What the padding holds does not matter.
    other = torch.where(mask.bool(), ids, torch.randint_like(ids, 97))
    torch.testing.assert_close(model(other, attention_mask=mask)[mask.bool()], logits[mask.bool()])


@pytest.mark.parametrize("eos", [None, 7])
def test_left_padded_batched_generation_equals_one_by_one(eos):
    model = grown_model()
    sequences = rows([4, 11, 1, 7])
    ids, mask = left_padded(sequences)
    batched = model.generate(ids, 12, temperature=0, attention_mask=mask, eos_token_id=eos)
    assert torch.equal(batched[:, : ids.shape[1]], ids)
    for i, s in enumerate(sequences):
        alone = model.generate(s[None], 12, temperature=0, eos_token_id=eos)[0, len(s) :]
        # Rows that end early are padded with EOS up to the batch's last step.
        assert torch.equal(batched[i, ids.shape[1] : ids.shape[1] + len(alone)], alone)


def test_right_padded_scoring_equals_each_row_alone():
    model = grown_model()
    sequences = rows([10, 4, 7])
    ids, mask = right_padded(sequences)
    targets = torch.where(mask.bool(), ids.roll(-1, dims=1), -100)
    for i, s in enumerate(sequences):
        targets[i, len(s) - 1] = -100  # the last token has no next one in its row
    logits, loss = model(ids, targets, attention_mask=mask)
    per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    losses = []
    for i, s in enumerate(sequences):
        alone = model(s[None, :-1], s[None, 1:])[1]
        row = per_token[i, : len(s) - 1].mean()
        torch.testing.assert_close(row, alone, rtol=1e-5, atol=1e-6)
        losses.append(alone * (len(s) - 1))
    torch.testing.assert_close(loss, sum(losses) / sum(len(s) - 1 for s in sequences), rtol=1e-5, atol=1e-6)


def test_padded_batch_with_a_cache_continues_each_row():
    model = grown_model()
    sequences = rows([2, 6])
    ids, mask = left_padded(sequences)
    cache = KVCache(model.config.n_layers, ids.shape[1] + 3)
    model(ids, cache=cache, attention_mask=mask)
    step = torch.randint(0, 97, (2, 3))
    full_mask = torch.cat((mask, torch.ones_like(step)), 1)
    chunk = model(step, cache=cache, attention_mask=full_mask)
    for i, s in enumerate(sequences):
        alone = model(torch.cat((s, step[i]))[None])[0, -3:]
        torch.testing.assert_close(chunk[i], alone, rtol=1e-5, atol=1e-5)


def test_padding_errors():
    model = grown_model()
    ids, mask = left_padded(rows([3, 5]))
    with pytest.raises(ValueError, match=r"attention_mask must be an integer or bool tensor of shape .*\[2, 5\]"):
        model(ids, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="attention_mask must be an integer or bool tensor"):
        model(ids, attention_mask=mask.float())
    with pytest.raises(ValueError, match=r"position_ids must have shape \[batch, seq\] = \[2, 5\]"):
        model(ids, position_ids=torch.arange(4)[None])
    right, right_mask = right_padded(rows([3, 5]))
    with pytest.raises(ValueError, match="generate needs prompts padded on the left"):
        model.generate(right, 2, attention_mask=right_mask)
    with pytest.raises(ValueError, match="attention_mask must have the prompt's shape"):
        model.generate(ids, 2, attention_mask=mask[:1])


def test_hidden_states_of_every_layer():
    model = grown_model()
    ids = torch.randint(0, 97, (2, 8))
    states = model.hidden_states(ids, every_layer=True)
    assert len(states) == model.config.n_layers + 1
    assert torch.equal(states[0], model.word_embeddings(ids))
    assert torch.equal(model.logits(states[-1]), model(ids))
    assert torch.equal(model.hidden_states(ids)[0], states[-1])


def saved_bytes(model: TokenformerLM, ids: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward (each storage once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, ids)[1].backward()
    return sum(storages.values())


def test_activation_checkpointing_keeps_gradients_and_drops_block_activations():
    torch.manual_seed(0)
    model = TokenformerLM(tiny_config(n_layers=4)).train()
    ids = torch.randint(0, 97, (4, 48))
    loss = model(ids, ids)[1]
    loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    kept = saved_bytes(model, ids)

    model.zero_grad()
    set_activation_checkpointing(model)
    assert all(block.checkpoint_fn is not None for block in model.layers)
    checkpointed_loss = model(ids, ids)[1]
    checkpointed_loss.backward()
    assert torch.equal(checkpointed_loss, loss)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, expected[name]), name
    # The blocks' activations are no longer kept: only the embedding's, the head's and the loss's.
    assert saved_bytes(model, ids) < kept / 3

    set_activation_checkpointing(model, every_n_layers=2)
    assert [block.checkpoint_fn is not None for block in model.layers] == [True, False, True, False]
    set_activation_checkpointing(model, False)
    assert all(block.checkpoint_fn is None for block in model.layers)
    with torch.no_grad():  # nothing to recompute without gradients, generation with a cache included
        set_activation_checkpointing(model)
        assert model.generate(ids[:1, :4], 3, temperature=0).shape == (1, 7)


def test_activation_checkpointing_errors():
    with pytest.raises(ValueError, match="Linear has no transformer blocks"):
        set_activation_checkpointing(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="every_n_layers must be a positive integer, got 0"):
        set_activation_checkpointing(TokenformerLM(tiny_config()), every_n_layers=0)
