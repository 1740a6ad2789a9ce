"""The registry of model families, and the model directory that every family shares.

A family is a kind of model this library trains and stores: the causal language model and the
vision classifier. Each registers, once, its config class, model class, presets, the
``model_type`` its ``config.json`` carries and its parameter and FLOP counters. Training,
checkpoints, the command line and the integrations look a family up here instead of naming
model classes.

A model directory is ``config.json`` (the config's fields and ``model_type``) beside
``model.safetensors`` (the state dict, tau buffers included): what :func:`save_model` writes
and :func:`load_model` reads, for every family. A language model's directory is also a
Hugging Face hub folder that loads without tokenformer (``trust_remote_code``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import io
from .config import PRESETS, TokenformerConfig
from .flops import count_parameters, count_vision_parameters, training_flops_per_image, training_flops_per_token
from .model import TokenformerLM
from .quantization import check_savable
from .vision import VISION_PRESETS, TokenformerViT, VisionConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Keys that Hugging Face transformers adds to a config.json; the directory format is shared.
HF_CONFIG_KEYS = (
    "model_type",
    "architectures",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "auto_map",
    "use_cache",
)


@dataclass(frozen=True)
class Family:
    """What a family of models registers.

    Attributes:
        name: The training task that trains it (``TrainConfig.task``): ``lm`` or ``vision``.
        model_type: The ``model_type`` of its ``config.json``.
        config_class: Its configuration dataclass (``from_preset``, ``to_dict``, ``from_dict``).
        model_class: The ``nn.Module`` built from a config.
        presets: Named configurations (``config_class.from_preset`` reads them).
        count_parameters: Trainable parameters, from the config alone.
        training_flops: Training FLOPs (forward + backward) per trained item, from the config
            and the sequence length the task trains at (ignored where the config fixes it).
        architectures: The ``architectures`` entry of its ``config.json`` (transformers' class).
        write_extras: Writes the files its model directory holds beside the config and the weights,
            ``(config, directory, tokenizer) -> keys added to config.json``; the language model's
            makes the directory a Hugging Face hub folder (:mod:`tokenformer.interop.hub`).
    """

    name: str
    model_type: str
    config_class: type
    model_class: type[nn.Module]
    presets: dict[str, dict[str, Any]]
    count_parameters: Callable[[Any], int]
    training_flops: Callable[[Any, int | None], int]
    architectures: tuple[str, ...] = ()
    write_extras: Callable[[Any, Path, Any], dict[str, Any]] | None = None


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family; its name and model_type must be new."""
    clash = [f.name for f in FAMILIES.values() if f.name == family.name or f.model_type == family.model_type]
    if clash:
        raise ValueError(f"a model family named {family.name!r} or of model_type {family.model_type!r} is registered")
    FAMILIES[family.name] = family
    return family


def family(name: str) -> Family:
    """The family trained by task ``name``."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; allowed: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(config_or_model: Any) -> Family:
    """The family of a config or a model (wrappers that keep ``config`` included)."""
    config = getattr(config_or_model, "config", config_or_model)
    for entry in FAMILIES.values():
        if type(config) is entry.config_class:
            return entry
    raise ValueError(
        f"{type(config_or_model).__name__} is not a model or config of a registered family; "
        f"allowed: {', '.join(f.config_class.__name__ for f in FAMILIES.values())}"
    )


def is_registered(model: Any) -> bool:
    """Whether ``model`` is a model of a registered family (wrappers that keep ``config`` too)."""
    config = getattr(model, "config", None)
    return any(type(config) is entry.config_class for entry in FAMILIES.values())


def family_of_model_type(model_type: str | None) -> Family:
    for entry in FAMILIES.values():
        if entry.model_type == model_type:
            return entry
    raise ValueError(
        f"unknown model_type {model_type!r}; allowed: {', '.join(f.model_type for f in FAMILIES.values())}"
    )


def _write_hub_files(config: TokenformerConfig, directory: Path, tokenizer: Any) -> dict[str, Any]:
    from .interop.hub import write_hub_files

    return write_hub_files(config, directory, tokenizer)


register(
    Family(
        name="lm",
        model_type="tokenformer",
        config_class=TokenformerConfig,
        model_class=TokenformerLM,
        presets=PRESETS,
        count_parameters=count_parameters,
        training_flops=training_flops_per_token,
        architectures=("TokenformerForCausalLM",),
        write_extras=_write_hub_files,
    )
)
register(
    Family(
        name="vision",
        model_type="tokenformer-vit",
        config_class=VisionConfig,
        model_class=TokenformerViT,
        presets=VISION_PRESETS,
        count_parameters=count_vision_parameters,
        training_flops=lambda config, _seq_len=None: training_flops_per_image(config),
    )
)


# -- the model directory ------------------------------------------------------------------------


def build_model(config: Any) -> nn.Module:
    """The model a config describes."""
    return family_of(config).model_class(config)


def save_model(model: nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write a model of any family into ``directory``: ``model.safetensors``, the files of its
    family, ``config.json``.

    A language model's directory is a complete Hugging Face hub folder: its code (for
    ``trust_remote_code``), a model card and, given ``tokenizer`` (a ``tokenformer.data.Tokenizer``,
    a ``tokenizer.json`` or a directory with one), the tokenizer files and generation config (see
    :mod:`tokenformer.interop.hub`). Every file is written atomically and the config last, so a
    directory with a config always has everything else beside it. :func:`load_model` reads it back
    (grown models keep their tau).
    """
    directory = Path(directory)
    entry = family_of(model)
    check_savable(model)
    if tokenizer is not None:
        if entry.write_extras is None:
            raise ValueError(f"a {entry.name} model directory holds no tokenizer; allowed: tokenizer=None")
        from .interop.tokenizer import as_tokenizer

        tokenizer = as_tokenizer(tokenizer)  # read before anything is written
    io.save_weights(model.state_dict(), directory / WEIGHTS_NAME, metadata={"format": "pt"})
    extra = entry.write_extras(model.config, directory, tokenizer) if entry.write_extras is not None else {}
    save_model_config(model, directory, extra)
    return directory


def save_model_config(model: nn.Module, directory: str | Path, extra: dict[str, Any] | None = None) -> None:
    """``config.json`` of a model, with ``extra`` keys (alone in sharded checkpoints, whose weights are shards)."""
    entry = family_of(model)
    kind: dict[str, Any] = {"model_type": entry.model_type}
    if entry.architectures:
        kind["architectures"] = list(entry.architectures)
    data = {**model.config.to_dict(), **kind, **(extra or {})}
    io.atomic_write_text(Path(directory) / CONFIG_NAME, json.dumps(data, indent=2) + "\n")


def read_model_config(directory: str | Path) -> Any:
    """The config in a model directory's ``config.json``, of the family its ``model_type`` names
    (a directory without one holds a language model, as the released checkpoints converted
    before ``model_type`` was written)."""
    config_path = Path(directory) / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a tokenformer model directory")
    data = io.read_json(config_path)
    if not isinstance(data, dict):
        raise ValueError(f"{config_path} must hold a JSON object of config fields, got {type(data).__name__}")
    fields = {k: v for k, v in data.items() if k not in HF_CONFIG_KEYS}
    try:
        entry = family_of_model_type(data.get("model_type", FAMILIES["lm"].model_type))
        return entry.config_class.from_dict(fields)
    except ValueError as exc:
        raise ValueError(f"{config_path}: {exc}") from None


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load the model that :func:`save_model` wrote (grown models keep their tau).

    The weights file's header is checked against ``config.json`` first (:func:`check_weights`),
    so a file that does not fit it is refused before anything is allocated."""
    directory = Path(directory)
    config = read_model_config(directory)
    weights = directory / WEIGHTS_NAME
    check_weights(config, io.read_weights_header(weights), weights, directory / CONFIG_NAME)
    with torch.device("meta"):
        model = build_model(config)
    state = io.load_weights(weights, device)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device)


def check_weights(
    config: Any, tensors: dict[str, tuple[tuple[int, ...], Any]], source: Path, config_path: Path
) -> None:
    """Refuse weights that do not fit ``config`` (read from ``config_path``) with one line naming
    both: ``tensors`` maps each tensor's name in ``source`` to its shape and dtype, as a file's
    header or index says, so that sizes a config claims are checked before memory is taken for
    them. Every tensor must be there, with the config's shape and a floating-point dtype."""
    claimed = getattr(config, "n_layers", None)
    found = {name.split(".")[1] for name in tensors if name.startswith("layers.")}
    if claimed is not None and len(found) != claimed:  # before a model of the claimed depth is built, even on meta
        raise ValueError(f"{source} holds {len(found)} layers, but {config_path} says n_layers={claimed}")
    with torch.device("meta"):
        expected = build_model(config).state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not hold the tensors {config_path} describes: missing {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}"
        )
    for name, tensor in expected.items():
        shape, dtype = tensors[name]
        if tuple(shape) != tuple(tensor.shape):
            raise ValueError(
                f"{source} does not fit {config_path}: tensor {name} has shape {list(shape)} there, "
                f"the config makes it {list(tensor.shape)}"
            )
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"{source}: tensor {name} is {dtype}; allowed: a floating-point dtype")
