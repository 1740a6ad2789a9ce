"""Training checkpoints: complete or absent, verified on load, never unpickled.

A checkpoint is a directory ``<run>/checkpoints/step-NNNNNNNN``::

    config.json, model.safetensors   the model directory of tokenformer.save_model; a language
                                     model's is a Hugging Face hub folder: with its code (*.py),
                                     README.md and, beside the tokenizer, tokenizer_config.json,
                                     special_tokens_map.json and generation_config.json
    tokenizer.json                   the tokenizer it was trained with (when there is one)
    optimizer.safetensors            optimizer moments and RNG states
    ema.safetensors                  the moving average of the weights (with ``ema_decay``), a
                                     state dict of the same model
    trainer_state.json               step, tokens, FLOPs, validation and growth history, optimizer
                                     hyperparameters, the resolved training config
    manifest.json                    size and sha256 of every file above, written last

It is built in a hidden staging folder and renamed into place (swapped for an older checkpoint
of the same step), so a crash never leaves a half-written checkpoint under its real name; the
manifest catches later truncation or bit rot. The model directory loads on its own with
``tokenformer.load_model``.

A *sharded* checkpoint (written by ``--strategy fsdp``) has the same layout except that the
weights and optimizer moments are ``torch.distributed.checkpoint`` shards::

    config.json, tokenizer.json, trainer_state.json, manifest.json   as above
    rng.safetensors                  rank 0's RNG states
    dcp/                             the model and optimizer state, one file per writing rank

It loads on any number of ranks (DCP reshards on load), including one process without a
process group; ``tokenformer consolidate`` turns it into the single-file format and back. DCP
pickles its metadata and the non-tensor values (optimizer hyperparameters); loading reads them
with unpicklers that accept only DCP's metadata classes and plain data, so no code in a
checkpoint runs, sharded or not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import families, io
from ..data.tokenizer import Tokenizer
from ..validation import invalid, is_int, is_number

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
    replace: bool = False,
) -> Path:
    """Write a complete checkpoint at ``directory`` (which must not exist yet), atomically.

    With ``replace`` an existing ``directory`` is swapped for the new checkpoint in one step once
    the new one is complete.

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
    if directory.exists() and not replace:
        raise FileExistsError(f"{directory} already exists; refusing to overwrite it")
    collective = sharded and dist.is_initialized()
    main = not collective or dist.get_rank() == 0
    rng = rng_tensors() if rng is None else rng
    with io.atomic_directory(directory, replace=replace) if main else contextlib.nullcontext() as staging:
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
                if tokenizer_json is not None:
                    io.atomic_write_text(staging / TOKENIZER, tokenizer_json)
            else:
                tokenizer = Tokenizer.from_json(tokenizer_json) if tokenizer_json is not None else None
                families.save_model(model, staging, tokenizer)
                tensors, meta = optimizer_to_tensors(optimizer.state_dict())
                io.save_weights({**tensors, **rng}, staging / OPTIMIZER)
                if ema is not None:
                    io.save_weights(ema, staging / EMA)
                trainer_state = {**trainer_state, "optimizer": meta}
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
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _named_state(model, optimizer)
    shards = Path(directory) / SHARDS
    reader, planner = _safe_reader(shards), _safe_planner(shards)
    try:
        with _one_process_is_fine(), _quiet_dcp_fallbacks():
            dcp.load(state, storage_reader=reader, planner=planner)
    except (Exception, CheckpointException) as exc:  # DCP reports a rank's failure as a BaseException
        refused = reader.refused or planner.refused
        if refused is not None:
            raise refused from None
        failures = getattr(exc, "failures", {})
        cause = next(iter(failures.values()))[0] if failures else exc
        raise CheckpointError(
            f"cannot load the checkpoint shards in {shards} (corrupted or tampered with?): {io.one_line(cause)}"
        ) from None
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


