import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")

from conftest import GPT_NEOX_TOKENIZER, tiny_config  # noqa: E402
from reference import random_released_state_dict  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.cache_utils import DynamicCache, StaticCache  # noqa: E402

from tokenformer import TokenformerLM, from_hf, grow, to_hf  # noqa: E402
from tokenformer.families import load_model, save_model  # noqa: E402
from tokenformer.interop import convert_released  # noqa: E402
from tokenformer.interop.hf import TokenformerForCausalLM, TokenformerHFConfig, TokenformerModel  # noqa: E402


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


# -- the transformers cache contract -------------------------------------------------------------


def test_past_key_values_continue_from_the_cache():
    hf = to_hf(grown_model())
    ids = torch.randint(0, 97, (2, 11))
    full = hf(ids, use_cache=False).logits
    for name in ("cache", "past_key_values"):  # transformers' new name and its old one
        first = hf(ids[:, :7])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # past_key_values is deprecated in transformers
            rest = hf(ids[:, 7:], **{name: first.cache})
        torch.testing.assert_close(rest.logits, full[:, 7:], rtol=1e-5, atol=1e-5)
        assert rest.cache is first.cache and rest.cache.get_seq_length() == 11
    with pytest.raises(ValueError, match="past_key_values"):
        hf(ids[:, 7:], cache=first.cache, past_key_values=first.cache)


def test_a_legacy_tuple_cache_is_converted_and_a_bad_one_refused():
    hf = to_hf(grown_model())
    ids = torch.randint(0, 97, (2, 9))
    full = hf(ids, use_cache=False).logits
    cache = hf(ids[:, :5]).cache
    legacy = tuple((layer.keys, layer.values) for layer in cache.layers)
    out = hf(ids[:, 5:], cache=legacy)
    torch.testing.assert_close(out.logits, full[:, 5:], rtol=1e-5, atol=1e-5)
    assert isinstance(out.cache, DynamicCache) and out.cache.get_seq_length() == 9
    allowed = r"allowed: a transformers Cache \(DynamicCache, StaticCache, \.\.\.\) or a legacy tuple of n_layers=2"
    with pytest.raises(ValueError, match=r"a legacy cache of 1 layers .*" + allowed):
        hf(ids[:, 5:], cache=legacy[:1])
    with pytest.raises(ValueError, match=r"head_dim=8\]"):
        hf(ids[:, 5:], cache=tuple((k[..., :4], v[..., :4]) for k, v in legacy))
    with pytest.raises(ValueError, match="cache must be a transformers Cache, got a dict"):
        hf(ids[:, 5:], cache={"keys": legacy})


def test_use_cache_is_a_config_field(tmp_path):
    model = grown_model()
    hf = to_hf(model)
    ids = torch.randint(0, 97, (1, 6))
    assert hf.config.use_cache is True and isinstance(hf(ids).cache, DynamicCache)
    assert hf(ids, use_cache=False).cache is None
    hf.config.use_cache = False
    assert hf(ids).cache is None and isinstance(hf(ids, use_cache=True).cache, DynamicCache)
    hf.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.use_cache is False
    assert load_model(tmp_path).config == model.config  # tokenformer's own config ignores it
    with pytest.raises(ValueError, match="use_cache must be true or false, got 'yes'"):
        TokenformerHFConfig(use_cache="yes")


def test_static_cache_generates_what_the_dynamic_cache_does():
    hf = to_hf(grown_model())
    caches = []
    hook = hf.register_forward_pre_hook(
        lambda m, args, kwargs: caches.append(type(kwargs.get("cache"))), with_kwargs=True
    )
    sequences = [torch.randint(1, 97, (n,)) for n in (3, 7)]
    ids, mask = left_padded(sequences)
    options = dict(attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0)
    dynamic = hf.generate(ids, **options)
    caches.clear()
    static = hf.generate(ids, cache_implementation="static", **options)
    hook.remove()
    assert set(caches) == {StaticCache}
    assert torch.equal(static, dynamic)


