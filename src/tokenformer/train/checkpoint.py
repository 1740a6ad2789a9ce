"""Training checkpoints: complete or absent, verified on load, never unpickled.

A checkpoint is a directory ``<run>/checkpoints/step-NNNNNNNN``::

    config.json, model.safetensors   the model (tokenformer.io's model directory format)
    tokenizer.json                   the tokenizer it was trained with (when there is one)
    optimizer.safetensors            optimizer moments and RNG states
    ema.safetensors                  the moving average of the weights (with ``ema_decay``), a
                                     state dict of the same model
    trainer_state.json               step, tokens, FLOPs, validation and growth history, optimizer
                                     hyperparameters, the resolved training config
    manifest.json                    size and sha256 of every file above, written last

It is built in a hidden staging folder and renamed into place, so a crash never leaves a
half-written checkpoint under its real name; the manifest catches later truncation or bit rot.
The model directory loads on its own with ``tokenformer.load_model``.

A *sharded* checkpoint (written by ``--strategy fsdp``) has the same layout except that the
weights and optimizer moments are ``torch.distributed.checkpoint`` shards::

    config.json, tokenizer.json, trainer_state.json, manifest.json   as above
    rng.safetensors                  rank 0's RNG states
    dcp/                             the model and optimizer state, one file per writing rank

It loads on any number of ranks (DCP reshards on load), including one process without a
process group; ``tokenformer consolidate`` turns it into the single-file format and back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import families, io

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
TOKENIZER = "tokenizer.json"
SHARDS = "dcp"
RNG = "rng.safetensors"
EMA = "ema.safetensors"
_NAME = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, truncated or corrupted; the message names the file."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def optimizer_to_tensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON-able metadata."""
    tensors, scalars = {}, {}
    for index, state in state_dict["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    tokenizer_json: str | None = None,
    rng: dict[str, torch.Tensor] | None = None,
    sharded: bool = False,
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a complete checkpoint at ``directory`` (which must not exist yet), atomically.

    ``rng`` defaults to this process's RNG states. ``sharded`` writes the weights and optimizer
    state with ``torch.distributed.checkpoint``: then this is a collective call, every rank
    writing its shards into one staging folder (on a file system all ranks share) and rank 0
    adding the rest and renaming the folder into place. ``ema`` (a state dict of the averaged
    weights) is written as ``ema.safetensors``; not with ``sharded``.
    """
    import torch.distributed as dist

    directory = Path(directory)
    if ema is not None and sharded:
        raise ValueError("a sharded checkpoint cannot hold averaged weights (ema); allowed: ema=None with sharded=True")
    if directory.exists():
        raise FileExistsError(f"{directory} already exists; refusing to overwrite it")
    collective = sharded and dist.is_initialized()
    main = not collective or dist.get_rank() == 0
    rng = rng_tensors() if rng is None else rng
    with io.atomic_directory(directory) if main else contextlib.nullcontext() as staging:
        if sharded:
            import torch.distributed.checkpoint as dcp

            if collective:
                box = [str(staging) if main else None]
                dist.broadcast_object_list(box, src=0)
                staging = Path(box[0])
            with _one_process_is_fine():
                dcp.save(_named_state(model, optimizer), checkpoint_id=staging / SHARDS)
        if main:
            if sharded:
                families.save_model_config(model, staging)
                io.save_weights(rng, staging / RNG)
            else:
                families.save_model(model, staging)
                tensors, meta = optimizer_to_tensors(optimizer.state_dict())
                io.save_weights({**tensors, **rng}, staging / OPTIMIZER)
                if ema is not None:
                    io.save_weights(ema, staging / EMA)
                trainer_state = {**trainer_state, "optimizer": meta}
            if tokenizer_json is not None:
                io.atomic_write_text(staging / TOKENIZER, tokenizer_json)
            io.atomic_write_text(staging / STATE, json.dumps(trainer_state, indent=2) + "\n")
            _write_manifest(staging)
    if collective:
        dist.barrier()  # no rank goes on before the checkpoint is in place
    return directory


def _write_manifest(staging: Path) -> None:
    files = {
        p.relative_to(staging).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(staging.rglob("*"))
        if p.is_file()
    }
    io.atomic_write_text(staging / MANIFEST, json.dumps({"files": files}, indent=2) + "\n")


def is_sharded(directory: str | Path) -> bool:
    return (Path(directory) / SHARDS).is_dir()


@contextlib.contextmanager
def _one_process_is_fine():
    # Without a process group DCP reads and writes as a single process, as meant here, and warns.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (load|save) in a single process")
        yield


def _named_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    # Keyed by parameter name, and sharded like the model: what DCP saves and reshards on load.
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}


def load_sharded_state(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Fill ``model`` and ``optimizer`` (sharded or not, on any number of ranks) from a sharded checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _named_state(model, optimizer)
    with _one_process_is_fine():
        dcp.load(state, checkpoint_id=Path(directory) / SHARDS)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def verify_checkpoint(directory: str | Path) -> dict:
    """Check every file against the manifest; raise :class:`CheckpointError` naming the bad file."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {directory} is incomplete: {manifest_path} is missing")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint file {manifest_path} is corrupted: {exc}") from exc
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"checkpoint file {path} is truncated or padded: {size} bytes, expected {expected['bytes']}"
            )
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"checkpoint file {path} is corrupted: its sha256 does not match the manifest")
    return files


