"""Released TokenFormer checkpoints <-> ``TokenformerLM``: a plain key map.

The released ``pytorch_model.bin`` files keep GPT-NeoX's ``sequential`` layout: the word
embedding at index 0, layer ``i`` at index ``i + 2`` and the final norm at ``n_layers + 3``
(the indices in between held parameter-free modules). They store no ``tau``: the release
computes ``sqrt(token count)`` on every call, which is the value a fresh ``Pattention`` freezes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import PRESETS, TOKEN_KINDS, TokenformerConfig
from ..growth import growth_summary
from ..io import file_or_inside, one_line
from ..model import Block, TokenformerLM
from ..pattention import release_tau

RELEASED_WEIGHTS_NAME = "pytorch_model.bin"
HUB_MODELS = {
    "150M": "Haiyang-W/TokenFormer-150M",
    "450M": "Haiyang-W/TokenFormer-450M",
    "900M": "Haiyang-W/TokenFormer-900M",
    "1.5B": "Haiyang-W/TokenFormer-1-5B",
}
EMBEDDING_KEY = "sequential.0.word_embeddings.weight"
# Module paths shared by both layouts below the layer prefix, with the token kind each uses.
PATTENTIONS = {name: kind for kind, names in Block.KIND_MODULES.items() for name in names}
PARTS = ("key_param_tokens", "value_param_tokens")
# How many of its keys the error for an unrecognisable state dict shows.
_KEYS_SHOWN = 20


class CheckpointMismatchError(ValueError):
    """A state dict whose keys or shapes do not fit the model it is loaded into."""


def released_key_map(config: TokenformerConfig) -> dict[str, str]:
    """``{released key: our key}`` for every tensor of a released checkpoint of ``config``."""
    keys = {EMBEDDING_KEY: "word_embeddings.weight"}
    for i in range(config.n_layers):
        for module in PATTENTIONS:
            for part in PARTS:
                keys[f"sequential.{i + 2}.{module}.{part}"] = f"layers.{i}.{module}.{part}"
    for part in ("weight", "bias"):
        keys[f"sequential.{config.n_layers + 3}.norm.{part}"] = f"final_norm.{part}"
    return keys


def _released_layer(key: str) -> int | None:
    """Layer index of a released Pattention key, ``None`` for any other key."""
    parts = key.split(".")
    if len(parts) >= 3 and parts[0] == "sequential" and parts[1].isdigit() and parts[2] in ("attention", "mlp"):
        return int(parts[1]) - 2
    return None


def _infer_tokens(state_dict: Mapping[str, Any], n_layers: int, d_model: int) -> list[dict[str, int]]:
    """Token counts per layer from the rows of whichever tensor of each kind is present."""
    found: list[dict[str, int]] = [{} for _ in range(n_layers)]
    for i in range(n_layers):
        for module, kind in PATTENTIONS.items():
            for part in PARTS:
                tensor = state_dict.get(f"sequential.{i + 2}.{module}.{part}")
                if kind not in found[i] and isinstance(tensor, torch.Tensor) and tensor.dim() == 2:
                    found[i][kind] = tensor.shape[0]
    # A kind missing from a layer takes the most common count of the other layers, so that the
    # error names the missing keys instead of failing on the config.
    default = {"qkv": d_model, "proj": d_model, "ffn": 4 * d_model}
    for kind in TOKEN_KINDS:
        counts = Counter(layer[kind] for layer in found if kind in layer)
        if counts:
            default[kind] = counts.most_common(1)[0][0]
    return [{kind: layer.get(kind, default[kind]) for kind in TOKEN_KINDS} for layer in found]


def released_preset(d_model: int, n_layers: int) -> str | None:
    """The released preset with this width and depth, if any."""
    for name in HUB_MODELS:
        preset = PRESETS[name]
        if preset["d_model"] == d_model and preset["n_layers"] == n_layers:
            return name
    return None


def infer_config(state_dict: Mapping[str, Any], n_heads: int | None = None, **overrides: Any) -> TokenformerConfig:
    """A released-style config read from the shapes of a released state dict.

    Width, vocabulary, depth and the token counts (per layer where they differ, as after growth)
    come from the tensors. The head count is not in the weights: it is taken from the released
    preset of the same width and depth, else from ``n_heads``.
    """
    embedding = state_dict.get(EMBEDDING_KEY)
    layers = {layer for key in state_dict if (layer := _released_layer(key)) is not None}
    if not isinstance(embedding, torch.Tensor) or embedding.dim() != 2 or not layers or min(layers) < 0:
        shown = sorted(state_dict)[:_KEYS_SHOWN]
        raise CheckpointMismatchError(
            f"not a released TokenFormer state dict: it needs a 2-d {EMBEDDING_KEY!r} and "
            f"'sequential.<i+2>.attention...' layer keys; found {len(state_dict)} keys, e.g. {shown}"
        )
    vocab_size, d_model = embedding.shape
    n_layers = max(layers) + 1
    preset = released_preset(d_model, n_layers)
    if n_heads is None:
        if preset is None:
            raise ValueError(
                f"cannot tell the head count from the weights (d_model={d_model}, n_layers={n_layers}) and no released "
                f"preset has this shape; pass n_heads (a divisor of {d_model})"
            )
        n_heads = PRESETS[preset]["n_heads"]
    tokens = _infer_tokens(state_dict, n_layers, d_model)
    uniform = all(t == tokens[0] for t in tokens)
    fields: dict[str, Any] = dict(
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        qkv_tokens=tokens[0]["qkv"],
        proj_tokens=tokens[0]["proj"],
        ffn_tokens=tokens[0]["ffn"],
        layer_tokens=None if uniform else tokens,
        value_scale=1.0,  # the release's initialisation, for tokens that growth appends
    )
    return TokenformerConfig(**{**fields, **overrides})


def _describe(tensor: Any) -> str:
    return f"{list(tensor.shape)}" if isinstance(tensor, torch.Tensor) else f"a {type(tensor).__name__}, not a tensor"


def check_state_dict(state_dict: Mapping[str, Any], expected: Mapping[str, torch.Size], what: str) -> None:
    """Refuse ``state_dict`` unless its keys are exactly ``expected``'s, each with its shape.

    The error lists every missing, unexpected and mis-shaped key, so that one run shows all.
    """
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = [
        f"{key}: {_describe(state_dict[key])}, expected {list(shape)}"
        for key, shape in expected.items()
        if key in state_dict
        and (not isinstance(state_dict[key], torch.Tensor) or tuple(state_dict[key].shape) != tuple(shape))
    ]
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{what} does not fit the model:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)):
        if items:
            lines.append(f"  {len(items)} {title}:")
            lines += [f"    {item}" for item in items]
    raise CheckpointMismatchError("\n".join(lines))


def _meta_model(config: TokenformerConfig) -> TokenformerLM:
    with torch.device("meta"):
        return TokenformerLM(config)


def _require_pattention(config: TokenformerConfig) -> None:
    if config.projection != "pattention":
        raise ValueError(f"the released layout holds Pattention layers; got projection={config.projection!r}")


def released_to_ours(state_dict: Mapping[str, torch.Tensor], config: TokenformerConfig) -> dict[str, torch.Tensor]:
    """Rename a released state dict to ``TokenformerLM``'s keys and add each Pattention's tau.

    Raises :class:`CheckpointMismatchError` listing every missing, unexpected or mis-shaped key.
    """
    _require_pattention(config)
    key_map = released_key_map(config)
    ours = _meta_model(config).state_dict()
    expected = {released: ours[mine].shape for released, mine in key_map.items()}
    check_state_dict(state_dict, expected, "released checkpoint")
    converted = {mine: state_dict[released] for released, mine in key_map.items()}
    for name in ours:
        if name.endswith(".tau"):
            keys = converted[name[: -len("tau")] + "key_param_tokens"]
            converted[name] = torch.tensor(release_tau(keys.shape[0]), dtype=keys.dtype)
    return converted


def _layer_names(per_layer: list[dict]) -> list[str]:
    """``layers.<i>.<name>`` of every entry of a per-layer config field (ghost ranks, splits)."""
    return [f"layers.{i}.{name}" for i, layer in enumerate(per_layer) for name in layer]


def ours_to_released(model: TokenformerLM) -> dict[str, torch.Tensor]:
    """The released layout of a model's weights (the reverse map).

    The released format has no tau, so a model whose tau is not ``sqrt(token count)`` (one
    grown or pruned) is refused: the released code would compute a different function. So is a
    pruned model with ghost norms, one grown with separate normalisation, or one with a sparse
    memory: the released code has no place for them.
    """
    config = model.config
    _require_pattention(config)
    if config.memory_layers:
        raise ValueError(
            f"the released layout has no sparse memory; this model has one in layers {config.memory_layers}. "
            "Save with tokenformer.save_model instead."
        )
    if config.ghost_ranks is not None:
        ghosts = _layer_names(config.ghost_ranks)
        raise ValueError(
            "the released layout cannot hold a pruned model's ghost norms (the removed tokens' share of each "
            f"row's norm, kept in {', '.join(ghosts)}): the released code would normalise over the kept tokens "
            "only and compute a different function. Save with tokenformer.save_model instead."
        )
    if config.norm_splits is not None:
        splits = _layer_names(config.norm_splits)
        raise ValueError(
            "the released layout has one normalisation per Pattention; this model normalises its new tokens apart "
            f"from the old ones in {', '.join(splits)} (grown with normalisation='separate'). Save with "
            "tokenformer.save_model instead."
        )
    grown = [
        f"layers.{entry['layer']}.{name}: tau={info['tau']:.6g}, "
        f"sqrt({info['tokens']})={release_tau(info['tokens']):.6g}"
        for entry in growth_summary(model)
        for name, info in entry.items()
        if name != "layer" and not math.isclose(info["tau"], release_tau(info["tokens"]), rel_tol=1e-6)
    ]
    if grown:
        raise ValueError(
            "the released layout stores no tau and computes sqrt(token count); these layers have another tau "
            f"(a grown or pruned model) and would change function: {'; '.join(grown)}. "
            "Save with tokenformer.save_model instead."
        )
    state = model.state_dict()
    return {released: state[mine] for released, mine in released_key_map(config).items()}


def read_released(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a released ``pytorch_model.bin`` (or a directory holding one) without running pickled code."""
    path = file_or_inside(path, RELEASED_WEIGHTS_NAME, "released checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch's weights-only errors have no common base
        raise ValueError(
            f"cannot read {path} as a state dict of tensors (weights_only=True refuses anything else; the file may be "
            f"truncated, or not a PyTorch checkpoint): {one_line(exc)}"
        ) from exc
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return dict(state)


def load_released(
    source: str | Path | Mapping[str, torch.Tensor],
    config: TokenformerConfig | str | None = None,
    *,
    n_heads: int | None = None,
) -> TokenformerLM:
    """A ``TokenformerLM`` holding a released checkpoint.

    ``source`` is a ``pytorch_model.bin``, a directory with one, or an already loaded state dict.
    ``config`` is a ``TokenformerConfig``, a preset name (``"150M"``), or ``None`` to read it
    from the shapes (see :func:`infer_config`; ``n_heads`` when no released preset matches).
    """
    state = source if isinstance(source, Mapping) else read_released(source)
    if isinstance(config, str):
        config = TokenformerConfig.from_preset(config)
    if config is None:
        config = infer_config(state, n_heads=n_heads)
    converted = released_to_ours(state, config)
    model = _meta_model(config)
    model.load_state_dict(converted, strict=True, assign=True)
    return model


def download_released(repo_id: str, revision: str | None = None, filename: str = RELEASED_WEIGHTS_NAME) -> Path:
    """Download one file of a hub repository (the released ``pytorch_model.bin`` by default) into the HF cache."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as exc:
        raise ImportError("downloading from the hub needs huggingface_hub: pip install 'tokenformer[hf]'") from exc
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except LocalEntryNotFoundError as exc:
        raise ConnectionError(
            f"cannot download {filename} from the hub repository {repo_id!r}: the hub is unreachable from this "
            f"machine (offline, or HF_HUB_OFFLINE is set) and the file is not in the local cache. Download it where "
            f"the network allows (https://huggingface.co/{repo_id}) and pass the local path instead."
        ) from exc
    except HfHubHTTPError as exc:
        raise ConnectionError(f"cannot download {filename} from the hub repository {repo_id!r}: {exc}") from exc
