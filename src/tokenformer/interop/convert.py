"""Released checkpoint (local or on the hub) -> a model directory of ours.

The directory is exactly what :func:`tokenformer.save_model` writes (``config.json`` with
``model_type: tokenformer``, ``model.safetensors``, the model code and card, and the tokenizer
files when a tokenizer is given), so ``tokenformer.load_model``,
``AutoModelForCausalLM.from_pretrained`` (with ``trust_remote_code=True`` where tokenformer is not
installed) and lm-evaluation-harness all read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..config import TokenformerConfig
from ..families import CONFIG_NAME, save_model
from .released import HUB_MODELS, download_released, load_released
from .tokenizer import GPT_NEOX_TOKENIZER_REPO, TOKENIZER_NAME, as_tokenizer


def convert_released(
    source: str | Path | Mapping[str, torch.Tensor],
    destination: str | Path,
    config: TokenformerConfig | str | None = None,
    *,
    n_heads: int | None = None,
    tokenizer: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a released checkpoint into ``destination`` in our format; returns the directory.

    ``config``/``n_heads`` as in :func:`~tokenformer.interop.released.load_released`;
    ``tokenizer`` is a ``tokenizer.json`` (or a directory with one) stored beside the weights.
    """
    destination = Path(destination).expanduser()
    if (destination / CONFIG_NAME).exists() and not overwrite:
        raise FileExistsError(
            f"{destination} already holds a model ({CONFIG_NAME}); pass overwrite=True (--overwrite) to replace it"
        )
    tokenizer = as_tokenizer(tokenizer) if tokenizer is not None else None  # a bad path fails before any work
    model = load_released(source, config, n_heads=n_heads)
    return save_model(model, destination, tokenizer)


def convert_from_hub(
    repo_id: str,
    destination: str | Path,
    config: TokenformerConfig | str | None = None,
    *,
    revision: str | None = None,
    n_heads: int | None = None,
    tokenizer: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Download a released model (a hub id, or a size such as ``"150M"``) and convert it.

    A released size or id sets the preset unless ``config`` is given. Without ``tokenizer``,
    GPT-NeoX-20B's ``tokenizer.json`` is downloaded too.
    """
    sizes = {repo: size for size, repo in HUB_MODELS.items()}
    if repo_id in HUB_MODELS:
        repo_id = HUB_MODELS[repo_id]
    if config is None:
        config = sizes.get(repo_id)
    weights = download_released(repo_id, revision)
    if tokenizer is None:
        tokenizer = download_released(GPT_NEOX_TOKENIZER_REPO, filename=TOKENIZER_NAME)
    return convert_released(weights, destination, config, n_heads=n_heads, tokenizer=tokenizer, overwrite=overwrite)
