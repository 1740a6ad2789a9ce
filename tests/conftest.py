from pathlib import Path

import pytest
import torch

from tokenformer import TokenformerConfig

torch.set_flush_denormal(True)

# Data shared by the project's checkouts, beside the repository: <parent>/shared/data.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GPT_NEOX_TOKENIZER = SHARED_DATA / "gpt-neox-20b-tokenizer.json"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(**overrides) -> TokenformerConfig:
    """A model small enough for float64 references: distinct token counts per kind."""
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, qkv_tokens=24, proj_tokens=20, ffn_tokens=40, max_seq_len=64)
    return TokenformerConfig(**{**base, **overrides})
