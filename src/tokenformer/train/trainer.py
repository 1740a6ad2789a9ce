"""The training loop: AdamW, warmup + cosine, clipping, accumulation, precision, checkpoints.

Usable from Python as well as from the command line::

    trainer = Trainer(TrainConfig(model="cpu-1M", max_steps=500))
    trainer.fit(250)                       # train up to step 250
    trainer.grow(qkv_tokens=192, ffn_tokens=768)
    trainer.fit()                          # continue, optimizer state carried, to max_steps
    trainer.state.val_history              # [{"step", "tokens", "flops", "val_loss", ...}, ...]

What is specific to a problem sits behind :class:`~tokenformer.train.task.Task`. Data
parallelism (``config.strategy``: DDP or FSDP2 under ``torchrun``) is applied from outside by
:func:`tokenformer.train.parallel.parallelize`; further wrapping for execution (``torch.compile``)
is the ``wrap_model`` hook. The trainer keeps the model for growth and checkpoints, trains the
wrapped one and validates the unwrapped one (data-parallel wrappers kept).
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from .. import families, io
from ..data import Tokenizer
from ..growth import (
    GrownParameter,
    GrowthRecord,
    RowUpdateScale,
    ScaledRows,
    StackRecord,
    TokenUpdateScale,
    carry_optimizer_state,
    grow,
    grown_parameters,
    growth_summary,
    stack_layers,
)
from ..model import set_activation_checkpointing
from ..pruning import PruneRecord, calibration_scores, prune, prune_like, prune_optimizer_state
from ..schedule import GrowthStage, growth_generator, growth_schedule, growth_to, model_size
from ..sparse_finetuning import (
    USAGE_FILE,
    chosen_tokens,
    freeze_all_but_memory_values,
    freeze_all_but_tokens,
    load_usage,
    save_usage,
    slot_usage,
    token_scores,
    token_usage,
    trainable_rows,
    trainable_slots,
)
from ..sparse_pattention import QueryBatchNorm
from .checkpoint import (
    CHECKPOINTS,
    TOKENIZER,
    Checkpoint,
    CheckpointError,
    changing,
    checkpoint_name,
    load_checkpoint,
    load_sharded_state,
    prune_checkpoints,
    reading,
    resolve_checkpoint,
    restore_rng,
    save_checkpoint,
    scan_checkpoints,
    set_aside_checkpoints,
)
from .config import SPARSE_CONTINUAL, TrainConfig
from .interrupt import TrainingInterrupted, deferred_interrupt
from .metrics import Logger, MetricsLogger, plot_loss_curve
from .parallel import (
    RankSlice,
    barrier,
    broadcast_object,
    full_value,
    gather,
    init_distributed,
    mean_over_ranks,
    no_sync,
    place,
)
from .task import Task
from .tasks import make_task

TRAIN_CONFIG = "train_config.yaml"


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN or infinite, or (with ``stop_on_divergence``) the
    validation loss rose far above its best; no checkpoint was written for that step."""


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0  # items trained on: tokens for a language model, images for a classifier
    flops: float = 0.0
    wall_time: float = 0.0  # seconds spent in training steps (not validation or saving), all sessions
    val_history: list[dict[str, float]] = field(default_factory=list)
    growth_history: list[dict[str, Any]] = field(default_factory=list)
    first_loss: float | None = None  # the first training loss logged (the untrained model's): divergence checks


def resolve_device(name: str) -> torch.device:
    """``auto`` (cuda when available, else cpu) or the device named, refused unless this machine has it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"device {name!r} is not available: {why}; allowed here: auto or cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"device {name!r} is not available: {count} CUDA device(s); allowed: cuda:0..cuda:{count - 1}"
            )
    elif device.type in ("mps", "xpu"):
        backend = torch.backends.mps if device.type == "mps" else torch.xpu
        if not backend.is_available():
            raise ValueError(f"device {name!r} is not available on this machine; allowed here: auto or cpu")
    return device


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on the matrices only (on the parameter tokens with
    ``token_weight_decay`` when it is set); a sparse memory's values in a group of their own
    (``memory_weight_decay``, and ``lr_scale = memory_lr_scale``, which the step applies).

    The fused implementation (one kernel per parameter) runs where torch has it: plain tensors
    on CPU or CUDA. On CPU the per-tensor loop otherwise costs a noticeable share of a small
    model's step (benchmarks/results/optimizer_step-cpu.md). Sharded (DTensor) parameters and other devices
    keep torch's default implementation. Every state dict loaded into it later (resume, FSDP
    placement, consolidation) keeps that choice: see :func:`keep_own_implementation`.
    """
    fused = all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") for p in model.parameters())
    optimizer = torch.optim.AdamW(
        model.param_groups(
            config.weight_decay,
            config.token_weight_decay,
            memory_lr_scale=config.memory_lr_scale,
            memory_weight_decay=config.memory_weight_decay,
        ),
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        fused=fused or None,
    )
    optimizer.register_load_state_dict_post_hook(keep_own_implementation)
    return optimizer


