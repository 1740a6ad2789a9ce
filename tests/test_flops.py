import pytest
from conftest import tiny_config

from tokenformer import TokenformerConfig, TokenformerLM, count_parameters, training_flops, training_flops_per_token
from tokenformer.flops import forward_flops_per_token


@pytest.mark.parametrize("projection", ["pattention", "linear"])
def test_parameter_count_matches_built_model(projection):
    cfg = tiny_config(projection=projection)
    model = TokenformerLM(cfg)
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())
    assert count_parameters(cfg, non_embedding=True) == count_parameters(cfg) - cfg.vocab_size * cfg.d_model


def test_flops_by_hand():
    cfg = tiny_config()  # d 32, 2 layers, qkv 24, proj 20, ffn 40, vocab 97
    weights = 2 * (2 * 32 * (3 * 24 + 20 + 40))
    head = 32 * 97
    attention = 2 * 4 * 10 * 32
    assert forward_flops_per_token(cfg, seq_len=10) == 2 * (weights + head) + attention
    assert training_flops_per_token(cfg, seq_len=10) == 3 * forward_flops_per_token(cfg, seq_len=10)
    assert training_flops(cfg, 1000, seq_len=10) == 1000 * training_flops_per_token(cfg, seq_len=10)


def test_flops_follow_growth_and_layer_overrides():
    cfg = tiny_config()
    grown = cfg.replace(layer_tokens=[{"qkv": 24, "proj": 20, "ffn": 40}, {"qkv": 48, "proj": 20, "ffn": 40}])
    extra = 2 * 2 * 32 * 3 * 24  # forward: 2 FLOPs per new weight, 3 Pattentions of 24 more tokens
    assert forward_flops_per_token(grown, 10) - forward_flops_per_token(cfg, 10) == extra


def test_six_n_rule_for_large_models():
    # Without the attention term, training FLOPs are the familiar 6 x (non-embedding + head) params.
    cfg = TokenformerConfig.from_preset("150M")
    six_n = 6 * (count_parameters(cfg, non_embedding=True) - 2 * cfg.d_model + cfg.vocab_size * cfg.d_model)
    assert training_flops_per_token(cfg, seq_len=1) - 12 * cfg.n_layers * cfg.d_model == six_n


def test_bad_seq_len():
    with pytest.raises(ValueError, match="seq_len must be a positive integer, got 0"):
        forward_flops_per_token(tiny_config(), 0)
