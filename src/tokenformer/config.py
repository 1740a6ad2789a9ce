"""Configuration dataclasses: the shared transformer blocks and the language model, with named presets."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .pattention import NORMS, release_tau
from .sparse_pattention import QUERY_NORMS
from .validation import (
    check,
    check_choice,
    check_divides,
    check_positive_ints,
    dataclass_from_dict,
    invalid,
    is_int,
    is_number,
    lookup_preset,
)

if TYPE_CHECKING:
    from typing_extensions import Self

PROJECTIONS = ("pattention", "linear")
TOKEN_KINDS = ("qkv", "proj", "ffn")
VALUE_INITS = ("wang", "fan_in")
MEMORY_POSITIONS = ("beside", "replace")


@dataclass
class BlockConfig:
    """The transformer blocks that the language and the vision model share.

    ``qkv_tokens``, ``proj_tokens`` and ``ffn_tokens`` are the parameter-token counts of the
    query/key/value, output-projection and feed-forward Pattentions. With ``projection="linear"``
    Q/K/V/O are bias-free ``nn.Linear(d_model, d_model)`` and ``ffn_tokens`` is the hidden width of
    a Linear-GELU-Linear MLP. ``layer_tokens`` overrides the counts per layer after a growth that
    touched only some layers (``None``: every layer uses the three fields).

    ``ghost_ranks`` records the ghost factors of a pruned model (:mod:`tokenformer.pruning`): one
    mapping per layer from a Pattention's name in its block (``attention.query``, ``attention.key``,
    ``attention.value``, ``attention.proj``, ``mlp``) to the rows of its ghost (``1..d_model``);
    Pattentions left out have none (``None``: no layer has one). Ghosts need ``norm="l2_norm_gelu"``.

    ``norm_splits`` records the Pattentions grown with separate normalisation
    (:func:`~tokenformer.grow` with ``normalisation="separate"``): one mapping per layer from a
    Pattention's name in its block to the count of its old tokens, which are normalised apart from
    the tokens after them (``None``: no layer has one).

    How a new Pattention of a token kind starts (``kind``: ``qkv``, ``proj``, ``ffn``; the
    vision model adds ``patch`` and ``head``). Each of these fields takes one value for every kind
    or a mapping ``{kind: value}`` (kinds left out keep the default); with
    ``projection="linear"`` they are ignored.

    - ``tau_scale``: the score scale is ``tau = tau_scale * sqrt(n)`` for a layer created with ``n``
      tokens (the release: 1). ``fixed_tau`` sets ``tau`` independently of ``n`` instead. Either
      way ``tau`` is frozen at creation, so growth keeps the function exactly.
    - ``key_std``: std of the initial key tokens (``None``: ``init_std``). Scores are normalised
      per row, so scaling every key alike only changes their effective learning rate.
    - ``value_init`` and ``value_scale``: the initial value tokens are ``N(0, value_scale * s)``
      with ``s = 2 / (n_layers * sqrt(d_model))`` for ``"wang"`` (the release's init of layers
      that write into the residual stream) or ``s = 1 / sqrt(n)`` for ``"fan_in"``. The
      normalised scores are of order 1 whatever the input, so a Pattention's output at
      initialisation grows like ``sqrt(n)`` times the value std: ``"fan_in"`` keeps it at about
      ``value_scale`` for any token count, as a linear layer's output follows its input.
      :class:`TokenformerConfig` defaults to ``value_scale = 1/64`` (the release: 1): a language
      model trained from scratch with the release's value init ends well behind its
      parameter-matched Transformer, and starting the values 64 times smaller closed that gap in a
      study over seeds (``configs/studies/recipe.yaml``, ``docs/growth-and-scaling.md``). The
      vision model keeps the release's 1: there the small values hurt
      (``configs/studies/vision-values.yaml``). ``value_scale`` 0 starts the values at zero (the
      keys then get gradient once the values have moved).

    How the Transformer baseline (``projection="linear"``) starts; Pattention models ignore these:

    - ``linear_std``: std of the linears that read the residual stream (Q, K, V and the MLP's
      first layer); ``None``: ``init_std``.
    - ``out_scale``: the linears that write into the residual stream (attention output and the
      MLP's second layer) start ``N(0, out_scale * s)`` with the wang std ``s`` above, as the
      release starts value tokens; 0 starts them at zero. :class:`TokenformerConfig` defaults to
      ``out_scale = 1/16``: with the release-style 1 the language model's Transformer could not
      take the learning rates at which it trains best, and 1/16 won its recipe search over seeds
      (``configs/studies/transformer-recipe.yaml``; zero was level with it), the same search the
      TokenFormer had. The vision model keeps 1.

    These are the analogues of the Pattention fields above, so that the Transformer gets the
    same recipe search as the TokenFormer.

    A sparse memory (:class:`~tokenformer.sparse_pattention.SparsePattention`, docs/sparse-memory.md)
    in the layers ``memory_layers`` (empty: none, the default):

    - ``memory_sub_keys``: sub-keys per half and head (``sub_keys**2`` parameter tokens per head),
      or a list of them, one per table: :func:`~tokenformer.growth.grow_memory` adds tables whose
      outputs add to the first one's.
    - ``memory_top_k``: parameter tokens each head of a table reads per input token.
    - ``memory_heads``: heads per table.
    - ``memory_position``: ``"beside"`` the FFN (``y = h + FFN(LN(h)) + Memory(LN(h))``) or in
      its place (``"replace"``: ``y = h + Memory(LN(h))``, the layer has no FFN).
    - ``memory_query_norm``: ``none``, ``layer`` or ``batch`` (SparsePattention's ``query_norm``).

    A table starts as an FFN Pattention of ``memory_top_k`` tokens would (``pattention_init("ffn",
    memory_top_k)``: its ``tau``, key and value std).
    """

    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    qkv_tokens: int = 768
    proj_tokens: int = 768
    ffn_tokens: int = 3072
    norm: str = "l2_norm_gelu"
    projection: str = "pattention"
    layernorm_eps: float = 1e-5
    init_std: float = 0.02
    layer_tokens: list[dict[str, int]] | None = field(default=None)
    ghost_ranks: list[dict[str, int]] | None = field(default=None)
    norm_splits: list[dict[str, int]] | None = field(default=None)
    tau_scale: float | dict[str, float] = 1.0
    fixed_tau: float | dict[str, float] | None = None
    key_std: float | dict[str, float] | None = None
    value_init: str | dict[str, str] = "wang"
    value_scale: float | dict[str, float] = 1.0
    linear_std: float | None = None
    out_scale: float = 1.0
    memory_layers: list[int] = field(default_factory=list)
    memory_sub_keys: int | list[int] = 64
    memory_top_k: int = 16
    memory_heads: int = 1
    memory_position: str = "beside"
    memory_query_norm: str = "none"

    # Token kinds whose Pattentions the init fields above can address.
    INIT_KINDS: ClassVar[tuple[str, ...]] = TOKEN_KINDS

    def __post_init__(self) -> None:
        check_positive_ints(self, ("d_model", "n_layers", "n_heads", "qkv_tokens", "proj_tokens", "ffn_tokens"))
        check_divides(self, "n_heads", "d_model")
        check_choice(self, "norm", NORMS)
        check_choice(self, "projection", PROJECTIONS)
        self._check_layer_tokens()
        self._check_ghost_ranks()
        self._check_norm_splits()
        positive = "a finite number > 0"
        check(self, "layernorm_eps", lambda v: is_number(v) and v > 0, positive)
        check(self, "init_std", lambda v: is_number(v) and v >= 0, "a finite number >= 0")
        self._check_per_kind("tau_scale", lambda v: is_number(v) and v > 0, positive)
        self._check_per_kind("fixed_tau", lambda v: v is None or (is_number(v) and v > 0), f"null or {positive}")
        self._check_per_kind("key_std", lambda v: v is None or (is_number(v) and v > 0), f"null or {positive}")
        self._check_per_kind("value_init", lambda v: v in VALUE_INITS, " or ".join(VALUE_INITS))
        self._check_per_kind("value_scale", lambda v: is_number(v) and v >= 0, "a finite number >= 0")
        check(self, "linear_std", lambda v: v is None or (is_number(v) and v > 0), f"null or {positive}")
        check(self, "out_scale", lambda v: is_number(v) and v >= 0, "a finite number >= 0")
        self._check_memory()

    def _check_memory(self) -> None:
        layers = self.memory_layers
        if not (isinstance(layers, list) and all(is_int(i) and 0 <= i < self.n_layers for i in layers)) or len(
            set(layers)
        ) != len(layers):
            raise invalid(
                "config field", "memory_layers", layers, f"a list of distinct layer indices 0..{self.n_layers - 1}"
            )
        tables = self.memory_sub_keys
        if not (is_int(tables) and tables >= 1) and not (
            isinstance(tables, list) and tables and all(is_int(s) and s >= 1 for s in tables)
        ):
            raise invalid("config field", "memory_sub_keys", tables, "a positive integer or a non-empty list of them")
        check_positive_ints(self, ("memory_top_k", "memory_heads"))
        smallest = min(self.memory_tables)
        check(self, "memory_top_k", lambda v: v <= smallest**2, f"at most memory_sub_keys**2 = {smallest**2}")
        check_choice(self, "memory_position", MEMORY_POSITIONS)
        check_choice(self, "memory_query_norm", QUERY_NORMS)
        if layers and self.d_model % 2:
            raise invalid(
                "config field", "memory_layers", layers, f"[] with an odd d_model={self.d_model} (a memory splits it)"
            )

    @property
    def memory_tables(self) -> list[int]:
        """Sub-keys of each table of a memory layer (``memory_sub_keys`` as a list)."""
        tables = self.memory_sub_keys
        return list(tables) if isinstance(tables, list) else [tables]

    def has_memory(self, layer: int) -> bool:
        return layer in self.memory_layers

    def _check_layer_tokens(self) -> None:
        tokens = self.layer_tokens
        if tokens is None:
            return
        if not isinstance(tokens, list) or len(tokens) != self.n_layers:
            raise invalid(
                "config field",
                "layer_tokens",
                tokens,
                f"a list of one mapping per layer (n_layers={self.n_layers}) or null",
            )
        for i, counts in enumerate(tokens):
            if not isinstance(counts, dict) or sorted(counts, key=str) != sorted(TOKEN_KINDS):
                raise invalid("config field", f"layer_tokens[{i}]", counts, f"a mapping of {', '.join(TOKEN_KINDS)}")
            for kind, count in counts.items():
                if not (is_int(count) and count >= 1):
                    raise invalid("config field", f"layer_tokens[{i}][{kind!r}]", count, "a positive integer")

    def _check_ghost_ranks(self) -> None:
        ranks = self.ghost_ranks
        if ranks is None:
            return
        if not isinstance(ranks, list) or len(ranks) != self.n_layers:
            raise invalid(
                "config field",
                "ghost_ranks",
                ranks,
                f"a list of one mapping per layer (n_layers={self.n_layers}) or null",
            )
        for i, entry in enumerate(ranks):
            if not isinstance(entry, dict) or any(
                not isinstance(name, str) or not is_int(rank) or not 1 <= rank <= self.d_model
                for name, rank in entry.items()
            ):
                raise invalid(
                    "config field",
                    f"ghost_ranks[{i}]",
                    entry,
                    f"a mapping from Pattention name (e.g. 'mlp') to a rank from 1 to d_model={self.d_model}",
                )
        if any(ranks) and (self.projection != "pattention" or self.norm != "l2_norm_gelu"):
            raise invalid(
                "config field",
                "ghost_ranks",
                ranks,
                f"null with projection={self.projection!r}, norm={self.norm!r} "
                "(a ghost norm needs projection='pattention' and norm='l2_norm_gelu')",
            )

    def _check_norm_splits(self) -> None:
        splits = self.norm_splits
        if splits is None:
            return
        if not isinstance(splits, list) or len(splits) != self.n_layers:
            raise invalid(
                "config field",
                "norm_splits",
                splits,
                f"a list of one mapping per layer (n_layers={self.n_layers}) or null",
            )
        for i, entry in enumerate(splits):
            if not isinstance(entry, dict) or any(
                not isinstance(name, str) or not is_int(split) or split < 1 for name, split in entry.items()
            ):
                raise invalid(
                    "config field",
                    f"norm_splits[{i}]",
                    entry,
                    "a mapping from Pattention name (e.g. 'mlp') to its count of old tokens (a positive integer)",
                )
        if any(splits) and self.projection != "pattention":
            raise invalid("config field", "norm_splits", splits, "null with projection='linear' (no Pattentions)")

    def splits(self, layer: int) -> dict[str, int]:
        """Old-token counts of one layer's Pattentions grown with separate normalisation (empty: none)."""
        return {} if self.norm_splits is None else dict(self.norm_splits[layer])

    def ghosts(self, layer: int) -> dict[str, int]:
        """Ghost ranks of one layer's pruned Pattentions, by name in the block (empty: none)."""
        return {} if self.ghost_ranks is None else dict(self.ghost_ranks[layer])

    def _check_per_kind(self, name: str, ok: Callable[[Any], bool], allowed: str) -> None:
        value = getattr(self, name)
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(self.INIT_KINDS), key=str)
            if unknown:
                raise ValueError(
                    f"config field {name} has unknown token kind(s) {unknown}; allowed: {', '.join(self.INIT_KINDS)}"
                )
            for kind, item in value.items():
                if not ok(item):
                    raise invalid("config field", f"{name}[{kind!r}]", item, allowed)
        elif not ok(value):
            raise invalid("config field", name, value, f"{allowed}, or a mapping from token kind to one")

    def _for_kind(self, name: str, kind: str) -> Any:
        if kind not in self.INIT_KINDS:
            raise ValueError(f"unknown token kind {kind!r}; allowed: {', '.join(self.INIT_KINDS)}")
        value = getattr(self, name)
        if isinstance(value, dict):
            return value.get(kind, getattr(type(self), name))
        return value

    def pattention_init(self, kind: str, num_tokens: int) -> dict[str, float]:
        """``tau``, ``key_std`` and ``value_std`` of a new Pattention of ``kind`` with ``num_tokens``
        tokens (the keyword arguments of :class:`~tokenformer.pattention.Pattention`)."""
        fixed = self._for_kind("fixed_tau", kind)
        tau = fixed if fixed is not None else self._for_kind("tau_scale", kind) * release_tau(num_tokens)
        key_std = self._for_kind("key_std", kind)
        base = self.value_init_std if self._for_kind("value_init", kind) == "wang" else 1.0 / math.sqrt(num_tokens)
        return {
            "tau": float(tau),
            "key_std": self.init_std if key_std is None else float(key_std),
            "value_std": self._for_kind("value_scale", kind) * base,
        }

    def linear_init_std(self, writes_residual: bool) -> float:
        """Initial std of a Transformer baseline linear: ``out_scale`` times the wang std for one
        that writes into the residual stream, ``linear_std`` (or ``init_std``) for the others."""
        if writes_residual:
            return self.out_scale * self.value_init_std
        return self.init_std if self.linear_std is None else self.linear_std

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def value_init_std(self) -> float:
        """GPT-NeoX's "wang init" std for layers that write into the residual stream."""
        return 2.0 / (self.n_layers * math.sqrt(self.d_model))

    def tokens(self, layer: int) -> dict[str, int]:
        """Parameter-token counts of one layer: ``{"qkv": .., "proj": .., "ffn": ..}``."""
        if self.layer_tokens is not None:
            return dict(self.layer_tokens[layer])
        return {"qkv": self.qkv_tokens, "proj": self.proj_tokens, "ffn": self.ffn_tokens}

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)

    def parameter_matched_linear(self) -> Self:
        """The ``projection="linear"`` Transformer with (almost) the same non-embedding parameters.

        A Pattention block holds ``2d(3q + p + f)`` weights, a linear block ``4d^2 + 2dh``;
        the MLP hidden width ``h`` absorbs the difference (``6d`` for the released shapes).
        """
        if self.layer_tokens is not None:
            raise ValueError("parameter_matched_linear needs uniform token counts (layer_tokens=None)")
        hidden = 3 * self.qkv_tokens + self.proj_tokens + self.ffn_tokens - 2 * self.d_model
        if hidden < 1:
            raise ValueError(f"token counts too small to match with a linear block of d_model={self.d_model}")
        return self.replace(projection="linear", ffn_tokens=hidden)

    def standard_linear(self, tolerance: float = 0.05) -> Self:
        """The ``projection="linear"`` Transformer of the usual shape with (almost) the same
        non-embedding parameters: MLP hidden width ``4 d'``, so ``12 d'^2`` weights a block against
        the Pattention block's ``2d(3q + p + f)``.

        ``d'`` is the multiple of 8 nearest the exact match (any integer where no multiple of 8
        lies within ``tolerance``); the heads are the valid count nearest this config's (by ratio,
        the larger count on a tie): head widths whose rotary dims come out odd are not valid.
        """
        if self.layer_tokens is not None:
            raise ValueError("standard_linear needs uniform token counts (layer_tokens=None)")
        target = 2 * self.d_model * (3 * self.qkv_tokens + self.proj_tokens + self.ffn_tokens)
        ideal = math.sqrt(target / 12)
        widths = range(max(1, math.floor(ideal * (1 - tolerance))), math.ceil(ideal * (1 + tolerance)) + 1)
        widths = [d for d in widths if abs(12 * d * d - target) <= tolerance * target]
        for d in sorted(widths, key=lambda d: (d % 8 != 0, abs(d - ideal))):
            counts = sorted(
                (h for h in range(1, d + 1) if d % h == 0), key=lambda h: (abs(math.log(h / self.n_heads)), -h)
            )
            for heads in counts:
                try:
                    return self.replace(
                        projection="linear", d_model=d, n_heads=heads, qkv_tokens=d, proj_tokens=d, ffn_tokens=4 * d
                    )
                except ValueError:  # rotary dims that come out odd for this head width
                    continue
        raise ValueError(
            f"no standard-shape Transformer within {tolerance:.0%} of the parameters of d_model={self.d_model} "
            f"with tokens {self.qkv_tokens}/{self.proj_tokens}/{self.ffn_tokens}"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return dataclass_from_dict(cls, data, "config field")

    def save(self, path: str | Path) -> None:
        from .io import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Self:
        return cls.from_dict(json.loads(Path(path).read_text()))


# The fields that set a block's shape (what a parameter-matched Transformer changes).
SHAPE_FIELDS = ("projection", "d_model", "n_heads", "qkv_tokens", "proj_tokens", "ffn_tokens")


def shape_changes(config: BlockConfig, reference: BlockConfig) -> dict[str, Any]:
    """The shape fields of ``config`` that differ from ``reference``'s (model overrides that turn
    ``reference`` into ``config``'s shape)."""
    return {k: getattr(config, k) for k in SHAPE_FIELDS if getattr(config, k) != getattr(reference, k)}


# The language model's default value_scale and, for its Transformer twin, out_scale
# (BlockConfig's docstring says why).
VALUE_SCALE = 1 / 64
OUT_SCALE = 1 / 16


@dataclass
class TokenformerConfig(BlockConfig):
    """Architecture of a TokenFormer LM (or, with ``projection="linear"``, its Transformer twin)."""

    vocab_size: int = 50304
    max_seq_len: int = 2048
    rotary_pct: float = 0.25
    rope_base: float = 10000.0
    # Value tokens start small (see BlockConfig); the released models were trained from 1.0.
    value_scale: float | dict[str, float] = VALUE_SCALE
    # So do the Transformer's residual-output layers (see BlockConfig).
    out_scale: float = OUT_SCALE

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, ("vocab_size", "max_seq_len"))
        check(self, "rotary_pct", lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]")
        check(self, "rope_base", lambda v: is_number(v) and v > 0, "a finite number > 0")
        if self.rotary_dims % 2:
            raise ValueError(
                f"rotary dims must be even: rotary_pct={self.rotary_pct} of head_dim={self.head_dim} "
                f"gives {self.rotary_dims}; choose rotary_pct so that head_dim * rotary_pct is even"
            )

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> TokenformerConfig:
        return cls(**{**lookup_preset(PRESETS, name), **overrides})


