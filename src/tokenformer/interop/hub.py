"""A language model's directory as a Hugging Face hub folder, usable without tokenformer.

Beside ``config.json`` and ``model.safetensors``, :func:`write_hub_files` writes:

- the code: ``modeling_tokenformer.py`` and ``configuration_tokenformer.py`` (the transformers
  classes) with every module they import relatively (``model.py``, ``config.py``,
  ``pattention.py``, ...), copied unchanged, and ``config.json``'s ``auto_map`` naming the
  classes, so that ``AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)``
  needs only torch and transformers;
- given a tokenizer: ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``
  (the end-of-text token as EOS, BOS, unknown and padding token; ``model_max_length`` the
  model's ``max_seq_len``), and ``generation_config.json`` with its id, so that generation
  stops there;
- ``README.md``: the model card (:mod:`tokenformer.model_card`).

These are the files and the ``auto_map`` that transformers' own ``save_pretrained`` writes for
classes registered with ``register_for_auto_class`` (the tests hold the two to each other); they
are written here without importing transformers, so that training and conversion need no more
than tokenformer's core dependencies.
"""

from __future__ import annotations

import ast
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import TokenformerConfig
from ..data.tokenizer import Tokenizer
from ..io import atomic_write_text
from ..model_card import MODEL_CARD_NAME, model_card
from .tokenizer import save_tokenizer

PACKAGE = Path(__file__).resolve().parents[1]
# The modules of the transformers classes, named by auto_map.
CLASS_MODULES = ("configuration_tokenformer", "modeling_tokenformer")
AUTO_MAP = {
    "AutoConfig": "configuration_tokenformer.TokenformerHFConfig",
    "AutoModel": "modeling_tokenformer.TokenformerModel",
    "AutoModelForCausalLM": "modeling_tokenformer.TokenformerForCausalLM",
}
GENERATION_CONFIG_NAME = "generation_config.json"


def code_files() -> list[Path]:
    """The class modules and every module they import relatively, recursively: the files
    transformers copies (it follows ``from .name import ...``, the only relative imports they use)."""
    return list(_code_files())


@functools.cache
def _code_files() -> tuple[Path, ...]:
    # Parsed once per process: every checkpoint of a language model writes these files.
    found: list[Path] = []
    pending = [PACKAGE / f"{name}.py" for name in CLASS_MODULES]
    while pending:
        path = pending.pop()
        if path in found:
            continue
        found.append(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                pending.append(PACKAGE / f"{node.module}.py")
    return tuple(sorted(found))


def write_code(directory: str | Path) -> None:
    """Copy the model code into ``directory`` (config.json's ``auto_map`` names its classes)."""
    for path in code_files():
        atomic_write_text(Path(directory) / path.name, path.read_text(encoding="utf-8"))


def generation_config(tokenizer: Tokenizer) -> dict[str, Any]:
    """``generation_config.json``: generation ends at the end-of-text token, which also pads."""
    if tokenizer.eos_id is None:
        return {}
    return {"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.eos_id}


def write_hub_files(
    config: TokenformerConfig,
    directory: str | Path,
    tokenizer: Tokenizer | None = None,
    training: Sequence[tuple[str, str]] = (),
) -> dict:
    """Write the code, the tokenizer files (given a tokenizer), the generation config and the
    model card (with ``training`` rows, see :func:`tokenformer.model_card.model_card`) of a
    language model into ``directory``; returns what ``config.json`` adds (``auto_map``)."""
    directory = Path(directory)
    write_code(directory)
    if tokenizer is not None:
        save_tokenizer(tokenizer, directory, config.max_seq_len)
        atomic_write_text(directory / GENERATION_CONFIG_NAME, json.dumps(generation_config(tokenizer), indent=2) + "\n")
    atomic_write_text(directory / MODEL_CARD_NAME, model_card(config, tokenizer is not None, training))
    return {"auto_map": dict(AUTO_MAP)}
