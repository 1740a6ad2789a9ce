"""The tokenizer of a model, stored beside it for transformers' ``AutoTokenizer``.

A model directory that holds ``tokenizer.json``, ``tokenizer_config.json`` and
``special_tokens_map.json`` is one that ``transformers.AutoTokenizer`` (and so
lm-evaluation-harness) reads without any other file. The released models use GPT-NeoX-20B's.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.tokenizer import TOKENIZER_NAME, Tokenizer
from ..data.tokenizer import load_tokenizer as load_wrapped
from ..io import atomic_write_text

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_NAME = "special_tokens_map.json"
GPT_NEOX_TOKENIZER_REPO = "EleutherAI/gpt-neox-20b"
# The roles the end-of-text token takes: GPT-NeoX-20B's own tokenizer config makes it BOS, EOS and
# unknown token; it pads too, since decoder-only models have no padding token of their own.
SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")


def load_tokenizer(path: str | Path):
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` or a directory holding one."""
    return load_wrapped(path).backend


def as_tokenizer(tokenizer: Tokenizer | str | Path) -> Tokenizer:
    """A tokenizer given as itself or as a ``tokenizer.json`` (or a directory holding one)."""
    return tokenizer if isinstance(tokenizer, Tokenizer) else load_wrapped(tokenizer)


def special_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """``{role: token}`` of the special tokens (none when the vocabulary has no end-of-text token)."""
    return dict.fromkeys(SPECIAL_ROLES, tokenizer.eos_token) if tokenizer.eos_token is not None else {}


def hf_tokenizer_config(tokenizer: Tokenizer, model_max_length: int) -> dict:
    """What ``tokenizer_config.json`` holds for transformers' ``PreTrainedTokenizerFast``."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        **special_tokens(tokenizer),
    }


def save_tokenizer(source: Tokenizer | str | Path, directory: str | Path, model_max_length: int) -> None:
    """Write ``tokenizer.json`` into a model directory with the files AutoTokenizer reads beside it."""
    tokenizer = as_tokenizer(source)
    directory = Path(directory)
    atomic_write_text(directory / TOKENIZER_NAME, tokenizer.json_text)
    config = hf_tokenizer_config(tokenizer, model_max_length)
    atomic_write_text(directory / TOKENIZER_CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    atomic_write_text(directory / SPECIAL_TOKENS_MAP_NAME, json.dumps(special_tokens(tokenizer), indent=2) + "\n")
