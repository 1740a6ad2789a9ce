import re

import pytest
import torch
from conftest import GPT_NEOX_TOKENIZER, tiny_config
from reference import random_released_state_dict, reference_logits, released_weights

from tokenformer import TokenformerLM, grow
from tokenformer.cli import main as cli
from tokenformer.families import load_model
from tokenformer.interop import CheckpointMismatchError, infer_config, load_released, ours_to_released, read_released
from tokenformer.interop.tokenizer import TOKENIZER_NAME, load_tokenizer


def cli_error(args, capsys) -> str:
    """Run the command line expecting it to fail; its error message."""
    with pytest.raises(SystemExit):
        cli(args)
    return capsys.readouterr().err


# Distinct counts for qkv, proj and ffn, as in tiny_config.
TOKENS = {"qkv": 24, "proj": 20, "ffn": 40}
needs_tokenizer = pytest.mark.skipif(
    not GPT_NEOX_TOKENIZER.is_file(), reason=f"GPT-NeoX tokenizer not found at {GPT_NEOX_TOKENIZER}"
)


def released_file(tmp_path, layer_tokens=(TOKENS, TOKENS), vocab_size=97):
    state = random_released_state_dict(vocab_size, 32, list(layer_tokens))
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    return path, state


def test_released_layout_logits_match_plain_float64_reference(tmp_path):
    path, state = released_file(tmp_path)
    model = load_released(path, n_heads=4)
    assert model.config == tiny_config(max_seq_len=2048, value_scale=1.0)  # the release's value init
    assert model.word_embeddings.weight.dtype == torch.float32
    ids = torch.randint(0, 97, (2, 11))
    expected = reference_logits(released_weights(state), ids, n_heads=4)
    # In float64 the only rounding left is tau, held in the checkpoint's float32 (~4e-8 here).
    logits = model.double()(ids)
    assert ((logits - expected).abs().max() / expected.abs().max()).item() <= 1e-6


def test_infer_config_reads_shapes_and_released_head_counts():
    # Shapes only (meta tensors): a released 150M needs no n_heads, and per-layer counts survive.
    state = random_released_state_dict(50304, 768, [{"qkv": 768, "proj": 768, "ffn": 3072}] * 12, device="meta")
    config = infer_config(state)
    assert (config.n_heads, config.n_layers, config.ffn_tokens, config.layer_tokens) == (12, 12, 3072, None)
    grown = random_released_state_dict(97, 32, [TOKENS, {**TOKENS, "qkv": 30}], device="meta")
    assert infer_config(grown, n_heads=4).layer_tokens == [TOKENS, {**TOKENS, "qkv": 30}]
    with pytest.raises(ValueError, match=r"cannot tell the head count .*d_model=32, n_layers=2.*pass n_heads"):
        infer_config(grown)


@pytest.mark.parametrize("explicit_config", [True, False])
def test_missing_extra_and_misshaped_keys_are_listed(tmp_path, explicit_config):
    _, state = released_file(tmp_path)
    del state["sequential.3.mlp.value_param_tokens"]
    state["sequential.3.attention.rotary_emb.inv_freq"] = torch.zeros(1)
    state["sequential.2.attention.key.value_param_tokens"] = torch.zeros(24, 31)
    config = tiny_config() if explicit_config else None
    with pytest.raises(CheckpointMismatchError) as error:
        load_released(state, config, n_heads=4)
    message = str(error.value)
    assert "1 missing keys:\n    sequential.3.mlp.value_param_tokens" in message
    assert "1 unexpected keys:\n    sequential.3.attention.rotary_emb.inv_freq" in message
    assert "sequential.2.attention.key.value_param_tokens: [24, 31], expected [24, 32]" in message


def test_not_a_released_checkpoint_is_refused():
    with pytest.raises(
        CheckpointMismatchError, match=r"not a released TokenFormer state dict.*\['word_embeddings.weight'\]"
    ):
        load_released({"word_embeddings.weight": torch.zeros(3, 4)})


class NotATensor:
    pass


def test_pickled_objects_are_not_unpickled(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"sequential.0.word_embeddings.weight": NotATensor()}, path)
    with pytest.raises(ValueError, match="weights_only=True refuses anything else"):
        read_released(path)
    with pytest.raises(FileNotFoundError, match="released checkpoint not found"):
        read_released(tmp_path / "missing")


def test_reverse_map_round_trips_and_refuses_grown_tau():
    model = TokenformerLM(tiny_config())
    back = load_released(ours_to_released(model), tiny_config())
    ids = torch.randint(0, 97, (1, 9))
    assert torch.equal(back(ids), model(ids))
    grow(model, qkv_tokens=30, layers=[1])
    with pytest.raises(ValueError, match=r"layers.1.attention.query: tau=4.89898, sqrt\(30\)=5.47723"):
        ours_to_released(model)


def test_convert_writes_our_format_with_per_layer_tokens(tmp_path, capsys):
    path, _ = released_file(tmp_path, layer_tokens=(TOKENS, {**TOKENS, "ffn": 48}))
    expected = load_released(path, n_heads=4)
    assert "pass n_heads" in cli_error(["convert", "--src", str(path), "--dst", str(tmp_path / "out")], capsys)
    cli(["convert", "--src", str(path), "--dst", str(tmp_path / "out"), "--n_heads", "4"])
    model = load_model(tmp_path / "out")
    assert model.config.layer_tokens == [TOKENS, {**TOKENS, "ffn": 48}]
    ids = torch.randint(0, 97, (2, 7))
    assert torch.equal(model(ids), expected(ids))
    error = cli_error(["convert", "--src", str(path), "--dst", str(tmp_path / "out"), "--n_heads", "4"], capsys)
    assert re.search("already holds a model.*--overwrite", error)
    cli(["convert", "--src", str(path), "--dst", str(tmp_path / "out"), "--n_heads", "4", "--overwrite", "true"])


def test_from_hub_offline_fails_with_a_clear_message(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    error = cli_error(["convert", "--src", "150M", "--dst", str(tmp_path / "out"), "--from_hub", "true"], capsys)
    assert re.search(r"'Haiyang-W/TokenFormer-150M': the hub is unreachable .*pass the local path", error)
    assert not (tmp_path / "out").exists()


@needs_tokenizer
def test_gpt_neox_tokenizer_encodes_hello_world():
    tokenizer = load_tokenizer(GPT_NEOX_TOKENIZER)
    assert tokenizer.encode("Hello world").ids == [12092, 1533]
    assert tokenizer.get_vocab_size() == 50277


@needs_tokenizer
def test_released_model_generates_text(tmp_path):
    path, _ = released_file(tmp_path, vocab_size=50304)
    cli(
        [
            "convert",
            "--src",
            str(path),
            "--dst",
            str(tmp_path / "out"),
            "--n_heads",
            "4",
            "--tokenizer",
            str(GPT_NEOX_TOKENIZER),
        ]
    )
    tokenizer = load_tokenizer(tmp_path / "out" / TOKENIZER_NAME)
    model = load_model(tmp_path / "out").eval()
    prompt = torch.tensor([tokenizer.encode("Hello world").ids])
    out = model.generate(prompt, 6, temperature=0)
    text = tokenizer.decode(out[0].tolist())
    assert text.startswith("Hello world") and len(text) > len("Hello world")
