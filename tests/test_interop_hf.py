import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")

from conftest import GPT_NEOX_TOKENIZER, tiny_config  # noqa: E402
from reference import random_released_state_dict  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from tokenformer import TokenformerLM, from_hf, grow, to_hf  # noqa: E402
from tokenformer.families import load_model, save_model  # noqa: E402
from tokenformer.interop import convert_released  # noqa: E402
from tokenformer.interop.hf import TokenformerForCausalLM, TokenformerModel  # noqa: E402


def grown_model() -> TokenformerLM:
    """A model grown in one layer only: per-layer token counts and a tau that is not sqrt(n)."""
    model = TokenformerLM(tiny_config())
    grow(model, qkv_tokens=30, ffn_tokens=48, layers=[1])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # new zero keys get weight, so every token matters
    return model.eval()


def test_save_pretrained_and_from_pretrained_keep_logits_of_a_grown_model(tmp_path):
    model = grown_model()
    ids = torch.randint(0, 97, (2, 12))
    save_model(model, tmp_path / "ours")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert isinstance(hf, TokenformerForCausalLM)
    assert hf.config.layer_tokens == model.config.layer_tokens
    assert (
        float(hf.layers[1].attention.query.tau) == float(model.layers[1].attention.query.tau) == pytest.approx(24**0.5)
    )
    assert torch.equal(hf(ids).logits, model(ids))
    hf.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(ids).logits, model(ids))
    assert torch.equal(load_model(tmp_path / "hf")(ids), model(ids))


def test_to_hf_and_back_share_the_model():
    model = grown_model()
    hf = to_hf(model)
    ids = torch.randint(0, 97, (1, 8))
    assert torch.equal(hf(ids).logits, model(ids))
    assert hf.word_embeddings.weight.data_ptr() == model.word_embeddings.weight.data_ptr()
    back = from_hf(hf)
    assert isinstance(back, TokenformerLM) and back.config == model.config
    assert back.word_embeddings is hf.word_embeddings
    assert torch.equal(back(ids), model(ids))


def test_a_vision_model_is_refused_by_name(tmp_path):
    from tokenformer.vision import TokenformerViT, VisionConfig

    vit = TokenformerViT(VisionConfig.from_preset("fmnist-0.3M"))
    with pytest.raises(ValueError, match=r"to_hf takes a language model; got a TokenformerViT \(tokenformer-vit\)"):
        to_hf(vit)
    with pytest.raises(ValueError, match="model type `tokenformer-vit`"):
        AutoModelForCausalLM.from_pretrained(save_model(vit, tmp_path / "vit"))


