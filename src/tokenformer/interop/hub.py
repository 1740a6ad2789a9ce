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
- ``README.md``: a short model card.

These are the files and the ``auto_map`` that transformers' own ``save_pretrained`` writes for
classes registered with ``register_for_auto_class`` (the tests hold the two to each other); they
are written here without importing transformers, so that training and conversion need no more
than tokenformer's core dependencies.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

from ..config import TokenformerConfig
from ..data.tokenizer import Tokenizer
from ..flops import count_parameters
from ..io import atomic_write_text
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
MODEL_CARD_NAME = "README.md"


def code_files() -> list[Path]:
    """The class modules and every module they import relatively, recursively: the files
    transformers copies (it follows ``from .name import ...``, the only relative imports they use)."""
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
    return sorted(found)


def write_code(directory: str | Path) -> None:
    """Copy the model code into ``directory`` (config.json's ``auto_map`` names its classes)."""
    for path in code_files():
        atomic_write_text(Path(directory) / path.name, path.read_text(encoding="utf-8"))


def generation_config(tokenizer: Tokenizer) -> dict[str, Any]:
    """``generation_config.json``: generation ends at the end-of-text token, which also pads."""
    if tokenizer.eos_id is None:
        return {}
    return {"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.eos_id}


def model_card(config: TokenformerConfig, tokenizer: Tokenizer | None = None) -> str:
    """A short ``README.md`` for the hub: what the model is and how to load and evaluate it."""
    if config.projection == "pattention":
        kind = (
            "A TokenFormer causal language model ([Wang et al., 2024](https://arxiv.org/abs/2410.23168)): every "
            "linear projection is a Pattention layer, attention from the input tokens to learnable parameter tokens."
        )
        tokens = f"{config.qkv_tokens} / {config.proj_tokens} / {config.ffn_tokens}"
        if config.layer_tokens is not None:
            tokens = "per layer: " + ", ".join(f"{t['qkv']}/{t['proj']}/{t['ffn']}" for t in config.layer_tokens)
        rows = [("parameter tokens (qkv / proj / ffn)", tokens)]
    else:
        kind = "A standard Transformer causal language model (the linear baseline of a TokenFormer study)."
        rows = [("MLP width", str(config.ffn_tokens))]
    rows = [
        ("layers", str(config.n_layers)),
        ("width / heads", f"{config.d_model} / {config.n_heads}"),
        *rows,
        ("parameters", f"{count_parameters(config):,} ({count_parameters(config, True):,} without the embedding)"),
        ("context", f"{config.max_seq_len} tokens"),
        ("vocabulary", str(config.vocab_size)),
    ]
    table = "\n".join(["| | |", "| --- | --- |", *(f"| {name} | {value} |" for name, value in rows)])
    tokenizer_line = (
        "tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)  # it reads config.json too\n"
        'ids = tokenizer("The", return_tensors="pt").input_ids\n'
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=20, do_sample=False)[0]))\n"
        if tokenizer is not None
        else ""
    )
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- tokenformer
---

# TokenFormer language model

{kind} Written by the `tokenformer` library.

{table}

## Use

The model code is in this folder (`modeling_tokenformer.py` and the modules it imports); it needs
`torch` and `transformers` only.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "path/to/this/folder"  # or its hub id
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
{tokenizer_line}```

With lm-evaluation-harness:

```bash
lm_eval --model hf --model_args pretrained=path/to/this/folder,trust_remote_code=True --tasks lambada_openai
```
"""


def write_hub_files(config: TokenformerConfig, directory: str | Path, tokenizer: Tokenizer | None = None) -> dict:
    """Write the code, the tokenizer files (given a tokenizer), the generation config and the
    model card of a language model into ``directory``; returns what ``config.json`` adds
    (``auto_map``)."""
    directory = Path(directory)
    write_code(directory)
    if tokenizer is not None:
        save_tokenizer(tokenizer, directory, config.max_seq_len)
        atomic_write_text(directory / GENERATION_CONFIG_NAME, json.dumps(generation_config(tokenizer), indent=2) + "\n")
    atomic_write_text(directory / MODEL_CARD_NAME, model_card(config, tokenizer))
    return {"auto_map": dict(AUTO_MAP)}