@contextlib.contextmanager
def _quiet_dcp_fallbacks():
    # DCP logs each metadata file it cannot read (with a traceback) on the root logger before
    # trying the next; the error raised afterwards says it once.
    import logging

    def drop(record: logging.LogRecord) -> bool:
        return "torch/distributed/checkpoint" not in record.pathname.replace("\\", "/")

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _metadata_globals() -> Callable[[str, str], Any]:
    """What DCP's pickled metadata may name: its own metadata classes, the storage record of its
    file reader, ``torch.Size``, dtypes, layouts and paths. Anything else is refused."""
    import pathlib

    import torch.distributed.checkpoint.metadata as metadata
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    def find(module: str, name: str) -> Any:
        if module == metadata.__name__:
            found = getattr(metadata, name, None)
            if isinstance(found, type) and found.__module__ == metadata.__name__:
                return found
        elif module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo":
            return _StorageInfo
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        elif module == "torch.serialization" and name == "_get_layout":  # a layout by its name
            return torch.serialization._get_layout
        elif module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
            return getattr(pathlib, name)
        return None

    return find


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path) -> None:
        super().__init__(file)
        self.path = path
        self.allowed = _metadata_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed(module, name)
        if found is None:
            raise CheckpointError(
                f"checkpoint file {self.path} names {module}.{name}, which DCP metadata never holds; refusing to "
                "load it (the file was tampered with or is not DCP metadata)"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"checkpoint file {self.path} holds a persistent id {pid!r}; refusing to load it")


def _safe_reader(shards: Path):
    """DCP's file reader, reading the metadata with :class:`_MetadataUnpickler` instead of ``pickle.load``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class Reader(FileSystemReader):
        refused: CheckpointError | None = None

        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            path = Path(self._get_metadata_path(kwargs.get("rank")))
            with open(path, "rb") as f:  # a missing file: DCP goes on to look for per-rank metadata
                try:
                    metadata = _MetadataUnpickler(f, path).load()
                    if not isinstance(metadata, Metadata):
                        raise CheckpointError(
                            f"checkpoint file {path} holds a {type(metadata).__name__}, not DCP metadata"
                        )
                except Exception as exc:  # a damaged pickle can fail in many ways
                    if not isinstance(exc, CheckpointError):
                        exc = CheckpointError(f"checkpoint file {path} is not readable DCP metadata: {exc}")
                    self.refused = self.refused or exc
                    raise exc from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(shards)


def _shard_tensors(shards: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The shape and dtype of every model tensor in a sharded checkpoint, from DCP's metadata
    alone (read with :class:`_MetadataUnpickler`)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = _safe_reader(shards).read_metadata()
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint shards {shards} have no metadata: {exc.filename} is missing") from None
    return {
        fqn.removeprefix("model."): (tuple(item.size), item.properties.dtype)
        for fqn, item in metadata.state_dict_metadata.items()
        if fqn.startswith("model.") and isinstance(item, TensorStorageMetadata)
    }


def _safe_planner(shards: Path):
    """DCP's load planner, reading non-tensor values (optimizer hyperparameters) with
    ``torch.load(weights_only=True)`` as DCP's reader already reads tensors: plain data only,
    where DCP's own planner would unpickle anything."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.planner import ReadItem

    class Planner(DefaultLoadPlanner):
        refused: CheckpointError | None = None

        def load_bytes(self, read_item: ReadItem, value: BytesIO) -> None:
            try:
                data = torch.load(value, weights_only=True)
            except Exception as exc:  # weights_only refuses every global it does not know
                self.refused = CheckpointError(
                    f"checkpoint shards in {shards}: cannot read {read_item.dest_index.fqn!r} as plain data "
                    f"(tampered with?): {io.one_line(exc)}"
                )
                raise self.refused from None
            # DCP's own placement of the value, handed a copy that is plain data by construction.
            plain = BytesIO()
            torch.save(data, plain)
            plain.seek(0)
            super().load_bytes(read_item, plain)

    return Planner()


