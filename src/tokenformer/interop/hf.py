"""``TokenformerLM`` <-> transformers (extra ``[hf]``).

The transformers classes are in :mod:`tokenformer.modeling_tokenformer` and
:mod:`tokenformer.configuration_tokenformer`, beside the model code they run, because a model
directory carries them as its code (see :mod:`tokenformer.interop.hub`).
"""

from __future__ import annotations

import torch

from ..configuration_tokenformer import TokenformerHFConfig
from ..model import TokenformerLM
from ..modeling_tokenformer import TokenformerForCausalLM, TokenformerModel

__all__ = ["TokenformerForCausalLM", "TokenformerHFConfig", "TokenformerModel", "from_hf", "to_hf"]


def to_hf(model: TokenformerLM) -> TokenformerForCausalLM:
    """The transformers model of a ``TokenformerLM``, sharing its weights' memory (grown tau included)."""
    from ..families import family_of

    entry = family_of(model)
    if entry.name != "lm":
        raise ValueError(
            f"to_hf takes a language model; got a {type(model).__name__} ({entry.model_type}): "
            "transformers' causal-LM classes hold language models only"
        )
    config = TokenformerHFConfig.from_tokenformer(model.config)
    with torch.device("meta"):
        hf = TokenformerForCausalLM(config)
    hf.load_state_dict(model.state_dict(), strict=True, assign=True)
    return hf.train(model.training)


def from_hf(model: TokenformerForCausalLM) -> TokenformerLM:
    """The ``TokenformerLM`` inside a transformers model (the same modules, not a copy)."""
    return model.lm.train(model.training)
