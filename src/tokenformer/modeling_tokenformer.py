"""TokenFormer in Hugging Face transformers (extra ``[hf]``): ``TokenformerModel`` (``AutoModel``)
and ``TokenformerForCausalLM`` (``AutoModelForCausalLM``).

Both register the LM's own modules under the LM's own names, so their state dict is
``TokenformerLM``'s key for key (tau included) and ``from_pretrained``/``save_pretrained`` read
and write the directory of :func:`tokenformer.save_model`. The forward pass is the LM's:
transformers' cache (``cache``, or its old name ``past_key_values``: any ``Cache``, static ones
included, or a legacy tuple) reaches it through the two members of ``KVCache`` the LM uses
(``length``, ``update``).

This module is the code a model directory carries (``auto_map`` in its ``config.json``), so that
``from_pretrained(directory, trust_remote_code=True)`` works where tokenformer is not installed:
transformers copies it with every module it imports relatively (``model.py``, ``config.py``,
``pattention.py``, ...), unchanged. It must import nothing of tokenformer in any other way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_tokenformer import TokenformerHFConfig
from .lora import prepare_lora_config
from .model import Block, TokenformerLM, set_activation_checkpointing
from .model_card import MODEL_CARD_NAME, model_card
from .pattention import Pattention, reuse_tokens
from .quantization import check_savable, quantize_int8
from .sparse_pattention import QueryBatchNorm, SparsePattention


class _CacheView:
    """A transformers ``Cache`` seen through ``tokenformer.model.KVCache``'s interface."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        # A static cache counts its tokens in a tensor.
        self.length = int(cache.get_seq_length())

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(k, v, layer)


def as_cache(cache: Any, config: TokenformerHFConfig) -> Cache | None:
    """``cache`` as a transformers ``Cache``: one already, or a legacy tuple of ``(key, value)`` per
    layer (each ``[batch, n_heads, cached tokens, head_dim]``) converted to a ``DynamicCache``."""
    if cache is None or isinstance(cache, Cache):
        return cache
    head_dim = config.d_model // config.n_heads
    allowed = (
        f"allowed: a transformers Cache (DynamicCache, StaticCache, ...) or a legacy tuple of n_layers="
        f"{config.n_layers} (key, value) pairs of shape [batch, n_heads={config.n_heads}, cached tokens, "
        f"head_dim={head_dim}]"
    )
    if not isinstance(cache, (tuple, list)):
        raise ValueError(f"cache must be a transformers Cache, got a {type(cache).__name__}; {allowed}")
    pairs = [tuple(pair) if isinstance(pair, (tuple, list)) else (pair,) for pair in cache]
    shapes = [[list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in pair] for pair in pairs]
    first = shapes[0][0] if pairs and pairs[0] and isinstance(pairs[0][0], torch.Tensor) else None
    well_formed = (
        len(pairs) == config.n_layers
        and first is not None
        and len(first) == 4
        and first[1] == config.n_heads
        and first[3] == head_dim
        and all(len(pair) == 2 and pair == [first, first] for pair in shapes)
    )
    if not well_formed:
        raise ValueError(f"a legacy cache of {len(pairs)} layers with shapes {shapes[:2]}... does not fit; {allowed}")
    converted = DynamicCache(config=config)
    for layer, (key, value) in enumerate(pairs):
        converted.update(key, value, layer)
    return converted


def _class_reference(cls: type) -> str:
    # How config.json's auto_map names a class: its module's file name, then the class.
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


