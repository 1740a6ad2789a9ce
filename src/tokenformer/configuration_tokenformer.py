"""transformers' view of a ``TokenformerConfig`` (extra ``[hf]``).

Every field keeps its own name, so the ``config.json`` that ``save_pretrained`` writes is the
one :func:`tokenformer.save_model` writes, give or take transformers' bookkeeping keys.

This module and :mod:`tokenformer.modeling_tokenformer` are the code a model directory carries
for ``trust_remote_code``: they import the rest of tokenformer only relatively, from their own
directory (see :mod:`tokenformer.interop.hub`).
"""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from .config import TokenformerConfig

MODEL_TYPE = "tokenformer"
CORE_FIELDS = tuple(f.name for f in dataclasses.fields(TokenformerConfig))


class TokenformerHFConfig(PretrainedConfig):
    model_type = MODEL_TYPE
    # The names transformers and lm-evaluation-harness look up (max_position_embeddings sets
    # lm-eval's context length).
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "max_position_embeddings": "max_seq_len",
    }

    def __init__(self, use_cache: bool = True, **kwargs) -> None:
        # Validation and defaults are TokenformerConfig's.
        core = TokenformerConfig.from_dict({name: kwargs.pop(name) for name in CORE_FIELDS if name in kwargs})
        for name, value in core.to_dict().items():
            setattr(self, name, value)
        if not isinstance(use_cache, bool):
            raise ValueError(f"config field use_cache must be true or false, got {use_cache!r}")
        # Whether forward returns the keys and values of its tokens (a Cache) for the next call.
        self.use_cache = use_cache
        super().__init__(**kwargs)

    @classmethod
    def from_tokenformer(cls, config: TokenformerConfig) -> TokenformerHFConfig:
        return cls(**config.to_dict())

    def to_tokenformer(self) -> TokenformerConfig:
        return TokenformerConfig.from_dict({name: getattr(self, name) for name in CORE_FIELDS})
