"""The released models' GPT-NeoX-20B tokenizer through ``tokenizers``, stored beside a model.

A model directory that holds ``tokenizer.json`` and ``tokenizer_config.json`` is one that
``transformers.AutoTokenizer`` (and so lm-evaluation-harness) reads without any other file.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.tokenizer import EOS_TOKEN, TOKENIZER_NAME
from ..io import atomic_write_text

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
GPT_NEOX_TOKENIZER_REPO = "EleutherAI/gpt-neox-20b"


def load_tokenizer(path: str | Path):
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` or a directory holding one."""
    from ..data.tokenizer import load_tokenizer as load_wrapped

    return load_wrapped(path).backend


def hf_tokenizer_config(tokenizer, model_max_length: int) -> dict:
    """What ``tokenizer_config.json`` holds for transformers' ``PreTrainedTokenizerFast``.

    ``<|endoftext|>`` becomes the BOS, EOS and unknown token when the vocabulary has it, as in
    GPT-NeoX-20B's own tokenizer config.
    """
    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length}
    if tokenizer.token_to_id(EOS_TOKEN) is not None:
        config.update(bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN)
    return config


def save_tokenizer(source: str | Path, directory: str | Path, model_max_length: int) -> None:
    """Copy a ``tokenizer.json`` into a model directory with the config AutoTokenizer needs."""
    tokenizer = load_tokenizer(source)
    directory = Path(directory)
    config = hf_tokenizer_config(tokenizer, model_max_length)
    atomic_write_text(directory / TOKENIZER_NAME, tokenizer.to_str())
    atomic_write_text(directory / TOKENIZER_CONFIG_NAME, json.dumps(config, indent=2) + "\n")
