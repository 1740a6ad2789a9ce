"""``TokenformerForCausalLM``: a ``TokenformerLM`` inside transformers (extra ``[hf]``).

The transformers model registers the LM's own modules under the LM's own names, so its state
dict is ``TokenformerLM``'s key for key (tau included) and ``from_pretrained``/``save_pretrained``
read and write the directory of :func:`tokenformer.save_model`. The forward pass is the LM's:
transformers' cache reaches it through the two members of ``KVCache`` the LM uses (``length``, ``update``).
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..model import Block, TokenformerLM
from ..pattention import Pattention
from .hf_config import TokenformerHFConfig


class _CacheView:
    """A transformers ``Cache`` seen through ``tokenformer.model.KVCache``'s interface."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.length = cache.get_seq_length()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(k, v, layer)


class TokenformerForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TokenformerHFConfig
    _no_split_modules = [Block.__name__]

    def __init__(self, config: TokenformerHFConfig) -> None:
        super().__init__(config)
        lm = TokenformerLM(config.to_tokenformer())
        self.word_embeddings, self.layers, self.final_norm = lm.word_embeddings, lm.layers, lm.final_norm
        # Kept out of the module tree: registering it would give every weight a second name.
        object.__setattr__(self, "lm", lm)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        # transformers re-initialises every tensor it did not load; its guarded init functions
        # skip loaded ones, so a loaded (possibly grown) tau survives.
        if isinstance(module, Pattention):
            init.normal_(module.key_param_tokens, std=module.key_std)
            init.normal_(module.value_param_tokens, std=module.value_std)
            init.constant_(module.tau, module.initial_tau)
            if module.ghost is not None:  # a pruned model's ghost: always loaded, never drawn
                init.zeros_(module.ghost)
        else:
            super()._init_weights(module)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.word_embeddings = self.lm.word_embeddings = value

    def get_output_embeddings(self) -> None:
        return None  # the head is the word embedding, applied inside the LM's forward

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("TokenformerForCausalLM takes input_ids (inputs_embeds are not supported)")
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        start = cache.get_seq_length() if cache is not None else 0
        _check_unpadded(attention_mask, position_ids, start, input_ids.shape[1])
        logits = self.lm(input_ids, cache=_CacheView(cache) if cache is not None else None)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)


def _check_unpadded(
    attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, start: int, length: int
) -> None:
    # The LM attends causally over every token and numbers positions from the cache length:
    # a padded batch would need a mask and shifted positions it does not take.
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise ValueError(
            "TokenformerForCausalLM does not support padded batches (attention_mask has zeros); "
            "allowed: unpadded inputs, e.g. batch size 1 or prompts of equal length"
        )
    if position_ids is not None:
        expected = torch.arange(start, start + length, device=position_ids.device)
        if not bool((position_ids == expected).all()):
            raise ValueError(f"position_ids must be {start}..{start + length - 1} (positions follow the cache length)")


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
