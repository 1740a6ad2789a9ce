"""LoRA (peft) on Pattention layers named by target_modules, on the transformers classes."""

import pytest
import torch

pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")
peft = pytest.importorskip("peft", reason="peft is not installed (the test extra brings it)")

from conftest import tiny_config  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from tokenformer import Pattention, TokenformerLM, to_hf  # noqa: E402
from tokenformer.lora import projection_names  # noqa: E402

PROJECTIONS = ["query", "key", "value", "proj", "mlp"]


def model(**overrides):
    torch.manual_seed(0)
    return to_hf(TokenformerLM(tiny_config(**overrides)))


def train(peft_model, ids, steps=3):
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_target_modules_adapt_the_tokens_of_every_pattention_and_merge(tmp_path):
    hf = model()
    ids = torch.randint(0, 97, (2, 10))
    base = hf(ids).logits.detach()
    config = hf.prepare_lora_config(LoraConfig(r=4, target_modules=PROJECTIONS))
    tuned = get_peft_model(hf, config)
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    # A low-rank update of the key and of the value tokens of all ten Pattentions; nothing else trains.
    assert len(trainable) == 2 * 2 * 10 and all(".lora_" in n for n in trainable)
    torch.testing.assert_close(tuned(input_ids=ids).logits, base)  # B starts at zero
    train(tuned, ids)
    adapted = tuned(input_ids=ids).logits.detach()
    assert (adapted - base).abs().max() > 1e-2
    tuned.save_pretrained(tmp_path)
    merged = tuned.merge_and_unload()
    assert all(type(m.attention.query) is Pattention and type(m.mlp) is Pattention for m in merged.layers)
    torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-5, atol=1e-5)
    # A saved adapter loads onto the base model (peft keeps no registration: prepare the config again).
    fresh = model()
    loaded = PeftModel.from_pretrained(
        fresh, tmp_path, config=fresh.prepare_lora_config(LoraConfig.from_pretrained(tmp_path))
    )
    torch.testing.assert_close(loaded(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_embeddings_and_modules_to_save_reach_the_model_the_wrapper_runs(tmp_path):
    hf = model()
    ids = torch.randint(0, 97, (2, 10))
    config = LoraConfig(r=4, target_modules=["word_embeddings"], modules_to_save=["final_norm"])
    tuned = get_peft_model(hf, hf.prepare_lora_config(config))
    train(tuned, ids)  # gradients reach the embedding's adapter and the norm's trained copy
    norm = tuned.base_model.model.final_norm
    assert not torch.equal(norm.modules_to_save["default"].weight, norm.original_module.weight)
    adapted = tuned(input_ids=ids).logits.detach()
    tuned.save_pretrained(tmp_path)
    # The tied head reads the adapted embedding too: merging changes nothing.
    torch.testing.assert_close(tuned.merge_and_unload()(ids).logits, adapted, rtol=1e-5, atol=1e-5)
    fresh = model()
    loaded = PeftModel.from_pretrained(
        fresh, tmp_path, config=fresh.prepare_lora_config(LoraConfig.from_pretrained(tmp_path))
    )
    torch.testing.assert_close(loaded(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("projection", ["pattention", "linear"])
def test_all_linear_names_every_projection(projection):
    hf = model(projection=projection)
    config = hf.prepare_lora_config(LoraConfig(r=2, target_modules="all-linear"))
    expected = PROJECTIONS if projection == "pattention" else ["fc1", "fc2", "key", "proj", "query", "value"]
    assert sorted(config.target_modules) == sorted(expected) == projection_names(hf)
    tuned = get_peft_model(hf, config)
    assert sum(".lora_A." in n for n, _ in tuned.named_parameters()) == (20 if projection == "pattention" else 12)


def test_target_parameters_still_work():
    hf = model()
    config = LoraConfig(r=2, target_modules=[], target_parameters=["key_param_tokens", "value_param_tokens"])
    tuned = get_peft_model(hf, hf.prepare_lora_config(config))
    assert sum(".lora_A." in n for n, _ in tuned.named_parameters()) == 20


def test_options_that_cannot_work_are_refused():
    hf = model()
    with pytest.raises(ValueError, match="lora_dropout must be 0, got 0.1"):
        hf.prepare_lora_config(LoraConfig(r=2, target_modules=PROJECTIONS, lora_dropout=0.1))
    with pytest.raises(ValueError, match="prepare_lora_config takes a peft LoraConfig, got a IA3Config"):
        hf.prepare_lora_config(peft.IA3Config(target_modules=PROJECTIONS, feedforward_modules=["mlp"]))
