"""Released checkpoint (local or on the hub) -> a model directory of ours.

The directory is exactly what :func:`tokenformer.save_model` writes (``config.json`` with
``model_type: tokenformer``, ``model.safetensors``, the model code and card, and the tokenizer
files when a tokenizer is given), so ``tokenformer.load_model``,
``AutoModelForCausalLM.from_pretrained`` (with ``trust_remote_code=True`` where tokenformer is not
installed) and lm-evaluation-harness all read it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..config import TokenformerConfig
from ..families import CONFIG_NAME, save_model
from ..io import atomic_directory, claim_output
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
    The directory is built beside ``destination`` and renamed into place, so that it holds the
    old model or the new one, whole, whatever happens; ``overwrite`` replaces a model directory
    as a whole (no file of the old model stays). Two writers of one ``destination`` at once:
    the second is refused.
    """
    destination = Path(destination).expanduser()
    with claim_output(destination, replace=True):
        check_replaceable(destination, overwrite)
        tokenizer = as_tokenizer(tokenizer) if tokenizer is not None else None  # a bad path fails before any work
        model = load_released(source, config, n_heads=n_heads)
        with atomic_directory(destination, replace=True) as staging:
            save_model(model, staging, tokenizer)
    return destination


def check_replaceable(destination: Path, overwrite: bool) -> None:
    """Refuse to write ``destination`` unless it is new, an empty folder, or (with ``overwrite``)
    a model directory: replacing it as a whole must lose no file of anything else."""
    if not os.path.lexists(destination):
        return
    if not destination.is_dir() or destination.is_symlink():
        raise FileExistsError(f"{destination} exists and is not a directory; allowed: a new or empty directory")
    if (destination / CONFIG_NAME).is_file():
        if not overwrite:
            raise FileExistsError(
                f"{destination} already holds a model ({CONFIG_NAME}); pass overwrite=True (--overwrite) to replace it"
            )
    elif any(destination.iterdir()):
        raise FileExistsError(
            f"{destination} holds files but no model ({CONFIG_NAME}); refusing to replace them: "
            "allowed: a new or empty directory, or a model directory with overwrite"
        )


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