def test_transformers_4d_masks_give_the_2d_masks_logits():
    hf = to_hf(grown_model())
    sequences = [torch.randint(1, 97, (n,)) for n in (4, 8)]
    ids, mask = left_padded(sequences)
    expected = hf(ids, attention_mask=mask, use_cache=False).logits
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    allowed = (causal & mask.bool()[:, None, :]) | torch.eye(8, dtype=torch.bool)
    four_d = allowed[:, None]
    out = hf(ids, attention_mask=four_d, position_ids=positions, use_cache=False).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], expected[real])
    additive = torch.zeros(four_d.shape).masked_fill(~four_d, float("-inf"))
    torch.testing.assert_close(hf(ids, attention_mask=additive, position_ids=positions).logits[real], expected[real])
    with pytest.raises(ValueError, match=r"a 4-d attention_mask must have shape \[batch, 1, new tokens"):
        hf(ids, attention_mask=four_d[:, :, :3])


def test_export_and_fullgraph_compile_with_a_mask():
    hf = to_hf(TokenformerLM(tiny_config(n_layers=1))).eval()
    ids = torch.randint(0, 97, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    seq = torch.export.Dim("seq", min=2, max=64)
    kwargs = {"attention_mask": mask, "use_cache": False}
    shapes = {"input_ids": {1: seq}, "attention_mask": {1: seq}, "use_cache": None}
    exported = torch.export.export(hf, (ids,), kwargs, dynamic_shapes=shapes).module()
    other = torch.randint(0, 97, (2, 17))
    for i, m in ((ids, mask), (other, torch.ones_like(other))):  # padded and not: no branch was fixed
        expected = hf(i, attention_mask=m, use_cache=False).logits
        torch.testing.assert_close(exported(i, attention_mask=m, use_cache=False).logits, expected)
    # A branch on the mask's values would break the graph: fullgraph refuses that at tracing.
    compiled = torch.compile(
        lambda i, m: hf(i, attention_mask=m, use_cache=False).logits, fullgraph=True, backend="eager"
    )
    torch.testing.assert_close(compiled(ids, mask), hf(ids, **kwargs).logits)


def test_torchscript_trace_and_onnx_export_with_a_mask(tmp_path):
    hf = to_hf(TokenformerLM(tiny_config(n_layers=1))).eval()
    hf.config.use_cache, hf.config.return_dict = False, False
    ids = torch.randint(0, 97, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    traced = torch.jit.trace(hf, (ids, mask), check_trace=False)
    assert "tokenformer::" not in str(traced.inlined_graph)  # TorchScript knows no registered operator
    other = torch.randint(0, 97, (2, 10))
    for i, m in ((ids, mask), (other, torch.ones_like(other))):
        torch.testing.assert_close(traced(i, m)[0], hf(i, attention_mask=m)[0])
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "model.onnx"
    axes = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}
    torch.onnx.export(hf, (ids, mask), path, dynamo=False, input_names=list(axes), dynamic_axes=axes)
    assert {"MatMul", "Gelu", "Softmax"} <= {node.op_type for node in onnx.load(path).graph.node}


def test_resize_token_embeddings_works_in_place(tmp_path):
    hf = to_hf(grown_model())
    ids = torch.randint(0, 97, (1, 6))
    before = hf(ids).logits
    hf.resize_token_embeddings(130)
    new = torch.tensor([[5, 120, 129]])
    assert hf(new).logits.shape == (1, 3, 130)  # new ids are accepted at once
    torch.testing.assert_close(hf(ids).logits[..., :97], before)
    assert from_hf(hf).config.vocab_size == hf.config.vocab_size == 130
    hf.save_pretrained(tmp_path)
    torch.testing.assert_close(load_model(tmp_path)(new), hf(new).logits)


def test_save_pretrained_writes_the_model_card(tmp_path):
    to_hf(grown_model()).save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "TokenFormer causal language model" in card and "trust_remote_code=True" in card


def test_transformers_generate_keeps_the_decoding_weights(monkeypatch):
    from tokenformer import pattention

    model = grown_model()
    hf = to_hf(model)
    built = []
    layout = pattention.decoding_layout
    monkeypatch.setattr(pattention, "decoding_layout", lambda w: built.append(w.shape) or layout(w))
    prompt = torch.randint(1, 97, (1, 4))
    counts = {}
    for new in (4, 24, 40):
        built.clear()
        out = hf.generate(prompt, max_new_tokens=new, do_sample=False, pad_token_id=0)
        counts[new] = len(built)
    # A short generation reads the weights as stored; a longer one lays them out for decoding once
    # (the Pattentions' tokens, the output head), however many tokens it makes.
    assert counts[4] == 0 and counts[24] == counts[40] >= 3 * model.config.n_layers + 1
    assert torch.equal(out, model.generate(prompt, 40, temperature=0))