def verify_checkpoint(directory: str | Path) -> dict:
    """Check every file against the manifest; raise :class:`CheckpointError` naming the bad file."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {directory} is incomplete: {manifest_path} is missing")
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
        entries = [(name, int(expected["bytes"]), str(expected["sha256"])) for name, expected in files.items()]
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"checkpoint file {manifest_path} is corrupted: it is not UTF-8 text") from exc
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint file {manifest_path} is corrupted: {exc!r}") from exc
    for name, size_expected, sha256 in entries:
        path = directory / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(
                f"checkpoint file {manifest_path} is corrupted: it names {name!r}, outside {directory}"
            )
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        size = path.stat().st_size
        if size != size_expected:
            raise CheckpointError(
                f"checkpoint file {path} is truncated or padded: {size} bytes, expected {size_expected}"
            )
        if _sha256(path) != sha256:
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
    state = read_trainer_state(directory)
    tokenizer_path = directory / TOKENIZER
    tokenizer_json = None
    if tokenizer_path.is_file():
        try:
            tokenizer_json = tokenizer_path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise CheckpointError(f"checkpoint file {tokenizer_path} is not a tokenizer (not UTF-8 text)") from exc
    if is_sharded(directory):
        config = families.read_model_config(directory)
        shards = directory / SHARDS
        families.check_weights(config, _shard_tensors(shards), shards, directory / families.CONFIG_NAME)
        model = families.build_model(config).to(device)
        rng = io.load_weights(directory / RNG, device="cpu")
        return Checkpoint(directory, model, state, {}, rng, tokenizer_json, sharded=True)
    model = load_model(directory, device)
    tensors = io.load_weights(directory / OPTIMIZER, device="cpu")
    _check_optimizer_meta(state.get("optimizer"), directory / STATE)
    try:
        optimizer_state = optimizer_from_tensors(tensors, state.pop("optimizer"))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"checkpoint {directory}: {STATE} and {OPTIMIZER} do not describe an optimizer state: {exc!r}"
        ) from exc
    rng = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    ema = io.load_weights(directory / EMA, device=device) if (directory / EMA).is_file() else None
    return Checkpoint(directory, model, state, optimizer_state, rng, tokenizer_json, ema=ema)


def read_trainer_state(directory: str | Path) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint; one that is not a trainer state, or holds a value
    that cannot be one (a negative step, a count that is not a number), raises a
    :class:`CheckpointError` naming the file and the field."""
    path = Path(directory) / STATE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a training checkpoint: {STATE} is missing")
    try:
        state = io.read_json(path)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    if not (isinstance(state, dict) and is_int(state.get("step")) and isinstance(state.get("train_config"), dict)):
        raise CheckpointError(
            f"checkpoint file {path} is not a trainer state: it needs an integer step and a train_config"
        )
    for name, (ok, allowed) in _STATE_FIELDS.items():
        if name in state and not ok(state[name]):
            raise _bad_field(path, name, state[name], allowed)
    return state


def _records(value: Any) -> bool:
    # A history: a list of records, each with the integer step it was made at.
    return isinstance(value, list) and all(isinstance(r, dict) and is_int(r.get("step")) for r in value)


# The fields of trainer_state.json that the trainer restores, and what each may hold.
_STATE_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "step": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "tokens": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "flops": (lambda v: is_number(v) and v >= 0, "a finite number >= 0"),
    "wall_time": (lambda v: is_number(v) and v >= 0, "a finite number >= 0"),
    "first_loss": (lambda v: v is None or is_number(v), "a finite number or null"),
    "ema_updates": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "val_history": (_records, "a list of records with an integer step"),
    "growth_history": (_records, "a list of records with an integer step"),
}


def _check_optimizer_meta(meta: Any, path: Path) -> None:
    """The optimizer hyperparameters of ``trainer_state.json``: numbers (or flags) where AdamW
    reads them, so that a tampered value fails here with the file named, not in a step."""

    def plain(key: str, value: Any) -> bool:
        numbers = isinstance(value, list) and all(is_number(v) for v in value)  # betas, params
        return value is None or isinstance(value, bool) or is_number(value) or numbers or key == "name"

    groups = meta.get("param_groups") if isinstance(meta, dict) else None
    scalars = meta.get("scalars") if isinstance(meta, dict) else None
    if not (isinstance(groups, list) and all(isinstance(g, dict) for g in groups) and isinstance(scalars, dict)):
        raise CheckpointError(f"checkpoint file {path}: field optimizer needs param_groups (a list) and scalars")
    for i, group in enumerate(groups):
        for key, value in group.items():
            if not plain(key, value):
                allowed = "a finite number, a list of them, true/false or null"
                raise _bad_field(path, f"optimizer.param_groups[{i}].{key}", value, allowed)
    for index, values in scalars.items():
        for key, value in values.items() if isinstance(values, dict) else [("*", values)]:
            if not is_number(value):
                raise _bad_field(path, f"optimizer.scalars.{index}.{key}", value, "a finite number")


