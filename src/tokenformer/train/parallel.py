"""Training on several processes with PyTorch's own engine: torchrun, DDP, FSDP2.

Parallelism is applied from outside the model code (as torchtitan does): the trainer builds a
plain model and hands it to :func:`parallelize`. Each rank trains on its own slice of every
micro-batch (:class:`RankSlice`), so the global batch -- and with it the loss curve -- is that
of a single-process run with the same ``batch_size``.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` reads them through ``init_process_group``'s ``env://`` rendezvous.
"""

from __future__ import annotations

import contextlib
import os
import typing
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import Strategy

STRATEGIES: tuple[str, ...] = typing.get_args(Strategy)


@dataclass(frozen=True)
class Distributed:
    """Where this process stands: its rank among ``world_size`` and the device it drives."""

    strategy: str = "single"
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.strategy != "single"


def init_distributed(strategy: str, device: torch.device, timeout_s: float) -> Distributed:
    """Join the process group that ``torchrun`` describes (NCCL on GPUs, gloo on CPUs).

    A rank that stops answering makes the others fail after ``timeout_s`` instead of waiting
    forever; ``torchrun`` then stops the job and names the rank that failed first.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is invalid; allowed: {', '.join(STRATEGIES)}")
    if strategy == "single":
        return Distributed(device=device)
    missing = [
        name for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ
    ]
    if missing and not dist.is_initialized():
        raise ValueError(
            f"strategy={strategy} needs the environment torchrun sets ({', '.join(missing)} missing); "
            f"launch with: torchrun --nproc-per-node N -m tokenformer.cli train --strategy {strategy} ..."
        )
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return Distributed(strategy, dist.get_rank(), dist.get_world_size(), device)


def parallelize(model: nn.Module, env: Distributed) -> nn.Module:
    """Apply ``env.strategy`` to ``model``; returns the module to run.

    ``ddp`` wraps the model in ``DistributedDataParallel`` (the bare model stays usable for
    checkpoints and growth). ``fsdp`` shards every transformer block and then the whole model
    with FSDP2's ``fully_shard``, in place: the returned module is ``model`` itself, whose
    parameters are now DTensors, so the optimizer must be built afterwards.
    """
    if env.strategy == "single":
        return model
    if env.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    for block in getattr(model, "layers", []):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _whole() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True)


def place(
    model: nn.Module, optimizer: torch.optim.Optimizer, env: Distributed, make_optimizer
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Parallelize a whole ``model`` and move ``optimizer``'s state to a new optimizer over it.

    Returns the module to run and the new optimizer (``make_optimizer(model)``). The state goes
    by parameter name, so it lands in the right shards when FSDP2 has replaced the parameters.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=_whole()) if optimizer.state else None
    wrapped = parallelize(model, env)
    model.zero_grad(
        set_to_none=True
    )  # DCP builds the new optimizer's state with one zero-gradient step, only where no gradient is left
    optimizer = make_optimizer(model)
    if state is not None:
        set_optimizer_state_dict(model, optimizer, state, options=_whole())
    return wrapped, optimizer


def gather(
    model: nn.Module, optimizer: torch.optim.Optimizer, whole_model: nn.Module, make_optimizer
) -> torch.optim.Optimizer:
    """Copy a sharded ``model`` into ``whole_model`` (same architecture, unsharded) on every rank;
    returns an optimizer over ``whole_model`` with ``optimizer``'s state gathered. A collective call."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    whole_model.load_state_dict(get_model_state_dict(model, options=_whole()))
    state = get_optimizer_state_dict(model, optimizer, options=_whole())
    whole_optimizer = make_optimizer(whole_model)
    set_optimizer_state_dict(whole_model, whole_optimizer, state, options=_whole())
    return whole_optimizer


def no_sync(module: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """Hold back the gradient reduction of data-parallel wrappers until the last micro-batch."""
    if not skip:
        return contextlib.nullcontext()
    if hasattr(module, "no_sync"):  # DistributedDataParallel
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(module)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(module: nn.Module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


class RankSlice:
    """A task whose training batches are this rank's rows of the global micro-batch.

    Rank ``r`` of ``W`` takes rows ``[r * B/W, (r + 1) * B/W)`` of every micro-batch of ``B``
    rows: ranks never overlap, and together they see exactly the batch a single process would.
    Validation is not sliced: every rank evaluates the same windows (FSDP needs every rank in
    every forward pass), so the metrics equal the single-process ones.
    """

    def __init__(self, task: Any, batch_size: int, env: Distributed) -> None:
        if batch_size % env.world_size:
            raise ValueError(
                f"batch_size={batch_size} does not split over {env.world_size} ranks; "
                f"allowed: a multiple of the number of ranks (batch_size is the global micro-batch)"
            )
        self.task, self.env = task, env
        self.rows = slice(env.rank * batch_size // env.world_size, (env.rank + 1) * batch_size // env.world_size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)

    def train_batch(self, step: int, micro: int, device: torch.device) -> Any:
        batch = self.task.train_batch(step, micro, torch.device("cpu"))
        return tuple(part[self.rows].to(device) for part in batch)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.task.loss(model, batch)

    def count(self, batch: Any) -> int:
        return self.task.count(batch) * self.env.world_size

    def flops_per_item(self, model: nn.Module) -> int:
        return self.task.flops_per_item(model)

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        return self.task.evaluate(model, device)


def mean_over_ranks(value: torch.Tensor, env: Distributed) -> torch.Tensor:
    """The mean of a scalar over the ranks (each rank's loss covers an equal share of the batch)."""
    if env.active:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world_size
    return value


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly sharded one (the gradient norm of FSDP2 is a DTensor)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def barrier(env: Distributed) -> None:
    if env.active:
        dist.barrier()


def broadcast_object(value: Any, env: Distributed) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not env.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