def test_loss_uses_transformers_label_convention():
    hf = to_hf(grown_model())
    ids = torch.randint(0, 97, (2, 10))
    out = hf(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_greedy_generate_equals_tokenformer_generate_and_uses_the_cache():
    model = grown_model()
    hf = to_hf(model)
    prompt = torch.randint(1, 97, (2, 5))  # without the pad id, so transformers masks nothing
    lengths = []
    hook = hf.word_embeddings.register_forward_hook(lambda module, args, out: lengths.append(args[0].shape[1]))
    out = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    hook.remove()
    assert torch.equal(out, model.generate(prompt, 20, temperature=0))
    # One prefill of the prompt, then one token per step: the cache is used.
    assert lengths == [5] + [1] * 19


def left_padded(sequences: list[torch.Tensor], pad: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, width - len(s) :], mask[i, width - len(s) :] = s, 1
    return ids, mask


def test_left_padded_batched_generate_equals_one_by_one():
    model = grown_model()
    hf = to_hf(model)
    sequences = [torch.randint(1, 97, (n,)) for n in (3, 9, 6)]
    ids, mask = left_padded(sequences)
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    new = out[:, ids.shape[1] :]
    assert torch.equal(out, model.generate(ids, 12, temperature=0, attention_mask=mask))
    for i, s in enumerate(sequences):
        alone = hf.generate(s[None], max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(s) :]
        assert torch.equal(new[i], alone)


def test_right_padded_labels_score_each_row_as_alone():
    hf = to_hf(grown_model())
    sequences = [torch.randint(1, 97, (n,)) for n in (8, 3, 5)]
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, s in enumerate(sequences):
        ids[i, : len(s)], mask[i, : len(s)], labels[i, : len(s)] = s, 1, s
    loss = hf(ids, attention_mask=mask, labels=labels).loss
    alone = [hf(s[None], labels=s[None]).loss * (len(s) - 1) for s in sequences]
    torch.testing.assert_close(loss, sum(alone) / sum(len(s) - 1 for s in sequences), rtol=1e-5, atol=1e-6)


def test_hidden_states_and_the_base_model(tmp_path):
    model = grown_model()
    ids = torch.randint(0, 97, (2, 7))
    out = to_hf(model)(ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.n_layers + 1
    assert torch.equal(out.hidden_states[-1], model.hidden_states(ids)[0])
    assert to_hf(model)(ids).hidden_states is None
    save_model(model, tmp_path)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, TokenformerModel)
    base_out = base(ids, output_hidden_states=True)
    assert torch.equal(base_out.last_hidden_state, out.hidden_states[-1])
    assert all(torch.equal(a, b) for a, b in zip(base_out.hidden_states, out.hidden_states, strict=True))
    with pytest.raises(ValueError, match="returns no attention weights; allowed: output_attentions=False"):
        base(ids, output_attentions=True)


def test_gradient_checkpointing_gives_the_same_gradients():
    hf = to_hf(grown_model()).train()
    ids = torch.randint(0, 97, (2, 16))
    hf(ids, labels=ids).loss.backward()
    expected = {name: p.grad.clone() for name, p in hf.named_parameters()}
    hf.zero_grad()
    hf.activation_checkpointing_enable()
    assert hf.is_activation_checkpointing
    hf(ids, labels=ids).loss.backward()
    for name, p in hf.named_parameters():
        assert torch.equal(p.grad, expected[name]), name
    hf.activation_checkpointing_disable()
    assert not hf.is_activation_checkpointing
    with pytest.warns(FutureWarning):  # transformers' older name for it
        hf.gradient_checkpointing_enable()
    assert hf.is_activation_checkpointing


def test_sdpa_attention_is_what_it_runs(tmp_path):
    model = grown_model()
    save_model(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert hf.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 97, (1, 9))
    assert torch.equal(hf(ids).logits, model(ids))


def test_converted_release_loads_with_auto_classes(tmp_path):
    tokens = {"qkv": 24, "proj": 20, "ffn": 40}
    state = random_released_state_dict(97, 32, [tokens, tokens])
    tokenizer = GPT_NEOX_TOKENIZER if GPT_NEOX_TOKENIZER.is_file() else None
    convert_released(state, tmp_path, n_heads=4, tokenizer=tokenizer)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "tokenformer"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 97, (1, 9))
    assert torch.equal(hf(ids).logits, load_model(tmp_path)(ids))
    if tokenizer is not None:
        assert AutoTokenizer.from_pretrained(tmp_path)("Hello world")["input_ids"] == [12092, 1533]


def test_importing_tokenformer_does_not_import_transformers():
    code = "import sys, tokenformer; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False"]


def test_registration_when_transformers_was_loaded_first(monkeypatch):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    from tokenformer.interop import registration
    from tokenformer.interop.hf import TokenformerHFConfig

    # As in a process that imported transformers' Auto classes before tokenformer.
    monkeypatch.setattr(CONFIG_MAPPING, "_extra_content", {})
    monkeypatch.setattr(MODEL_FOR_CAUSAL_LM_MAPPING, "_extra_content", {})
    monkeypatch.setattr(MODEL_MAPPING, "_extra_content", {})
    assert "tokenformer" not in CONFIG_MAPPING
    registration.install()
    assert CONFIG_MAPPING["tokenformer"] is TokenformerHFConfig
    assert MODEL_FOR_CAUSAL_LM_MAPPING[TokenformerHFConfig] is TokenformerForCausalLM
    assert MODEL_MAPPING[TokenformerHFConfig] is TokenformerModel