def _bad_field(path: Path, name: str, value: Any, allowed: str) -> CheckpointError:
    return CheckpointError(str(invalid(f"checkpoint file {path}: field", name, value, allowed)))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints of a run, oldest first (staging folders of an interrupted save and checkpoints
    set aside as ``*.corrupt`` or ``*.superseded`` are not listed)."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | Path) -> int:
    """The step in a checkpoint's name (``step-00000040`` -> 40)."""
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not named like a checkpoint (step-NNNNNNNN)")
    return int(match.group(1))


def scan_checkpoints(run_dir: str | Path) -> tuple[Path | None, list[Path]]:
    """The newest checkpoint of a run that verifies, and the damaged newer ones (each reported)."""
    damaged = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            warnings.warn(f"{exc}; falling back to the previous checkpoint", stacklevel=3)
            damaged.append(path)
            continue
        return path, damaged
    return None, damaged


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run that verifies; damaged newer ones are reported and skipped."""
    return scan_checkpoints(run_dir)[0]


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


@contextlib.contextmanager
def reading(path: str | Path):
    """While inside, the run that ``path`` belongs to (a run directory, or one of its
    checkpoints) deletes and replaces none of its checkpoints, so that a reader of a run that is
    training finds the checkpoint it picked whole until it is done. New checkpoints still
    appear; old ones are pruned at a later save. Anything else (a model directory) is read as is.

    Readers share a lock on ``<run>/.checkpoints.lock`` that the trainer takes alone to delete or
    replace a checkpoint (:func:`changing`)."""
    path = Path(path).expanduser()
    folder = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path.parent
    if folder.name != CHECKPOINTS or not folder.is_dir():
        yield
        return
    with io.flocked(io.lock_beside(folder), shared=True):
        yield


def changing(run_dir: str | Path, wait: bool = True):
    """The trainer's side of :func:`reading`: a context that yields whether it may delete or
    replace checkpoints of ``run_dir`` now (with ``wait``, once the readers are done)."""
    return io.flocked(io.lock_beside(Path(run_dir) / CHECKPOINTS), wait=wait)


def set_aside_checkpoints(run_dir: str | Path, damaged: list[Path], start_step: int) -> list[Path]:
    """Before a run that starts at ``start_step`` writes into ``run_dir``: rename each damaged
    checkpoint to ``*.corrupt`` and each later one (written by an earlier run that went further,
    which this run replaces) to ``*.superseded``, so that neither is resumed from, blocks a step
    or counts for ``keep_last``. Returns the new paths; nothing is deleted."""
    moved = []
    with changing(run_dir):
        for path in list_checkpoints(run_dir):
            if path in damaged:
                moved.append(io.set_aside(path, "corrupt"))
            elif checkpoint_step(path) > start_step:
                moved.append(io.set_aside(path, "superseded"))
    if moved:
        warnings.warn(
            f"set aside {len(moved)} checkpoint(s) this run does not continue: {', '.join(p.name for p in moved)} "
            f"(in {Path(run_dir) / CHECKPOINTS}; delete them when no longer needed)",
            stacklevel=2,
        )
    return moved


def prune_checkpoints(run_dir: str | Path, keep_last: int, keep: Path | None = None) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (each vanishes whole, never halfway);
    ``keep`` (the checkpoint just written) is never deleted. While the run is being read
    (:func:`reading`) nothing is deleted: a later call catches up."""
    with changing(run_dir, wait=False) as free:
        if not free:
            return
        for path in list_checkpoints(run_dir)[:-keep_last]:
            if keep is None or path != Path(keep):
                io.remove_directory(path)


def read_train_config(directory: str | Path) -> dict[str, Any]:
    """The resolved training config saved with a checkpoint."""
    return read_trainer_state(directory)["train_config"]