def _released(n_layers: int, d: int, n_heads: int) -> dict[str, Any]:
    return dict(n_layers=n_layers, d_model=d, n_heads=n_heads, qkv_tokens=d, proj_tokens=d, ffn_tokens=4 * d)


def _paper_path(qkv: int) -> dict[str, Any]:
    # The paper's OpenWebText scaling path: 12 layers, d 768, seq 1024, ffn tokens = 4 x qkv tokens.
    return dict(
        n_layers=12, d_model=768, n_heads=12, qkv_tokens=qkv, proj_tokens=qkv, ffn_tokens=4 * qkv, max_seq_len=1024
    )


def _cpu(n_layers: int, d: int, n_heads: int) -> dict[str, Any]:
    return dict(_released(n_layers, d, n_heads), vocab_size=8192, max_seq_len=256)


PRESETS: dict[str, dict[str, Any]] = {
    # Released Pile models (GPT-NeoX-20B tokenizer, embedding padded to 50304, seq 2048).
    "150M": _released(12, 768, 12),
    "450M": _released(24, 1024, 16),
    "900M": _released(32, 1280, 16),
    "1.5B": _released(40, 1536, 16),
    # The paper's incremental-scaling path 124M -> 354M -> 757M -> 1.4B.
    "paper-124M": _paper_path(576),
    "paper-354M": _paper_path(2140),
    "paper-757M": _paper_path(4872),
    "paper-1.4B": _paper_path(9232),
    # Small sizes that train on a laptop CPU (~0.3M, ~1M, ~5M non-embedding parameters).
    "cpu-0.3M": _cpu(5, 64, 4),
    "cpu-1M": _cpu(4, 128, 4),
    "cpu-5M": _cpu(5, 256, 8),
    # The small sizes with a sparse memory beside the FFN of one middle layer (docs/sparse-memory.md):
    # many more parameters, few more read per token.
    "cpu-1M-memory": dict(_cpu(4, 128, 4), memory_layers=[2], memory_sub_keys=32, memory_top_k=16, memory_heads=2),
    "cpu-5M-memory": dict(_cpu(5, 256, 8), memory_layers=[2], memory_sub_keys=64, memory_top_k=16, memory_heads=4),
}
