import copy

import pytest
import torch
from conftest import tiny_config

from tokenformer import Pattention, TokenformerLM, grow, quantize_int8, save_model
from tokenformer.quantization import Int8Linear, Int8Pattention, int8_linear, quantize_rows


def trained_like(**overrides) -> TokenformerLM:
    """Widths the CPU's int8 kernel takes (multiples of 16), tokens grown in one layer."""
    config = dict(d_model=64, qkv_tokens=32, proj_tokens=48, ffn_tokens=64)
    model = TokenformerLM(tiny_config(**{**config, **overrides}))
    if model.config.projection == "pattention":
        grow(model, qkv_tokens=48, layers=[1])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


@torch.no_grad()
def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_every_pattentions_tokens_become_int8():
    model = trained_like()
    ids = torch.randint(0, 97, (2, 12))
    expected = model(ids)
    tokens = sum(p.numel() for name, p in model.named_parameters() if "param_tokens" in name)
    quantize_int8(model)
    layers = [m for m in model.modules() if isinstance(m, Int8Pattention)]
    assert len(layers) == 10 and not any(isinstance(m, Pattention) for m in model.modules())
    int8 = [b for name, b in model.named_buffers() if name.endswith("_int8")]
    assert all(b.dtype == torch.int8 for b in int8) and sum(b.numel() for b in int8) == tokens  # a quarter of the bytes
    assert relative_error(model(ids), expected) < 0.02
    # The normalisation's scale is the layer's own (grown layers keep theirs).
    assert float(model.layers[1].attention.query.tau) == pytest.approx(32**0.5)
    assert model.generate(ids[:, :3], 6, temperature=0).shape == (2, 9)


def test_the_linear_baseline_is_quantized_too():
    model = trained_like(projection="linear")
    ids = torch.randint(0, 97, (2, 12))
    expected = model(ids)
    quantize_int8(model)
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 2 * 6
    assert relative_error(model(ids), expected) < 0.02


@pytest.mark.parametrize("width", [16, 48, 24, 5])
def test_int8_products_follow_the_dequantized_weight(width):
    weight = torch.randn(40, width)
    q, scale = quantize_rows(weight)
    assert (q.float() * scale[:, None] - weight).abs().max() <= scale.max() / 2 + 1e-6
    x = torch.randn(3, 7, width)
    # Widths of multiples of 16 take the CPU kernel (activations in bfloat16), others the exact product.
    tolerance = 1e-2 if width % 16 == 0 else 1e-5
    assert relative_error(int8_linear(x, q, scale), x @ (q.float() * scale[:, None]).T) < tolerance


def test_a_quantized_model_is_not_saved_and_not_quantized_twice(tmp_path):
    model = quantize_int8(trained_like())
    with pytest.raises(ValueError, match=r"holds int8 weights \(layers.0.attention.query, ...\): a quantized model"):
        save_model(model, tmp_path / "q")
    assert not (tmp_path / "q").exists()
    with pytest.raises(ValueError, match="has no Pattention or bias-free Linear to quantize"):
        quantize_int8(model)


def test_transformers_models_quantize_in_place():
    pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")
    from tokenformer import to_hf

    model = trained_like()
    hf = to_hf(copy.deepcopy(model))
    ids = torch.randint(0, 97, (1, 8))
    assert hf.quantize_int8() is hf
    torch.testing.assert_close(hf(ids).logits, quantize_int8(model)(ids))
    with pytest.raises(ValueError, match="a quantized model is not saved"):
        hf.save_pretrained("unused")


def test_eval_measures_the_int8_model(tmp_path, corpus_file, cache_dir, capsys, one_thread):
    from conftest import cli_flags, tiny_train_options

    from tokenformer.cli import main

    options = tiny_train_options(corpus_file, cache_dir, tmp_path / "run", max_steps=4, eval_interval=4)
    main(["train", *cli_flags(options)])
    capsys.readouterr()
    losses = {}
    for int8 in ("false", "true"):
        main(["eval", "--model", str(tmp_path / "run"), "--int8", int8, "--max_windows", "8"])
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert line.endswith(", int8 weights)") == (int8 == "true"), line
        losses[int8] = float(line.split("(loss ")[1].split()[0])
    assert losses["true"] == pytest.approx(losses["false"], abs=0.05) and losses["true"] != losses["false"]
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(tmp_path / "run"), "--int8", "true", "--harness", "true", "--tasks", "piqa"])
    assert "--int8 is for perplexity: lm-eval (--harness) loads the model itself" in capsys.readouterr().err