@dataclass
class Checkpoint:
    path: Path
    model: nn.Module
    trainer_state: dict[str, Any]
    optimizer_state: dict
    rng: dict[str, torch.Tensor]
    tokenizer_json: str | None
    sharded: bool = False  # model is freshly initialised; load_sharded_state fills it and the optimizer
    ema: dict[str, torch.Tensor] | None = None  # averaged weights, when the run kept them


def load_checkpoint(
    directory: str | Path,
    device: str | torch.device = "cpu",
    load_model: Callable[[Path, Any], nn.Module] = families.load_model,
) -> Checkpoint:
    """Verify, then load a checkpoint (safetensors and JSON only: no pickled code runs).

    Of a sharded checkpoint this reads everything but the shards: the model is built from its
    config, and :func:`load_sharded_state` fills it once it is placed (and sharded) and has an optimizer.
    """
    directory = Path(directory)
    verify_checkpoint(directory)
    state = json.loads((directory / STATE).read_text())
    tokenizer_path = directory / TOKENIZER
    tokenizer_json = tokenizer_path.read_text(encoding="utf-8") if tokenizer_path.is_file() else None
    if is_sharded(directory):
        model = families.build_model(families.read_model_config(directory)).to(device)
        rng = io.load_weights(directory / RNG, device="cpu")
        return Checkpoint(directory, model, state, {}, rng, tokenizer_json, sharded=True)
    model = load_model(directory, device)
    tensors = io.load_weights(directory / OPTIMIZER, device="cpu")
    optimizer_state = optimizer_from_tensors(tensors, state.pop("optimizer"))
    rng = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    ema = io.load_weights(directory / EMA, device=device) if (directory / EMA).is_file() else None
    return Checkpoint(directory, model, state, optimizer_state, rng, tokenizer_json, ema=ema)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints of a run, oldest first (staging folders of an interrupted save are not listed)."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run that verifies; damaged newer ones are reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            warnings.warn(f"{exc}; falling back to the previous checkpoint", stacklevel=2)
            continue
        return path
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as given, or the newest good one of a run directory."""
    path = Path(path).expanduser()
    if (path / MANIFEST).is_file() or _NAME.match(path.name):
        return path
    if (path / CHECKPOINTS).is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"run directory {path} has no complete checkpoint")
        return latest
    raise FileNotFoundError(f"{path} is neither a checkpoint nor a run directory with {CHECKPOINTS}/")


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (each vanishes whole, never halfway)."""
    for path in list_checkpoints(run_dir)[:-keep_last]:
        io.remove_directory(path)


def read_train_config(directory: str | Path) -> dict[str, Any]:
    """The resolved training config saved with a checkpoint."""
    path = Path(directory) / STATE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a training checkpoint: {STATE} is missing")
    return json.loads(path.read_text())["train_config"]