def keep_own_implementation(optimizer: torch.optim.Optimizer) -> None:
    """Put back the implementation flags (``fused``, ``foreach``) ``optimizer`` was built with.

    Loading a state dict replaces the param groups with the saved ones, flags included: a
    checkpoint written by a fused CPU optimizer would otherwise turn on the fused kernel where
    it was not chosen (sharded parameters), and an older checkpoint would turn it off. The step
    counters go where the implementation keeps them: a fused (or capturable) optimizer on the
    parameters' device, the others on the CPU, as float32 either way.
    """
    flags = {key: optimizer.defaults[key] for key in ("fused", "foreach") if key in optimizer.defaults}
    for group in optimizer.param_groups:
        group.update(flags)
    on_device = bool(flags.get("fused") or optimizer.defaults.get("capturable"))
    for param, state in optimizer.state.items():
        step = state.get("step")
        if torch.is_tensor(step):
            state["step"] = step.to(param.device if on_device else torch.device("cpu"), torch.float32)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``max_steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(config.max_steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def ema_update(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]:
    """The averaging step of :class:`AveragedModel` for an exponential moving average with
    warmup: update ``k`` (counting from 1 after the copy that starts the average) uses the decay
    ``min(decay, (1 + k) / (10 + k))``, as TensorFlow's ``ExponentialMovingAverage`` with
    ``num_updates``, so that a short run's average is not dominated by its first weights."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        k = int(updates)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1 + k) / (10 + k)))

    return update


def stacked_source(name: str, sources: list[int]) -> str:
    """The parameter of the model before depth stacking that parameter ``name`` was copied from
    (``sources[i]``: the old index of new layer ``i``; parameters outside the layers are kept)."""
    if not name.startswith("layers."):
        return name
    index, rest = name.removeprefix("layers.").split(".", 1)
    return f"layers.{sources[int(index)]}.{rest}"


class Trainer:
    """Trains ``model`` on ``task`` as ``config`` says; resumes when ``config.resume`` is set.

    Without ``task`` the trainer builds the language-modelling task from ``config.data``;
    without ``model`` it builds the ``config.model`` preset. When resuming, the checkpoint's
    model (read with ``load_model``) is used instead of either. ``wrap_model(model) -> module`` is
    applied for training steps and again after growth; by default it compiles when
    ``config.compile`` is set. ``load_model(dir, device)`` reads a checkpoint's model directory
    (default: :func:`tokenformer.load_model`). ``loggers`` receive every record (on rank 0)
    besides those of ``config.loggers``: objects with ``log(step, kind, values)`` and ``close()``
    (:class:`~tokenformer.train.metrics.Logger`), closed by :meth:`close`.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        task: Task | None = None,
        model: nn.Module | None = None,
        tokenizer: Tokenizer | None = None,
        wrap_model: Callable[[nn.Module], nn.Module] | None = None,
        load_model: Callable[[Path, Any], nn.Module] = families.load_model,
        loggers: Sequence[Logger] = (),
    ) -> None:
        self.config = config
        self._extra_loggers = list(loggers)
        self.dist = init_distributed(config.strategy, resolve_device(config.device), config.dist_timeout)
        self.device = self.dist.device
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # without it, tiny activations make CPU training several times slower
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.run_dir = Path(config.out_dir)
        self._lock: io.DirectoryLock | None = None  # taken before the first write into run_dir
        self._claimed = False
        checkpoint = self._find_resume_checkpoint(load_model)
        if checkpoint is not None:
            self._check_resume(checkpoint)
        start = self._find_init_checkpoint(load_model) if checkpoint is None else None
        source = checkpoint if checkpoint is not None else start
        if source is not None and source.tokenizer_json is not None and tokenizer is None:
            try:
                tokenizer = Tokenizer.from_json(source.tokenizer_json)
            except Exception as exc:  # tokenizers raises its own Exception type for malformed files
                raise CheckpointError(f"checkpoint file {source.path / TOKENIZER} is not a tokenizer: {exc}") from exc
        if task is None:
            if not self.dist.is_main:
                barrier(self.dist)  # rank 0 prepares the data first (a tokenizer, token shards in the cache)
            task, tokenizer = make_task(config, tokenizer)
            if self.dist.is_main:
                barrier(self.dist)
        self.task = RankSlice(task, config.batch_size, self.dist) if self.dist.active else task
        self.tokenizer = tokenizer
        torch.manual_seed(config.seed)
        if source is not None:
            model = source.model
        elif model is None:
            model = self.task.build_model(config)
        self.model = model.to(self.device)
        self._model_class = type(self.model)  # FSDP2 changes the class of the model it shards
        self._wrap_model = wrap_model or self._default_wrap
        initial_growth = None
        if start is not None and config.grow_to:
            initial_growth = grow(
                self.model,
                **config.grow_to,
                depth_position=config.grow_depth_position,
                normalisation=config.grow_normalisation,
            )
        # grow_schedule: the sizes the model grows to during the run, from the size it started at
        # (a resumed run: as its checkpoint records, else the size of the config's model).
        saved = checkpoint.trainer_state.get("schedule_start") if checkpoint is not None else None
        if saved is None and checkpoint is not None and config.grow_schedule:
            saved = model_size(config.model_config())
        self.schedule_start = saved or model_size(self.model.config)
        self.growth_stages: list[GrowthStage] = (
            growth_schedule(config.grow_schedule, self.schedule_start, config.grow_to, config.max_steps)
            if config.grow_schedule
            else []
        )
        old_parameters = self._old_parameters(checkpoint, initial_growth)
        # continual: sparse: the usage statistics (new data, old data) its tokens are chosen by.
        self.token_usage: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None
        sparse_rows = self._sparse_rows(checkpoint, task) if config.continual in SPARSE_CONTINUAL else None
        optimizer = make_optimizer(self.model, config)
        if checkpoint is not None and not checkpoint.sharded:
            optimizer.load_state_dict(checkpoint.optimizer_state)
        self._place(optimizer)
        self.state = TrainState()
        self.resumed_from: Path | None = None
        if checkpoint is not None:
            self._restore(checkpoint)
        if initial_growth is not None:
            entry = {"step": 0, "tokens": 0, "init_from": str(start.path), **initial_growth.to_dict()}
            self.state.growth_history.append(entry)
        # The per-row learning rates of old_lr_scale or of continual: sparse (None: every parameter
        # at the schedule's rate).
        self.update_scale: RowUpdateScale | None = None
        if old_parameters is not None:
            self.update_scale = TokenUpdateScale(self.optimizer, old_parameters, old_scale=config.old_scale)
        elif sparse_rows is not None:
            self.update_scale = RowUpdateScale(self.optimizer, sparse_rows)
        self.ema: AveragedModel | None = None
        if config.ema_decay:
            saved = checkpoint.trainer_state.get("ema_updates", 0) if checkpoint is not None else 0
            self.ema = self._new_ema(checkpoint.ema if checkpoint is not None else None, saved)
        # Replaceable, e.g. by a schedule that warms the learning rate up again after growth.
        self.lr_schedule: Callable[[int], float] = lambda step: lr_at(step, self.config)
        self.last_checkpoint: Path | None = self.resumed_from
        self._metrics: MetricsLogger | None = None

    # -- construction -------------------------------------------------------------------------

    def _find_resume_checkpoint(self, load_model) -> Checkpoint | None:
        # Rank 0 picks the checkpoint (checking newer ones and noting the damaged), the others load it.
        self._damaged: list[Path] = []
        resume = self.config.resume
        if resume is None:
            return None
        with reading(self.run_dir if resume == "auto" else resume):  # another run may be training
            if resume == "auto":
                found = self._on_main(lambda: scan_checkpoints(self.run_dir))
                path, self._damaged = broadcast_object(found, self.dist)
            else:
                path = broadcast_object(self._on_main(lambda: resolve_checkpoint(resume)), self.dist)
            if path is None:
                return None  # "auto" in a run directory without a good checkpoint: a fresh start
            return load_checkpoint(path, self.device, load_model)

    def _check_resume(self, checkpoint: Checkpoint) -> None:
        """Options that cannot continue ``checkpoint`` are refused here, before anything is written."""
        config, saved = self.config, checkpoint.trainer_state
        step, task = saved["step"], saved["train_config"].get("task", "lm")
        if config.max_steps < step:
            raise ValueError(
                f"max_steps={config.max_steps} is below the step of the checkpoint to resume ({step}, "
                f"{checkpoint.path}); allowed: max_steps >= {step} (a resumed run trains on up to max_steps)"
            )
        if task != config.task:
            raise ValueError(
                f"task={config.task!r} cannot resume {checkpoint.path}: it holds a model of task {task!r}; "
                f"allowed: task={task!r}"
            )
        max_seq_len = getattr(checkpoint.model.config, "max_seq_len", None)
        if max_seq_len is not None and config.seq_len > max_seq_len:  # a model with positions
            raise ValueError(
                f"seq_len={config.seq_len} exceeds max_seq_len={max_seq_len} of the model in {checkpoint.path}; "
                f"allowed: seq_len <= {max_seq_len}"
            )

    def _on_main(self, work: Callable[[], Any]) -> Any:
        """``work()`` on rank 0 alone (its result there, None elsewhere); when it fails, every rank
        raises, so that no rank waits for the others in a collective that never comes."""
        result, error = None, None
        if self.dist.is_main:
            try:
                result = work()
            except Exception as exc:
                error = exc
        failure = broadcast_object(None if error is None else f"{type(error).__name__}: {error}", self.dist)
        if error is not None:
            raise error
        if failure is not None:
            raise RuntimeError(f"rank 0 failed: {failure}")
        return result

    def _claim_run(self) -> None:
        """Before the first write into the run directory: take its lock (one writer per run; rank 0
        holds it for all), delete staging folders of a killed save and set aside the checkpoints
        this run does not continue (damaged ones, and those after its starting step)."""
        if self._claimed:
            return

        def claim() -> io.DirectoryLock:
            lock = io.DirectoryLock(self.run_dir)
            try:
                folder = self.run_dir / CHECKPOINTS
                if folder.is_dir():
                    io.remove_stale_staging(folder)
                    set_aside_checkpoints(self.run_dir, self._damaged, self.state.step)
            except BaseException:
                lock.release()
                raise
            return lock

        self._lock = self._on_main(claim)
        self._claimed = True

    def _find_init_checkpoint(self, load_model) -> Checkpoint | None:
        if self.config.init_from is None:
            return None
        with reading(self.config.init_from):
            path = resolve_checkpoint(self.config.init_from)
            loaded = load_checkpoint(path, self.device, load_model)
        if loaded.sharded:
            raise ValueError(
                f"training option init_from={self.config.init_from!r} is a sharded checkpoint ({path}); allowed: a "
                "single-file one (tokenformer consolidate --checkpoint SHARDED --out SINGLE writes one)"
            )
        return loaded

    def _old_parameters(
        self, checkpoint: Checkpoint | None, growth: GrowthRecord | None
    ) -> list[GrownParameter] | None:
        """What ``old_lr_scale`` applies to: the old rows of the tensors grown by ``grow_to`` and
        every other parameter, as (parameter, old size) entries for :class:`TokenUpdateScale`.
        Frozen whole tensors (``old_lr_scale: 0``) stop requiring gradients instead, before the
        optimizer is built, so that they get no update, no weight decay and no optimizer state."""
        scale = self.config.old_scale
        if scale == 1:
            return None
        if growth is not None:
            before = growth.before
        else:  # a resumed run: the growth its first session made
            history = checkpoint.trainer_state.get("growth_history", []) if checkpoint is not None else []
            entry = next((e for e in history if "init_from" in e), None)
            if entry is None:
                raise ValueError(
                    f"training option old_lr_scale={scale} needs the growth of grow_to, and the checkpoint resumed "
                    f"({checkpoint.path if checkpoint is not None else 'none'}) records none"
                )
            before = entry["before"]
        grown = grown_parameters(self.model, before)
        partly = {id(g.param) for g in grown}
        whole = []
        for name, param in self.model.named_parameters():
            if id(param) in partly or not param.requires_grad:
                continue
            if scale == 0:
                param.requires_grad_(False)
            else:
                whole.append(GrownParameter(name, param, 0, param.shape[0] if param.dim() else 1))
        return grown + whole

    def _sparse_rows(self, checkpoint: Checkpoint | None, task: Task) -> list[ScaledRows]:
        """``continual: sparse``: the update scales that train each Pattention's chosen tokens only
        (``sparse_memory``: each memory table's chosen value rows); every other parameter stops
        requiring gradients (before the optimizer is built). A new run measures usage on ``data``
        and ``reference_data`` (the first ``usage_batches`` training batches of each); a resumed
        one reads what its first session wrote."""
        config = self.config
        memory = config.continual == "sparse_memory"
        usage = slot_usage if memory else token_usage
        path = self.run_dir / USAGE_FILE
        if checkpoint is not None:
            if not path.is_file():
                raise CheckpointError(
                    f"continual: sparse cannot resume {checkpoint.path}: the token usage its first session measured "
                    f"({path}) is missing; allowed: a run directory that holds it, or a new run (resume: null)"
                )
            self.token_usage = load_usage(path)
        else:
            reference = make_task(replace(config, data=config.reference_data), self.tokenizer)[0]
            self.token_usage = tuple(
                usage(
                    self.model,
                    (source.train_batch(step, 0, self.device) for step in range(config.usage_batches)),
                    source.loss,
                )
                for source in (task, reference)
            )
        chosen = chosen_tokens(token_scores(*self.token_usage), config.trainable_tokens)
        if memory:
            freeze_all_but_memory_values(self.model)
            return trainable_slots(self.model, chosen)
        freeze_all_but_tokens(self.model)
        return trainable_rows(self.model, chosen)

    def _place(self, optimizer: torch.optim.Optimizer) -> None:
        # The optimizer of the whole model moves to a new one built after parallelize (FSDP2
        # replaces the parameters); compiled graphs and DDP buckets are rebuilt for new shapes.
        # Activation checkpointing goes on the blocks first, as in torchtitan: grown or stacked
        # blocks get it too.
        if self.config.activation_checkpointing:
            set_activation_checkpointing(self.model)
        placed, self.optimizer = place(
            self.model, optimizer, self.dist, lambda model: make_optimizer(model, self.config)
        )
        self.placed = placed  # data-parallel wrappers only: what evaluation runs
        self.wrapped = self._wrap_model(placed)

    def _unplace(self) -> None:
        # Before parameters change shape: a DDP wrapper's reducer holds each parameter's gradient
        # accumulator, which keeps the old shape; while it lives, backward refuses the new one.
        # The wrappers form reference cycles, so they go only with a collection.
        self.placed = self.wrapped = None
        gc.collect()

    def _restore(self, checkpoint: Checkpoint) -> None:
        if checkpoint.sharded:
            load_sharded_state(checkpoint.path, self.model, self.optimizer)
        self._apply_hyperparameters()  # the config in force wins over the saved one
        saved = checkpoint.trainer_state
        self.state = TrainState(**{k: saved[k] for k in asdict(TrainState()) if k in saved})
        restore_rng(checkpoint.rng)
        self.resumed_from = checkpoint.path

    def _new_ema(self, state: dict[str, torch.Tensor] | None = None, updates: int = 0) -> AveragedModel:
        # A copy of the model; its first update copies the weights unless ``state`` restores an
        # average of ``updates`` updates (a resumed run whose checkpoint kept one).
        if any(isinstance(m, QueryBatchNorm) for m in self.model.modules()):
            # The average copies buffers once: a batch norm's running statistics would stay at their start.
            raise ValueError(
                f"training option ema_decay={self.config.ema_decay} cannot average a model with a batch-normalised "
                "memory query (the average keeps no running statistics); allowed: ema_decay 0, or model "
                "memory_query_norm 'none' or 'layer'"
            )
        ema = AveragedModel(self.model, multi_avg_fn=ema_update(self.config.ema_decay))
        ema.module.eval()
        ema.module.requires_grad_(False)
        if state is not None:
            ema.module.load_state_dict(state)
            ema.n_averaged.fill_(max(1, updates))
        return ema

    def _regrow_ema(self, source_of: Callable[[str], str | None], grown: dict[str, tuple[int, int]]) -> None:
        # After growth the average takes the grown model's shapes: old rows/columns keep their
        # average, new ones (and new blocks, source None) start at the new weights (zero keys or
        # zero residual outputs, so the averaged function is unchanged too); a copied layer starts
        # with its source layer's average.
        if self.ema is None:
            return
        old = dict(self.ema.module.named_parameters())
        ema = self._new_ema()
        with torch.no_grad():
            for name, param in ema.module.named_parameters():
                if source_of(name) is None:
                    continue
                if name in grown:
                    dim, size = grown[name]
                    param = param.narrow(dim, 0, size)
                param.copy_(old[source_of(name)])
        ema.n_averaged.copy_(self.ema.n_averaged)
        self.ema = ema

    @property
    def evaluated_model(self) -> nn.Module:
        """The weights validation and the final test use: the moving average with ``ema_decay``,
        else the model itself."""
        return self.ema.module if self.ema is not None else self.model

    def _apply_hyperparameters(self) -> None:
        config = self.config
        decay = {
            "decay": config.weight_decay,
            "tokens": config.token_weight_decay,
            "memory": config.memory_weight_decay,
        }
        for group in self.optimizer.param_groups:
            group["betas"] = (config.beta1, config.beta2)
            name = group.get("name", "decay" if group["weight_decay"] != 0.0 else "no_decay")  # unnamed: older runs
            if decay.get(name) is not None:
                group["weight_decay"] = decay[name]
            if name == "memory":
                group["lr_scale"] = config.memory_lr_scale

    def _default_wrap(self, model: nn.Module) -> nn.Module:
        return torch.compile(model) if self.config.compile else model

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.config.precision == "bf16-mixed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- training -----------------------------------------------------------------------------

    def fit(self, until_step: int | None = None) -> TrainState:
        """Train up to optimizer step ``until_step`` (default ``config.max_steps``).

        Validates every ``eval_interval`` steps and checkpoints every ``ckpt_interval`` steps,
        and both at ``until_step``. Raises :class:`TrainingDiverged` on a NaN/inf loss. On Ctrl-C
        it finishes the step, saves a checkpoint and raises :class:`TrainingInterrupted` (a
        second Ctrl-C stops at once, unsaved; see :mod:`tokenformer.train.interrupt`).
        """
        config = self.config
        target = config.max_steps if until_step is None else until_step
        if target > config.max_steps:
            raise ValueError(f"until_step={target} is beyond max_steps={config.max_steps}")
        main = self.dist.is_main  # only rank 0 prints and writes logs
        self._claim_run()
        if self._metrics is None and main:
            self._metrics = MetricsLogger(
                self.run_dir,
                start_step=self.state.step,
                loggers=config.loggers,
                config=config.to_dict(),
                wandb_project=config.wandb_project,
                extra=self._extra_loggers,
            )
            for entry in self.state.growth_history:  # the resumed checkpoint's changes at its own step
                if entry["step"] == self.state.step:
                    self._log_event(entry)
            # The resolved options, reusable as `tokenformer train --config <out_dir>/train_config.yaml`.
            io.atomic_write_text(self.run_dir / TRAIN_CONFIG, yaml.safe_dump(config.to_dict(), sort_keys=False))
            if self.token_usage is not None:
                save_usage(self.run_dir / USAGE_FILE, *self.token_usage)
        bar = tqdm(
            total=target,
            initial=self.state.step,
            disable=not (config.progress and main),
            unit="step",
            dynamic_ncols=True,
        )
        window_items, window_start = 0, time.perf_counter()
        try:
            with deferred_interrupt(enabled=not self.dist.active) as stop:
                while self.state.step < target:
                    self._grow_on_schedule()
                    started = time.perf_counter()
                    loss, items = self._train_step()
                    self.state.wall_time += time.perf_counter() - started
                    if self.state.first_loss is None:
                        self.state.first_loss = loss
                    window_items += items
                    step = self.state.step
                    if (step % config.log_interval == 0 or step == target) and main:
                        elapsed = time.perf_counter() - window_start
                        rate = window_items / elapsed if elapsed > 0 else float("nan")
                        lr = self.optimizer.param_groups[0]["lr"]
                        self._metrics.log(step, "train", loss=loss, lr=lr, tokens_per_s=rate, **self._progress())
                        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
                        window_items, window_start = 0, time.perf_counter()
                    bar.update(1)
                    if step % config.eval_interval == 0 or step == target:
                        metrics = self.evaluate()
                        if main:
                            bar.write(
                                f"step {step}: "
                                + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
                            )
                        self._check_divergence(metrics.get("val_loss"), step)
                    if step % config.ckpt_interval == 0 or step == target:
                        self.save_checkpoint()
                    if window_items == 0:  # throughput counts training only, not validation or saving
                        window_start = time.perf_counter()
                    if stop.requested:
                        self._stop_interrupted()
        except KeyboardInterrupt as exc:
            if isinstance(exc, TrainingInterrupted):
                raise
            unsaved = f"interrupted during step {self.state.step + 1}, which is not saved"
            raise TrainingInterrupted(f"{unsaved}; {self._kept()}{self._resume_hint()}") from None
        finally:
            bar.close()
        return self.state

    def _stop_interrupted(self) -> None:
        """After Ctrl-C: save this step's checkpoint (unless it was just saved) and stop."""
        step = self.state.step
        if self.last_checkpoint != self.run_dir / CHECKPOINTS / checkpoint_name(step):
            self.save_checkpoint()
        raise TrainingInterrupted(f"interrupted at step {step}, saved in {self.last_checkpoint}{self._resume_hint()}")

    def _resume_hint(self) -> str:
        if self.last_checkpoint is None:
            return ""
        return f"; resume with: tokenformer train --config {self.run_dir / TRAIN_CONFIG} --resume auto"

    def _train_step(self) -> tuple[float, int]:
        config, step = self.config, self.state.step
        lr = self.lr_schedule(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        total, items = torch.zeros((), device=self.device), 0
        for micro in range(config.grad_accum):
            batch = self.task.train_batch(step, micro, self.device)
            with self._no_sync(micro < config.grad_accum - 1), self.autocast():
                loss = self.task.loss(self.wrapped, batch)
            (loss / config.grad_accum).backward()
            total += loss.detach().float()
            items += self.task.count(batch)
        loss_value = float(mean_over_ranks(total, self.dist)) / config.grad_accum
        self._check_finite("loss", loss_value, step)
        if config.grad_clip > 0:
            norm = float(full_value(torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)))
            self._check_finite("gradient norm", norm, step)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.state.step += 1
        self.state.tokens += items
        self.state.flops += float(items) * self.task.flops_per_item(self.model)
        return loss_value, items

    def _no_sync(self, skip: bool) -> contextlib.AbstractContextManager:
        # Data-parallel wrappers reduce gradients on every backward unless told to wait for the
        # last micro-batch of an accumulation.
        return no_sync(self.wrapped, skip)

    def _kept(self) -> str:
        if self.last_checkpoint:
            return f"the last good checkpoint is {self.last_checkpoint}"
        return "no checkpoint was written yet"

    def _check_finite(self, what: str, value: float, step: int) -> None:
        if math.isfinite(value):
            return
        raise TrainingDiverged(
            f"{what} is {value} at step {step + 1}; training stopped before updating the weights; {self._kept()}"
        )

    def _check_divergence(self, loss: float | None, step: int) -> None:
        """A finite loss far above the best: ``divergence_factor`` times the best earlier validation
        loss (or the first training loss, the untrained model's) warns, or stops the run with
        ``stop_on_divergence`` before this step's checkpoint is written."""
        factor = self.config.divergence_factor
        earlier = [(r["val_loss"], f"at step {r['step']}") for r in self.state.val_history[:-1] if "val_loss" in r]
        if self.state.first_loss is not None:
            earlier.append((self.state.first_loss, "the first training loss"))
        if not factor or loss is None or not earlier:
            return
        best, where = min(earlier, key=lambda pair: pair[0])
        if not loss > factor * best:
            return
        message = (
            f"validation loss {loss:.4g} at step {step} is {loss / best:.1f}x its best so far ({best:.4g}, {where}), "
            f"above divergence_factor={factor:g}: training has diverged (learning rate lr={self.config.lr:g} too high?)"
        )
        if self.config.stop_on_divergence:
            raise TrainingDiverged(f"{message}; training stopped before writing this step's checkpoint; {self._kept()}")
        if self.dist.is_main:
            warnings.warn(f"{message}; set stop_on_divergence to stop such a run", stacklevel=3)

    def evaluate(self) -> dict[str, float]:
        """Validation metrics of the current model; recorded in ``state.val_history`` and the logs.

        Evaluation runs the model without the execution wrapper: compiling it would compile a
        second graph (no autograd, evaluation mode) and again for the shorter last batch of a
        validation split, which costs more than a few eager validation batches save. With
        ``ema_decay`` the metrics are the averaged weights', and the live weights' follow as
        ``<name>_raw``.
        """
        model = self.placed
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.autocast():
                metrics = self.task.evaluate(model, self.device)
                if self.ema is not None:
                    raw = {f"{k}_raw": v for k, v in metrics.items() if not isinstance(v, list)}
                    metrics = {**self.task.evaluate(self.ema.module, self.device), **raw}
        finally:
            model.train(was_training)
        self.state.val_history.append(
            {
                "step": self.state.step,
                "tokens": self.state.tokens,
                "flops": self.state.flops,
                "wall_time": self.state.wall_time,
                **metrics,
            }
        )
        if self._metrics is not None:
            scalars = {k: v for k, v in metrics.items() if not isinstance(v, list)}
            self._metrics.log(self.state.step, "val", **scalars, **self._progress())
        return metrics

    def _progress(self) -> dict[str, float]:
        return {"train_tokens": self.state.tokens, "train_flops": self.state.flops}

    # -- events -------------------------------------------------------------------------------

    def _model_changed(self, event: str, details: dict[str, Any]) -> None:
        # Every change of the model's shape is kept in the state's growth history (saved with
        # checkpoints) and logged as an event record, named by ``event``.
        entry = {
            "step": self.state.step,
            "tokens": self.state.tokens,
            "flops": self.state.flops,
            "event": event,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            **details,
        }
        self.state.growth_history.append(entry)
        self._log_event(entry)

    def _log_event(self, entry: dict[str, Any]) -> None:
        # Before ``fit`` opens the loggers nothing is written; ``fit`` logs the changes made at
        # the step it starts from (growth between runs, a grown checkpoint resumed).
        if self._metrics is None:
            return
        # Entries of checkpoints written before events were named: ``stack`` records layer counts.
        event = entry.get("event") or ("stack" if "n_layers_after" in entry else "grow")
        details = {k: v for k, v in entry.items() if k not in ("step", "tokens", "flops", "event")}
        self._metrics.event(
            entry["step"], event, train_tokens=entry["tokens"], train_flops=entry.get("flops"), **details
        )

    # -- growth -------------------------------------------------------------------------------

    def grow(self, **tokens: Any) -> GrowthRecord:
        """:func:`tokenformer.grow` the model (in width, depth or both), carry AdamW's moments over
        (new blocks join the optimizer with fresh moments), and re-wrap the model.

        A sharded (FSDP) model is gathered whole on every rank first, grown there, and sharded
        again with its optimizer state; a collective call then.
        """
        optimizer = self.optimizer
        self._unplace()
        if self.dist.strategy == "fsdp":
            whole = self._model_class(self.model.config).to(self.device)
            optimizer = gather(self.model, self.optimizer, whole, lambda model: make_optimizer(model, self.config))
            self.model = whole
        record = grow(self.model, **tokens)
        carry_optimizer_state(optimizer, record)
        self._place(optimizer)
        self._regrow_ema(record.source_name, {g.name: (g.dim, g.old_size) for g in record.grown})
        self._model_changed("grow", record.to_dict())
        return record

    def _grow_on_schedule(self) -> None:
        """With ``grow_schedule``: grow to the size of the stage the next step belongs to, unless
        the model has it (a run resumed after the growth), validating right before and after."""
        step = self.state.step
        due = [i for i, stage in enumerate(self.growth_stages) if stage.start <= step]
        if not due:
            return
        changes = growth_to(self.model.config, self.growth_stages[due[-1]].size)
        if not changes:
            return
        if not self.state.val_history or self.state.val_history[-1]["step"] != step:
            self.evaluate()
        generator = growth_generator(self.config.seed, due[-1])
        self.grow(**changes, depth_position=self.config.grow_depth_position, generator=generator)
        self.evaluate()

    def calibration_scores(self, batches: int) -> dict[str, torch.Tensor]:
        """:func:`tokenformer.pruning.calibration_scores` of the model on the first ``batches``
        training batches (of micro-batch 0), in evaluation mode."""
        if not isinstance(batches, int) or isinstance(batches, bool) or batches < 1:
            raise ValueError(f"calibration batches must be a positive integer, got {batches!r}")
        task = self.task
        data = (task.train_batch(step, 0, self.device) for step in range(batches))
        with self.autocast():
            return calibration_scores(self.model, data, task.loss)

    def prune(self, calibration_batches: int = 0, **options: Any) -> PruneRecord:
        """:func:`tokenformer.prune` the model, cut AdamW's moments and the moving average alike,
        and re-wrap the model. With ``calibration_batches`` the importance is measured on that many
        training batches (:meth:`calibration_scores`); with 0 (or ``scores`` given) it is not.

        A sharded (FSDP) model is gathered whole on every rank first, pruned there and sharded
        again with its optimizer state; a collective call then.
        """
        optimizer = self.optimizer
        if self.dist.strategy == "fsdp":
            whole = self._model_class(self.model.config).to(self.device)
            optimizer = gather(self.model, self.optimizer, whole, lambda model: make_optimizer(model, self.config))
            self.model = whole
        if calibration_batches:
            options["scores"] = self.calibration_scores(calibration_batches)
        record = prune(self.model, **options)
        prune_optimizer_state(optimizer, record)
        self._place(optimizer)
        if self.ema is not None:
            prune_like(self.ema.module, record)
        self.state.growth_history.append({"step": self.state.step, "tokens": self.state.tokens, **record.to_dict()})
        return record

    def stack(self, n_layers: int) -> StackRecord:
        """:func:`tokenformer.stack_layers` the model to ``n_layers`` (G_stack depth growth).

        Each copied layer starts with a copy of its source layer's AdamW moments, as its weights
        are a copy; the old layers keep theirs.
        """
        if self.dist.strategy == "fsdp":
            raise ValueError(
                "depth stacking of a sharded (strategy='fsdp') model is not supported; "
                "allowed: strategy 'none' or 'ddp'"
            )
        self._unplace()
        old_state = self.optimizer.state
        sources = dict(self.model.named_parameters())
        record = stack_layers(self.model, n_layers)
        optimizer = make_optimizer(self.model, self.config)
        for name, param in self.model.named_parameters():
            source = sources[stacked_source(name, record.sources)]
            if source in old_state:
                saved = old_state[source]
                optimizer.state[param] = {
                    k: v.clone() if torch.is_tensor(v) and source is not param else v for k, v in saved.items()
                }
        self._place(optimizer)
        self._regrow_ema(lambda name: stacked_source(name, record.sources), {})
        self._model_changed("stack", record.to_dict())
        return record

    # -- checkpoints --------------------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            **asdict(self.state),
            "data_position": {"step": self.state.step, "note": "batch i is a pure function of (seed, i)"},
            "layers": growth_summary(self.model) if families.is_registered(self.model) else None,
            "train_config": self.config.to_dict(),
            "ema_updates": int(self.ema.n_averaged) if self.ema is not None else 0,
            # The size grow_schedule starts from: a resumed run computes the same stages.
            "schedule_start": self.schedule_start,
        }

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Write a checkpoint (default: ``<out_dir>/checkpoints/step-N``, keeping the last ``keep_last``).

        In the run directory a checkpoint of the same step (one of a run rewound to an earlier
        step, or written before growth) is replaced, atomically; a ``path`` given must not exist.
        """
        in_run = path is None
        if in_run:
            self._claim_run()
            path = self.run_dir / CHECKPOINTS / checkpoint_name(self.state.step)
        tokenizer_json = self.tokenizer.json_text if self.tokenizer is not None else None
        sharded = self.dist.strategy == "fsdp"

        def save() -> None:
            ema = self.ema.module.state_dict() if self.ema is not None else None
            state = self.checkpoint_state()
            # Replacing a checkpoint of the same step waits for the run's readers (rank 0 swaps).
            replacing = in_run and self.dist.is_main and Path(path).exists()
            with changing(self.run_dir) if replacing else contextlib.nullcontext():
                save_checkpoint(
                    path, self.model, self.optimizer, state, tokenizer_json, sharded=sharded, ema=ema, replace=in_run
                )

        if sharded:
            save()  # every rank writes its shards
        else:
            self._on_main(save)  # DDP replicas are identical: rank 0 writes
        if in_run:
            self._on_main(lambda: prune_checkpoints(self.run_dir, self.config.keep_last, keep=path))
        barrier(self.dist)
        self.last_checkpoint = Path(path)
        return self.last_checkpoint

    def close(self) -> None:
        """Close the metrics log, draw the loss curve (once: a staged run calls ``fit`` often) and
        release the run directory to other writers."""
        try:
            if self._metrics is not None:
                self._metrics.close()
                self._metrics = None
                plot_loss_curve(self.run_dir, [g["step"] for g in self.state.growth_history])
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None
            self._claimed = False
