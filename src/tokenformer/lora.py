"""LoRA (peft) on Pattention layers named by ``target_modules``.

peft adapts the layer types it knows (``nn.Linear``, ``nn.Embedding``, ...) and refuses others;
:func:`prepare_lora_config` registers Pattention with a ``LoraConfig`` through peft's custom-module
mechanism. A Pattention's LoRA is a low-rank update of its key and of its value tokens
(``K + B_k A_k``, ``V + B_v A_v``, ``B`` starting at zero): the weights of the layer move, so
merging the adapter gives a plain Pattention again. It is peft's own ``ParamWrapper``, the layer
that ``target_parameters=["key_param_tokens", "value_param_tokens"]`` builds, once per parameter.

The module travels with the model code of a hub folder; peft is imported only when used.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .pattention import Pattention

TOKEN_PARAMETERS = ("key_param_tokens", "value_param_tokens")


def _param_wrapper() -> type:
    # Imported here, not with the module: peft is optional (and a hub folder must load without it).
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError as exc:
        raise ImportError(f"LoRA on Pattention layers needs peft >= 0.17 (pip install peft): {exc}") from None
    return ParamWrapper


def lora_pattention(target: nn.Module, adapter_name: str, config: Any, parameter_name: str | None = None, **kwargs):
    """peft's LoRA layer of a Pattention ``target``: its key tokens and its value tokens adapted, one
    ``ParamWrapper`` around the other. ``None`` for a single parameter named by ``target_parameters``
    (peft's own dispatch builds that)."""
    if parameter_name is not None:
        return None
    wrapper = _param_wrapper()
    for name in TOKEN_PARAMETERS:
        target = wrapper(target, adapter_name, parameter_name=name, config=config, **kwargs)
    return target


def projection_names(model: nn.Module) -> list[str]:
    """The names by which ``target_modules`` picks every projection of ``model``: its Pattentions and
    linear layers (what peft's ``"all-linear"`` means for a model of linear layers)."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, (Pattention, nn.Linear))}
    return sorted(names)


def prepare_lora_config(config: Any, model: nn.Module) -> Any:
    """``config`` (a peft ``LoraConfig``), changed so that peft adapts the Pattentions of ``model``
    its ``target_modules`` names (``"all-linear"``: every Pattention and linear layer). Returns it.

    Pass it to ``get_peft_model``, or with ``PeftModel.from_pretrained(model, path, config=...)``
    to load a saved adapter (peft does not save the registration)."""
    if not callable(getattr(config, "_register_custom_module", None)):
        raise ValueError(
            f"prepare_lora_config takes a peft LoraConfig, got a {type(config).__name__}; "
            "other peft methods do not know Pattention (use LoRA)"
        )
    if config.lora_dropout:
        raise ValueError(
            f"LoRA on Pattention layers updates their tokens, which leaves no input to drop out: lora_dropout must "
            f"be 0, got {config.lora_dropout!r}"
        )
    _param_wrapper()  # says what to install before peft's own error could
    target = config.target_modules
    if isinstance(target, str) and target.lower() == "all-linear":
        config.target_modules = set(projection_names(model))
    config._register_custom_module({Pattention: lora_pattention})
    return config
