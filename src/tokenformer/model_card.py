"""The ``README.md`` model card of a hub folder: what the model is, how it was trained, how to use it.

Training checkpoints, ``save_model``, ``tokenformer export`` and the transformers classes'
``save_pretrained`` all write it; it imports only modules that a hub folder carries beside the
model code (``flops``), so the folder's own ``save_pretrained`` writes it too.
"""

from __future__ import annotations

from collections.abc import Sequence

from .flops import count_parameters

MODEL_CARD_NAME = "README.md"


def _table(rows: Sequence[tuple[str, str]]) -> str:
    return "\n".join(["| | |", "| --- | --- |", *(f"| {name} | {value} |" for name, value in rows)])


def model_card(config, with_tokenizer: bool = False, training: Sequence[tuple[str, str]] = ()) -> str:
    """The card of a language model of ``config`` (a ``TokenformerConfig``); ``with_tokenizer``: the
    folder holds its tokenizer; ``training``: ``(name, value)`` rows of how it was trained (its
    steps, data, recipe and validation loss), when known."""
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
    trained = f"\n## Training\n\n{_table(training)}\n" if training else ""
    tokenizer_line = (
        "tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)  # it reads config.json too\n"
        'ids = tokenizer("The", return_tensors="pt").input_ids\n'
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=20, do_sample=False)[0]))\n"
        if with_tokenizer
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

{_table(rows)}
{trained}
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