class TokenformerPreTrainedModel(PreTrainedModel):
    config_class = TokenformerHFConfig
    _no_split_modules = [Block.__name__]
    supports_gradient_checkpointing = True
    # Token-token attention is torch's scaled_dot_product_attention, with or without padding.
    _supports_sdpa = True

    def __init__(self, config: TokenformerHFConfig) -> None:
        super().__init__(config)
        # Every directory saved names all three classes, whichever model wrote it.
        config.auto_map = {**auto_map(), **(getattr(config, "auto_map", None) or {})}
        lm = TokenformerLM(config.to_tokenformer())
        self.word_embeddings, self.layers, self.final_norm = lm.word_embeddings, lm.layers, lm.final_norm
        # The LM's modules are this model's, held once: one dict of submodules serves both, so a
        # module replaced here (a LoRA layer, peft's modules_to_save, resize_token_embeddings) is the
        # module the LM runs. The LM itself stays out of the module tree: registering it would give
        # every weight a second name.
        object.__setattr__(lm, "_modules", self._modules)
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
        elif isinstance(module, SparsePattention):
            init.normal_(module.sub_key_tokens, std=module.key_std)
            init.normal_(module.value_param_tokens, std=module.value_std)
            init.constant_(module.tau, module.initial_tau)
        elif isinstance(module, QueryBatchNorm):
            for tensor, value in ((module.weight, 1.0), (module.bias, 0.0), (module.running_mean, 0.0)):
                init.constant_(tensor, value)
            init.constant_(module.running_var, 1.0)
        else:
            super()._init_weights(module)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, every_n_layers=1):
        set_activation_checkpointing(self.lm, enable, gradient_checkpointing_func, every_n_layers)

    @property
    def is_activation_checkpointing(self) -> bool:
        return any(block.checkpoint_fn is not None for block in self.layers)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.word_embeddings = value

    def resize_token_embeddings(self, *args, **kwargs) -> torch.nn.Embedding:
        embedding = super().resize_token_embeddings(*args, **kwargs)
        # The LM checks token ids against its own config: it takes the new vocabulary size.
        self.lm.config = self.config.to_tokenformer()
        return embedding

    def prepare_lora_config(self, config: Any) -> Any:
        """A peft ``LoraConfig`` whose ``target_modules`` may name this model's Pattention layers
        (``query``, ``key``, ``value``, ``proj``, ``mlp``; ``"all-linear"``: all of them): pass it to
        ``get_peft_model``. See ``lora.py`` in this folder."""
        return prepare_lora_config(config, self)

    def quantize_int8(self) -> TokenformerPreTrainedModel:
        """Store the parameter tokens as int8 for inference, in place (see ``quantization.py``)."""
        quantize_int8(self)
        return self

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """transformers' ``save_pretrained`` (weights, config with ``auto_map``, code, generation
        config) and the model card (``README.md``)."""
        check_savable(self)
        if kwargs.get("is_main_process", True):
            Path(save_directory).mkdir(parents=True, exist_ok=True)
            card = model_card(self.lm.config)
            (Path(save_directory) / MODEL_CARD_NAME).write_text(card, encoding="utf-8")
        super().save_pretrained(save_directory, *args, **kwargs)

    def _hidden_states(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        cache: Cache | None,
        inputs_embeds: torch.Tensor | None,
        use_cache: bool | None,
        output_hidden_states: bool | None,
        output_attentions: bool | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, Cache | None]:
        """The final hidden states, the ``n_layers + 1`` hidden states with ``output_hidden_states``, the cache."""
        if input_ids is None or inputs_embeds is not None:
            raise ValueError(f"{type(self).__name__} takes input_ids (inputs_embeds are not supported)")
        if output_attentions:
            raise ValueError(
                f"{type(self).__name__} computes attention with scaled_dot_product_attention, which returns no "
                "attention weights; allowed: output_attentions=False"
            )
        if attention_mask is not None and attention_mask.dim() not in (2, 4):
            raise ValueError(
                f"attention_mask must be 2-d [batch, cached + new tokens] (1 for a token, 0 for padding) or "
                f"transformers' 4-d mask [batch, 1, new tokens, key slots], got shape {list(attention_mask.shape)}"
            )
        cache = as_cache(cache, self.config)
        if use_cache is None:
            use_cache = self.config.use_cache
        if use_cache and cache is None and not (self.is_activation_checkpointing and self.training):
            cache = DynamicCache(config=self.config)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        states = self.lm.hidden_states(
            input_ids,
            cache=_CacheView(cache) if cache is not None else None,
            attention_mask=attention_mask,
            position_ids=position_ids,
            every_layer=bool(output_hidden_states),
        )
        return states[-1], tuple(states) if output_hidden_states else None, cache


class TokenformerModel(TokenformerPreTrainedModel):
    """The transformer without its output head: the final hidden states."""

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "6.0.0", new_name="cache", raise_if_both_names=True)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | tuple | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        hidden, states, cache = self._hidden_states(
            input_ids,
            attention_mask,
            position_ids,
            cache,
            inputs_embeds,
            use_cache,
            output_hidden_states,
            output_attentions,
        )
        return BaseModelOutputWithPast(last_hidden_state=hidden, cache=cache, hidden_states=states)


class TokenformerForCausalLM(TokenformerPreTrainedModel, GenerationMixin):
    def get_output_embeddings(self) -> None:
        return None  # the head is the word embedding, applied inside the LM

    def generate(self, *args, **kwargs):
        # The weights do not change while generating: what is built from them is built once.
        with reuse_tokens():
            return super().generate(*args, **kwargs)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "6.0.0", new_name="cache", raise_if_both_names=True)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | tuple | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        hidden, states, cache = self._hidden_states(
            input_ids,
            attention_mask,
            position_ids,
            cache,
            inputs_embeds,
            use_cache,
            output_hidden_states,
            output_attentions,
        )
        logits = self.lm.logits(slice_logits_to_keep(hidden, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache, hidden_states=states)


def auto_map() -> dict[str, str]:
    """``config.json``'s ``auto_map``: where transformers finds each class in a model directory."""
    return {
        "AutoConfig": _class_reference(TokenformerHFConfig),
        "AutoModel": _class_reference(TokenformerModel),
        "AutoModelForCausalLM": _class_reference(TokenformerForCausalLM),
    }


# save_pretrained copies this module and its relative imports beside the weights.
TokenformerHFConfig.register_for_auto_class()
TokenformerModel.register_for_auto_class("AutoModel")
TokenformerForCausalLM.register_for_auto_class("AutoModelForCausalLM")
