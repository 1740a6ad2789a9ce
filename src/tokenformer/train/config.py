"""The training configuration: one flat dataclass, the same for the Python API, YAML files and flags."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..families import family
from ..schedule import SIZE_KEYS, parse_rule
from ..validation import check, dataclass_from_dict, invalid, is_int, is_number

Precision = Literal["fp32", "bf16-mixed"]
Strategy = Literal["single", "ddp", "fsdp"]
TaskName = Literal["lm", "vision"]
VisionDataset = Literal["fashion-mnist", "cifar10"]
LoggerName = Literal["tensorboard", "wandb"]
Continual = Literal["finetune", "grow", "grow_separate", "sparse", "sparse_memory"]
# The continual modes that train a few chosen rows (trainable_tokens, reference_data, usage_batches).
SPARSE_CONTINUAL = ("sparse", "sparse_memory")


@dataclass
class VisionOptions:
    """Options of ``task: vision`` only (the ``vision:`` group of a training config).

    Args:
        dataset: Image dataset: ``fashion-mnist`` or ``cifar10``.
        data_path: Where the image dataset is (default for Fashion-MNIST:
            /usr/share/datasets/fashion-mnist; CIFAR-10 needs its python archive or folder).
        crop_padding: Augmentation: pad by this many pixels and crop randomly (0: off).
        hflip: Augmentation: mirror half the training images.
        erase_prob: Augmentation: random erasing, the probability that a training image gets a
            rectangle of random pixels (2-40% of its area; 0: off).
        label_smoothing: Train against the one-hot targets mixed with this share of the uniform
            distribution over the classes (0: plain cross-entropy); validation and test losses
            stay the plain cross-entropy.
    """

    dataset: VisionDataset = "fashion-mnist"
    data_path: str | None = None
    crop_padding: int = 0
    hflip: bool = False
    erase_prob: float = 0.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        def check_vision(name: str, ok: Callable[[Any], bool], allowed: str) -> None:
            if not ok(getattr(self, name)):
                raise invalid("training option", f"vision.{name}", getattr(self, name), allowed)

        datasets = typing.get_args(VisionDataset)
        check_vision("dataset", lambda v: v in datasets, " or ".join(datasets))
        check_vision("data_path", lambda v: v is None or isinstance(v, str), "a directory or null")
        check_vision("crop_padding", lambda v: is_int(v) and v >= 0, "an integer >= 0")
        check_vision("hflip", lambda v: isinstance(v, bool), "true or false")
        check_vision("erase_prob", lambda v: is_number(v) and 0 <= v <= 1, "a probability in [0, 1]")
        check_vision("label_smoothing", lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)")

    @property
    def is_default(self) -> bool:
        return self == VisionOptions(dataset=self.dataset, data_path=self.data_path)


DepthPosition = Literal["top", "bottom", "interleave"]
VISION_FIELDS = tuple(f.name for f in dataclasses.fields(VisionOptions))


@dataclass
class TrainConfig:
    """Options of a training run.

    Args:
        task: ``lm`` (causal language modelling on ``data``) or ``vision`` (image classification
            on ``vision.dataset``; ``model`` is then a vision preset).
        model: Preset name of the model to train from scratch (``tokenformer presets`` lists
            them). Ignored when resuming: the checkpoint's own (possibly grown) model is used.
        model_overrides: Fields of TokenformerConfig (VisionConfig with ``task: vision``) to change
            on the preset, e.g. ``{n_layers: 2, d_model: 64}``; ``{projection: linear}`` gives the
            ViT baseline. ``vocab_size`` defaults to the tokenizer's, rounded up to 128.
        vision: The options of ``task: vision`` (dataset, augmentation, label smoothing): see
            :class:`VisionOptions`; on the command line ``--vision.dataset cifar10`` and so on.
        data: Corpus: ``kjv`` (the embedded King James Bible), ``news`` (300 news articles that
            the ``[continual]`` extra ships), text files, directories, globs,
            or ``hf:NAME[:CONFIG[:SPLIT]]`` (needs the ``[datasets]`` extra and network access).
        tokenizer: ``bpe`` trains a byte-level BPE on the corpus (cached); otherwise a path to a tokenizer.json.
        vocab_size: Vocabulary size of the trained BPE.
        val_fraction: Share of the corpus (of the training images with ``task: vision``) held out
            for validation (deterministic, spread evenly).
        cache_dir: Where tokenizers and token shards are cached (default ``$TOKENFORMER_CACHE`` or
            ``~/.cache/tokenformer``).
        seq_len: Tokens per training sequence.
        batch_size: Sequences per micro-batch.
        grad_accum: Micro-batches per optimizer step.
        max_steps: Optimizer steps of the whole run; resuming continues up to this step.
        lr: Peak learning rate (reached after warmup).
        min_lr: Learning rate at the end of the cosine decay.
        warmup_steps: Steps of linear warmup from 0 to lr.
        weight_decay: AdamW decoupled weight decay (matrices only; norms and biases get none).
        token_weight_decay: Weight decay of the projection weights instead of ``weight_decay``
            (null: ``weight_decay``): the Pattention parameter tokens (keys and values), or the
            Transformer baseline's Linear weights (their analogue); the embedding keeps
            ``weight_decay``. Scores are normalised per row, so decay on the keys only changes
            their effective learning rate; on the values it regularises.
        memory_lr_scale: The learning rate of the value tokens of sparse memories (model field
            ``memory_layers``) as a multiple of the schedule's: each value token is read by few
            inputs, so it gets few updates at the shared rate (product-key memories train their
            values at a higher rate). Ignored by a model without a memory.
        memory_weight_decay: Weight decay of those value tokens (default none: a token that a
            step does not read would still be decayed at every step).
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        grad_clip: Clip the global gradient norm to this value (0 disables clipping).
        ema_decay: Keep an exponential moving average of the weights, updated after every
            optimizer step with this decay (e.g. 0.999; 0 is off), warmed up: update ``k`` uses
            ``min(ema_decay, (1 + k) / (10 + k))`` (for 0.999 the warmup rules the first 8,991
            updates). Validation and the final test then use the averaged weights (the
            validation log adds the live weights' metrics as ``*_raw``, e.g. ``val_loss_raw``);
            checkpoints save them as ``ema.safetensors``; growth grows them too. Not with
            ``strategy: fsdp``.
        precision: ``fp32``, or ``bf16-mixed`` (bf16 autocast, fp32 weights and optimizer state).
        compile: Run the model through ``torch.compile``.
        activation_checkpointing: Keep only each transformer block's input for backward and
            recompute the rest there (``torch.utils.checkpoint``): much less activation memory for
            one more forward pass of the blocks; the gradients are the same
            (benchmarks/results/activation_checkpointing-cpu.md).
        device: ``auto`` (cuda when available, else cpu), ``cpu``, ``cuda``, ``cuda:1``, ...
        threads: CPU threads for PyTorch's intra-op parallelism (null: PyTorch's default). On a
            busy machine, fewer threads than cores can be much faster for small models.
        strategy: ``single`` (one process), or under ``torchrun``: ``ddp`` (DistributedDataParallel,
            a replica per rank) or ``fsdp`` (FSDP2 ``fully_shard``: parameters, gradients and
            optimizer state sharded over the ranks; sharded checkpoints). ``batch_size`` stays the
            global micro-batch: each rank takes ``batch_size / ranks`` of its rows.
        dist_timeout: Seconds a rank waits for the others in a collective before the job fails.
        seed: Seeds the model init and every batch (batch i depends only on seed and i).
        out_dir: Run directory: checkpoints/, metrics.jsonl, loss_curve.png, TensorBoard events.
        resume: ``auto`` (newest complete checkpoint in out_dir, if any), a checkpoint or run
            directory, or null to start from scratch.
        init_from: A checkpoint or run directory (its newest checkpoint) whose model and
            tokenizer this run starts from, as a new run: step 0, a fresh optimizer and schedule
            (fine-tuning, or learning new ``data``); ``model`` is then ignored. With ``resume:
            auto`` an interrupted run continues from its own checkpoints instead.
        grow_to: The size to grow to, e.g. ``{ffn_tokens: 768, n_layers: 6}`` (keys
            ``qkv_tokens``, ``proj_tokens``, ``ffn_tokens``, ``n_layers``; zero new keys and new
            blocks with zero residual outputs, so the function is kept): with ``init_from`` the
            loaded model grows to it before its first step; with ``grow_schedule`` the model
            grows to it in stages during the run.
        grow_schedule: Grow the model during training from ``model`` (with ``model_overrides``) to
            ``grow_to`` in stages (:func:`tokenformer.schedule.growth_schedule`):
            ``shares:S1,S2,...`` (each stage's share of ``max_steps``, summing to 1) or
            ``equal:K``; token counts grow geometrically from stage to stage, depth linearly. Each
            growth is logged as a ``grow`` event with the validation loss right before and right
            after it; AdamW's state is carried and the learning-rate schedule continues.
        grow_depth_position: Where ``grow_schedule`` and ``grow_to`` put new blocks: ``top``,
            ``bottom`` or ``interleave`` (see :func:`tokenformer.grow`).
        old_lr_scale: With ``grow_to``: the learning rate of everything that existed before the
            growth (the old tokens and every other parameter, the embedding too) as a multiple of
            ``lr``; 0 freezes it bit for bit and trains the new tokens only (null: 0 with
            ``continual: grow`` or ``grow_separate``, else 1).
        continual: How a run started with ``init_from`` learns its new ``data`` (null: as
            ``finetune``): ``finetune`` trains every parameter; ``grow`` grows the model to
            ``grow_to`` with zero new keys (one normalisation over old and new tokens);
            ``grow_separate`` grows it with the new tokens normalised apart from the old ones, so
            that frozen old tokens keep their share of every output exactly
            (:func:`tokenformer.grow` with ``normalisation="separate"``); both train the new tokens
            with everything old at ``old_lr_scale`` (default 0: frozen). ``sparse`` trains only
            the ``trainable_tokens`` parameter tokens of each Pattention that the new data uses
            most and ``reference_data`` (the old corpus) least, everything else frozen
            (:mod:`tokenformer.sparse_finetuning`); ``sparse_memory`` does the same with the slots
            of a model's sparse memory (``memory_layers``): only the value rows of the
            ``trainable_tokens`` slots of each memory table train (sparse memory fine-tuning).
            The usage statistics are written to ``out_dir/token_usage.safetensors`` and read back
            when the run resumes.
        trainable_tokens: With ``continual: sparse``: how many parameter tokens (key and value
            rows) of each Pattention train; with ``sparse_memory``: how many slots (value rows)
            of each memory table.
        reference_data: With ``continual: sparse`` or ``sparse_memory``: the corpus the model
            learned before (as ``data``), on which the usage of the old data is measured.
        usage_batches: With ``continual: sparse`` or ``sparse_memory``: batches of each corpus
            over which usage is measured (the first training batches of ``data`` and of
            ``reference_data``).
        eval_interval: Validate every this many steps (and at the end).
        eval_batches: Validation batches of batch_size windows, the same windows every time
            (language models; a classifier validates on all of its held-out images).
        log_interval: Log the training loss every this many steps.
        loggers: Where records go besides ``out_dir/metrics.jsonl`` (always written):
            ``tensorboard`` (``out_dir/tensorboard``; skipped with a warning when TensorBoard is
            not installed) and ``wandb`` (Weights & Biases, in ``out_dir/wandb``; needs the
            ``[wandb]`` extra; ``WANDB_MODE=offline`` keeps the run on disk). ``[]``: none.
        wandb_project: The W&B project of ``loggers: [wandb]`` runs (the run is named after
            ``out_dir``).
        ckpt_interval: Write a checkpoint every this many steps (and at the end).
        keep_last: Checkpoints to keep in out_dir/checkpoints (older ones are deleted).
        divergence_factor: Warn when a validation loss exceeds this multiple of the best one so far
            (the first training loss, the untrained model's, counts too): a loss that explodes
            without becoming NaN. 0 is off.
        stop_on_divergence: Stop the run instead of warning (before that step's checkpoint).
        progress: Show a progress bar.
    """

    task: TaskName = "lm"
    model: str = "cpu-1M"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: str | list[str] = "kjv"
    vision: VisionOptions = field(default_factory=VisionOptions)
    tokenizer: str = "bpe"
    vocab_size: int = 8192
    val_fraction: float = 0.05
    cache_dir: str | None = None
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    token_weight_decay: float | None = None
    memory_lr_scale: float = 1.0
    memory_weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    ema_decay: float = 0.0
    precision: Precision = "fp32"
    compile: bool = False
    activation_checkpointing: bool = False
    device: str = "auto"
    threads: int | None = None
    strategy: Strategy = "single"
    dist_timeout: float = 600.0
    seed: int = 1337
    out_dir: str = "runs/tokenformer"
    resume: str | None = None
    init_from: str | None = None
    grow_to: dict[str, int] | None = None
    grow_schedule: str | None = None
    grow_depth_position: DepthPosition = "top"
    old_lr_scale: float | None = None
    continual: Continual | None = None
    trainable_tokens: int | None = None
    reference_data: str | list[str] | None = None
    usage_batches: int = 8
    eval_interval: int = 100
    eval_batches: int = 8
    log_interval: int = 10
    loggers: list[LoggerName] = field(default_factory=lambda: ["tensorboard"])
    wandb_project: str = "tokenformer"
    ckpt_interval: int = 100
    keep_last: int = 3
    divergence_factor: float = 3.0
    stop_on_divergence: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "seq_len",
            "batch_size",
            "grad_accum",
            "max_steps",
            "eval_interval",
            "eval_batches",
            "log_interval",
            "ckpt_interval",
            "keep_last",
            "usage_batches",
        )
        for name in positive:
            _check(self, name, lambda v: is_int(v) and v >= 1, "a positive integer")
        if isinstance(self.vision, dict):
            self.vision = dataclass_from_dict(VisionOptions, self.vision, "vision option")
        _check(self, "vision", lambda v: isinstance(v, VisionOptions), "a mapping of vision options")
        _check(
            self,
            "vision",
            lambda v: v.is_default or self.task == "vision",
            "the defaults with task: lm (augmentation and label smoothing are options of task: vision)",
        )
        for name in ("warmup_steps", "seed"):
            _check(self, name, lambda v: is_int(v) and v >= 0, "an integer >= 0")
        _check(self, "warmup_steps", lambda v: v <= self.max_steps, f"an integer <= max_steps ({self.max_steps})")
        _check(
            self,
            "divergence_factor",
            lambda v: is_number(v) and (v == 0 or v > 1),
            "a number > 1, or 0 (off)",
        )
        _check(self, "stop_on_divergence", lambda v: isinstance(v, bool), "true or false")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            _check(self, name, lambda v: is_number(v) and v >= 0, "a finite number >= 0")
        _check(self, "lr", lambda v: v > 0, "a number > 0")
        _check(self, "min_lr", lambda v: v <= self.lr, f"a number <= lr ({self.lr})")
        for name in ("beta1", "beta2"):
            _check(self, name, lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)")
        _check(self, "activation_checkpointing", lambda v: isinstance(v, bool), "true or false")
        _check(self, "threads", lambda v: v is None or (is_int(v) and v >= 1), "a positive integer or null")
        _check(
            self, "token_weight_decay", lambda v: v is None or (is_number(v) and v >= 0), "a finite number >= 0 or null"
        )
        _check(self, "memory_lr_scale", lambda v: is_number(v) and v > 0, "a finite number > 0")
        _check(self, "memory_weight_decay", lambda v: is_number(v) and v >= 0, "a finite number >= 0")
        _check(self, "val_fraction", lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)")
        for name, choices in (("precision", Precision), ("task", TaskName)):
            allowed = typing.get_args(choices)
            _check(self, name, lambda v, allowed=allowed: v in allowed, " or ".join(allowed))
        loggers = typing.get_args(LoggerName)
        _check(
            self,
            "loggers",
            lambda v: isinstance(v, list) and all(n in loggers for n in v) and len(set(v)) == len(v),
            f"a list of distinct names from: {', '.join(loggers)}",
        )
        _check(self, "wandb_project", lambda v: isinstance(v, str) and v != "", "a W&B project name")
        strategies = typing.get_args(Strategy)
        _check(self, "strategy", lambda v: v in strategies, ", ".join(strategies))
        _check(self, "ema_decay", lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1) (0 is off)")
        _check(
            self,
            "ema_decay",
            lambda v: v == 0 or self.strategy != "fsdp",
            "0 with strategy: fsdp (the average of sharded weights is not supported)",
        )
        _check(self, "dist_timeout", lambda v: is_number(v) and v > 0, "a number of seconds > 0")
        _check(
            self,
            "device",
            lambda v: isinstance(v, str) and v.split(":")[0] in ("auto", "cpu", "cuda", "mps", "xpu"),
            "auto, cpu, cuda[:N], mps or xpu",
        )
        _check(
            self,
            "data",
            lambda v: bool(v) and (isinstance(v, str) or all(isinstance(s, str) for s in v)),
            "a corpus name, path or glob, or a list of them",
        )
        _check(self, "out_dir", lambda v: isinstance(v, str) and v.strip() != "", "a directory (not empty)")
        _check(
            self,
            "resume",
            lambda v: v is None or (isinstance(v, str) and v != ""),
            "auto, a checkpoint or run directory, or null",
        )
        _check(
            self,
            "init_from",
            lambda v: v is None or (isinstance(v, str) and v != ""),
            "a checkpoint or run directory, or null",
        )
        _check(
            self,
            "grow_to",
            lambda v: (
                v is None
                or (
                    isinstance(v, dict)
                    and bool(v)
                    and set(v) <= set(SIZE_KEYS)
                    and all(is_int(n) and n >= 1 for n in v.values())
                )
            ),
            f"null or a mapping from {', '.join(SIZE_KEYS)} to positive integers",
        )
        _check(
            self,
            "grow_to",
            lambda v: v is None or self.init_from is not None or self.grow_schedule is not None,
            "null without init_from or grow_schedule (it grows the model init_from loads, or the model in stages)",
        )
        _check(
            self,
            "grow_schedule",
            lambda v: v is None or (self.grow_to is not None and self.init_from is None),
            "null without grow_to, and null with init_from (a schedule grows the model the run starts from)",
        )
        if self.grow_schedule is not None:
            parse_rule(self.grow_schedule)
        positions = typing.get_args(DepthPosition)
        _check(self, "grow_depth_position", lambda v: v in positions, ", ".join(positions))
        _check(self, "old_lr_scale", lambda v: v is None or (is_number(v) and v >= 0), "a finite number >= 0 or null")
        _check(
            self,
            "old_lr_scale",
            lambda v: v in (None, 1) or (self.grow_to is not None and self.init_from is not None),
            "1 without grow_to and init_from (it sets the rate of what existed before that growth)",
        )
        _check(
            self,
            "old_lr_scale",
            lambda v: v in (None, 1) or "n_layers" not in (self.grow_to or {}),
            "1 when grow_to sets n_layers (new blocks have no old part)",
        )
        self._check_continual()
        if self.resume in (None, "auto"):
            # An unknown preset or a bad override fails here, before any work. A run resumed from
            # a given checkpoint uses that checkpoint's model instead.
            self.model_config()

    def _check_continual(self) -> None:
        modes = typing.get_args(Continual)
        _check(self, "continual", lambda v: v is None or v in modes, f"{', '.join(modes)} or null")
        _check(
            self,
            "continual",
            lambda v: v is None or self.init_from is not None,
            "null without init_from (it says how the model init_from loads learns the new data)",
        )
        growing = self.continual in ("grow", "grow_separate")
        _check(
            self,
            "continual",
            lambda v: not growing or (self.grow_to is not None and "n_layers" not in self.grow_to),
            "grow or grow_separate with grow_to giving token counts only (qkv_tokens, proj_tokens, ffn_tokens)",
        )
        _check(
            self,
            "continual",
            lambda v: self.grow_to is None or v in (None, "grow", "grow_separate"),
            "grow, grow_separate or null with grow_to (finetune and sparse do not grow the model)",
        )
        sparse = self.continual in SPARSE_CONTINUAL
        _check(
            self,
            "trainable_tokens",
            lambda v: (v is None and not sparse) or (sparse and is_int(v) and v >= 1),
            "a positive integer with continual: sparse or sparse_memory, else null",
        )
        _check(
            self,
            "reference_data",
            lambda v: (
                (v is None and not sparse)
                or (sparse and bool(v) and (isinstance(v, str) or all(isinstance(s, str) for s in v)))
            ),
            "a corpus name, path or glob (or a list) with continual: sparse or sparse_memory, else null",
        )

    @property
    def old_scale(self) -> float:
        """``old_lr_scale`` resolved: 0 by default when ``continual`` grows, else 1."""
        if self.old_lr_scale is not None:
            return float(self.old_lr_scale)
        return 0.0 if self.continual in ("grow", "grow_separate") else 1.0

    @property
    def grow_normalisation(self) -> str:
        """How ``grow_to`` normalises the new tokens (:func:`tokenformer.grow`'s ``normalisation``)."""
        return "separate" if self.continual == "grow_separate" else "joint"

    def model_config(self, vocab_size: int | None = None) -> Any:
        """The ``model`` preset of the task's model family with ``model_overrides``; a model with a
        vocabulary gets ``vocab_size`` (the tokenizer's, padded) unless overridden."""
        config_class = family(self.task).config_class
        fields = {f.name for f in dataclasses.fields(config_class)}
        overrides = dict(self.model_overrides)
        if vocab_size is not None and "vocab_size" in fields and "vocab_size" not in overrides:
            overrides["vocab_size"] = padded_vocab(vocab_size)
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(
                f"model_overrides={self.model_overrides!r}: unknown field(s) {unknown}; "
                f"allowed fields: {', '.join(sorted(fields))}"
            )
        config = config_class.from_preset(self.model, **overrides)
        max_seq_len = getattr(config, "max_seq_len", None)
        if max_seq_len is not None and self.seq_len > max_seq_len:
            raise ValueError(
                f"seq_len={self.seq_len} exceeds the model's max_seq_len={max_seq_len}; "
                f"allowed: seq_len <= max_seq_len (or set model_overrides: {{max_seq_len: {self.seq_len}}})"
            )
        if vocab_size is not None and getattr(config, "vocab_size", vocab_size) < vocab_size:
            raise ValueError(f"model vocab_size={config.vocab_size} is smaller than the tokenizer's {vocab_size}")
        return config

    @property
    def sources(self) -> list[str]:
        return [self.data] if isinstance(self.data, str) else list(self.data)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The config of ``to_dict`` (or a YAML file); the vision options of configs written before
        they formed the ``vision`` group are moved into it."""
        data = dict(data)
        flat = {name: data.pop(name) for name in VISION_FIELDS if name in data}
        if flat:
            data["vision"] = {**flat, **dict(data.get("vision") or {})}
        return dataclass_from_dict(cls, data, "training option")


def padded_vocab(vocab_size: int, multiple: int = 128) -> int:
    """Round the embedding up like GPT-NeoX (50,277 ids -> 50,304 rows) for aligned matmuls."""
    return -(-vocab_size // multiple) * multiple


def _check(config: TrainConfig, name: str, ok, allowed: str) -> None:
    check(config, name, ok, allowed, "training option")
