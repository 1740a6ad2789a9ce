"""Incremental scaling: append parameter tokens to a trained model without changing its function.

Why zero keys preserve the function: a new token's score ``x . k_new`` is 0, ``GeLU(0) = 0``, and
a zero adds nothing to the row norm of the scores, so every old score is normalised exactly as
before -- provided ``tau`` stays at ``sqrt(n_old)``, which is why Pattention freezes it at
creation. New *values* must be non-zero: with zero keys and zero values no gradient reaches
either (a dead saddle).

``softmax`` cannot be grown this way: ``exp(0 - max)`` is never 0, so zero-key tokens take
probability mass from the old ones and every output changes.

Zero keys keep the function at the moment of growth only: once the new keys train, the new
tokens' scores enter every row's norm and shrink every old token's normalised score, on every
input. Growth with **separate normalisation** (``normalisation="separate"``) keeps the old tokens'
normalisation apart instead: the layer normalises the old scores over the old tokens (with the old
``tau``, and a pruned layer's ghost) and the new scores over the new tokens (with their own
``tau = sqrt(n_new)`` scaled as the config's init rule says), and adds the two outputs. The new
tokens get random keys and zero values, so they add exactly 0 at first and their values get
gradient at once; as long as the old tokens stay frozen, the old part of the output is exactly
what the layer computed before growth, on every input. It keeps ``softmax`` exact too.

Depth grows exactly too: a pre-LN block adds its two residual updates to its input, and when the
Pattentions that write into the residual stream (the attention output projection and the FFN)
have zero value tokens both updates are exactly zero, so a new block computes the identity. Its
keys are random, so the zero values receive gradients at once (the scores are not zero).

Growth resizes parameters in place (``param.data`` is replaced), so optimizer param groups,
hooks and references stay valid; ``carry_optimizer_state`` pads the optimizer's moments and adds
new blocks' parameters to its param groups.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .config import TOKEN_KINDS
from .model import MLP, make_memory_table
from .pattention import Pattention
from .validation import is_int

KEY_INITS = ("zeros", "random")
# How new tokens are normalised (see the module docstring): with the old ones, or apart.
NORMALISATIONS = ("joint", "separate")
# Where depth growth inserts new blocks (see grow).
DEPTH_POSITIONS = ("top", "bottom", "interleave")
# The token kinds whose projections write into the residual stream: zero in a new block.
RESIDUAL_KINDS = ("proj", "ffn")


@dataclass
class GrownParameter:
    """One parameter that grew along ``dim`` from ``old_size`` rows/columns."""

    name: str
    param: nn.Parameter
    dim: int
    old_size: int


@dataclass
class AddedParameter:
    """A parameter of a block that depth growth inserted, and ``template``: the parameter of the
    same name in the old block next to it (the optimizer puts it in that one's param group)."""

    name: str
    param: nn.Parameter
    template: nn.Parameter


@dataclass
class GrowthRecord:
    """What one call of :func:`grow` changed.

    ``before`` and ``after`` are the token counts per layer (``after`` of the grown depth);
    ``sources[i]`` is the old index of layer ``i`` of the grown model, ``None`` for a new block.
    ``grown`` lists the widened parameters and every parameter of a new block (old size 0), as
    :class:`TokenUpdateScale` reads them; ``added`` the new blocks' parameters.
    """

    before: list[dict[str, int]]
    after: list[dict[str, int]]
    key_init: str
    function_preserving: bool
    grown: list[GrownParameter] = field(default_factory=list)
    sources: list[int | None] = field(default_factory=list)
    depth_position: str | None = None
    added: list[AddedParameter] = field(default_factory=list)
    normalisation: str = "joint"

    @property
    def new_layers(self) -> list[int]:
        """Indices of the new blocks in the grown model."""
        return [i for i, source in enumerate(self.sources) if source is None]

    def source_name(self, name: str) -> str | None:
        """The old model's name of parameter ``name`` of the grown model (``None``: a new block's)."""
        if not self.new_layers or not name.startswith("layers."):
            return name
        index, rest = name.removeprefix("layers.").split(".", 1)
        source = self.sources[int(index)]
        return None if source is None else f"layers.{source}.{rest}"

    def to_dict(self) -> dict:
        record = {
            "before": self.before,
            "after": self.after,
            "key_init": self.key_init,
            "function_preserving": self.function_preserving,
        }
        if self.normalisation != "joint":
            record["normalisation"] = self.normalisation
        if self.new_layers:
            record.update(
                n_layers_before=len(self.before),
                n_layers_after=len(self.after),
                new_layers=self.new_layers,
                depth_position=self.depth_position,
            )
        return record


def _append_rows(param: nn.Parameter, new: torch.Tensor, dim: int) -> None:
    param.data = torch.cat((param.data, new.to(param.dtype)), dim=dim)
    if param.grad is not None:
        param.grad = None


def _grow_pattention(
    layer: Pattention,
    num_tokens: int,
    key_init: str,
    value_std: float,
    generator: torch.Generator | None,
    name: str,
    split_tau: float | None = None,
) -> list[GrownParameter]:
    """Append tokens to ``layer``; with ``split_tau`` (separate normalisation) the new tokens form
    a group of their own with that score scale: random keys, zero values."""
    old = layer.num_tokens
    extra = num_tokens - old
    keys, values = layer.key_param_tokens, layer.value_param_tokens
    new_keys = keys.new_zeros(extra, layer.in_features)
    if key_init == "random" or split_tau is not None:
        new_keys.normal_(std=layer.key_std, generator=generator)
    new_values = values.new_zeros(extra, layer.out_features)
    if split_tau is None:
        new_values.normal_(std=value_std, generator=generator)
    _append_rows(keys, new_keys, 0)
    _append_rows(values, new_values, 0)
    if split_tau is not None:
        layer.set_split(old, split_tau)
    # tau is deliberately left at sqrt(n_old): see the module docstring.
    return [
        GrownParameter(f"{name}.key_param_tokens", keys, 0, old),
        GrownParameter(f"{name}.value_param_tokens", values, 0, old),
    ]


def _grow_mlp(
    mlp: MLP,
    hidden: int,
    key_init: str,
    in_std: float,
    out_std: float,
    generator: torch.Generator | None,
    name: str,
) -> list[GrownParameter]:
    # Net2Net-style widening: new hidden units get random incoming weights and zero outgoing
    # weights, so the output is unchanged and both receive gradient.
    old = mlp.fc1.out_features
    extra = hidden - old
    w1, w2 = mlp.fc1.weight, mlp.fc2.weight
    _append_rows(w1, w1.new_empty(extra, w1.shape[1]).normal_(std=in_std, generator=generator), 0)
    outgoing = w2.new_zeros(w2.shape[0], extra)
    if key_init == "random":
        outgoing.normal_(std=out_std, generator=generator)
    _append_rows(w2, outgoing, 1)
    mlp.fc1.out_features = mlp.fc2.in_features = hidden
    return [GrownParameter(f"{name}.fc1.weight", w1, 0, old), GrownParameter(f"{name}.fc2.weight", w2, 1, old)]


def grown_parameters(model: nn.Module, before: list[dict[str, int]]) -> list[GrownParameter]:
    """The parameters of ``model`` that hold more tokens than the counts ``before`` (a growth's
    ``GrowthRecord.before``, e.g. read back from a checkpoint), with their old sizes."""
    grown = []
    for i, block in enumerate(model.layers):
        for kind in TOKEN_KINDS:
            for name, module in block.modules_of_kind(kind):
                old, prefix = before[i][kind], f"layers.{i}.{name}"
                if isinstance(module, Pattention) and module.num_tokens > old:
                    grown += [
                        GrownParameter(f"{prefix}.key_param_tokens", module.key_param_tokens, 0, old),
                        GrownParameter(f"{prefix}.value_param_tokens", module.value_param_tokens, 0, old),
                    ]
                elif isinstance(module, MLP) and module.fc1.out_features > old:
                    grown += [
                        GrownParameter(f"{prefix}.fc1.weight", module.fc1.weight, 0, old),
                        GrownParameter(f"{prefix}.fc2.weight", module.fc2.weight, 1, old),
                    ]
    return grown


def layer_tokens(model: nn.Module) -> list[dict[str, int]]:
    """Current token counts (hidden width for a linear MLP) of every layer."""
    config = model.config
    return [config.tokens(i) for i in range(config.n_layers)]


def growth_summary(model: nn.Module) -> list[dict]:
    """Per layer: token counts and tau of every Pattention, the rank of a pruned one's ghost and
    the old count and second tau of one grown with separate normalisation (what a checkpoint
    records)."""
    summary = []
    for i, block in enumerate(model.layers):
        entry: dict = {"layer": i}
        for kind in TOKEN_KINDS:
            for name, module in block.modules_of_kind(kind):
                if isinstance(module, Pattention):
                    entry[name] = {"tokens": module.num_tokens, "tau": float(module.tau)}
                    if module.ghost is not None:
                        entry[name]["ghost_rank"] = module.ghost_rank
                    if module.split:
                        entry[name].update(split=module.split, split_tau=float(module.split_tau))
                elif isinstance(module, MLP):
                    entry[name] = {"hidden": module.fc1.out_features}
        summary.append(entry)
    return summary


def _refuse_depth_with_memory(config, what: str) -> None:
    # A memory layer is named by its index: new blocks would move it, and a copied block would
    # carry a memory its config does not name.
    memory = list(getattr(config, "memory_layers", None) or [])
    if memory:
        raise ValueError(
            f"{what} cannot grow the depth of a model with a sparse memory (memory_layers={memory}); "
            "allowed: width growth (grow without n_layers) and grow_memory"
        )


def grow(
    model: nn.Module,
    qkv_tokens: int | None = None,
    proj_tokens: int | None = None,
    ffn_tokens: int | None = None,
    *,
    n_layers: int | None = None,
    depth_position: Literal["top", "bottom", "interleave"] = "top",
    layers: Iterable[int] | None = None,
    key_init: Literal["zeros", "random"] = "zeros",
    value_std: float | None = None,
    normalisation: Literal["joint", "separate"] = "joint",
    generator: torch.Generator | None = None,
) -> GrowthRecord:
    """Append parameter tokens to every Pattention of a kind, in all layers or in ``layers``, and
    insert new blocks up to ``n_layers``.

    ``model`` is a ``TokenformerLM`` or a ``TokenformerViT``: anything with a ``config``,
    ``layers`` of blocks and ``new_block(layer)``. The vision model's patch projection and
    classifier head keep their size.

    Width: each count is the new total (``None`` leaves that kind alone). New keys are zero
    (function-preserving) or, with ``key_init="random"``, drawn like fresh keys (as the released
    GPU code does; the function changes). New values are ``N(0, value_std)``, by default the
    std the config's init rule (``value_init``, ``value_scale``) gives a new Pattention of that
    kind with the new count. On a ``projection="linear"`` model only ``ffn_tokens`` (the MLP
    hidden width) can grow, Net2Net style: new incoming weights as a new first layer's, outgoing
    weights zero (``N(0, value_std)`` with ``key_init="random"``, by default the config's
    ``out_scale`` rule).

    Depth: ``n_layers`` is the new total of blocks. Each new block is initialised as a fresh block
    of the grown config (``model.new_block``), then the projections that write into the residual
    stream (attention output and FFN Pattentions' value tokens; the Linears for the baseline) are
    zeroed: the block adds exactly nothing, whatever ``key_init``. It takes the token counts of
    the old block below it (the bottom block's for ``depth_position="bottom"``). Where new blocks
    go (``depth_position``): ``"top"`` after the last block, ``"bottom"`` before the first, or
    ``"interleave"``: spread through the stack, new block ``j`` of ``k`` after old block
    ``j * n_old // k`` (doubling the depth puts one after every old block). ``layers`` and the
    indices of ``before`` refer to the old layers; ``layer`` of every block and the KV cache
    follow the new order.

    ``normalisation="separate"`` (Pattention models only; width only): the new tokens of each
    grown Pattention are normalised apart from the old ones (see the module docstring), with random
    keys (drawn like fresh keys), zero values and ``tau`` of a new Pattention of their count; the
    old tokens keep their own normalisation exactly, ``key_init`` and ``value_std`` are not used.
    ``model.config.norm_splits`` records each such layer's old count. A layer grown separately can
    grow again jointly (zero keys join the new group and keep the function) but not separately.

    Width grows first, then depth (new blocks take the grown counts). Updates ``model.config``
    (token counts, ``n_layers``, ``ghost_ranks``). A call that would change nothing (every count
    and the depth already reached) is refused. ``generator`` draws every random new weight, so
    a growth repeated with a generator in the same state is identical.
    """
    _require_bare_model(model, "grow")
    config = model.config
    if key_init not in KEY_INITS:
        raise ValueError(f"unknown key_init {key_init!r}; allowed: {', '.join(KEY_INITS)}")
    if depth_position not in DEPTH_POSITIONS:
        raise ValueError(f"unknown depth_position {depth_position!r}; allowed: {', '.join(DEPTH_POSITIONS)}")
    separate = _check_normalisation(config, normalisation, n_layers, value_std)
    targets = {"qkv": qkv_tokens, "proj": proj_tokens, "ffn": ffn_tokens}
    targets = {kind: n for kind, n in targets.items() if n is not None}
    if not targets and n_layers is None:
        raise ValueError("grow needs at least one of qkv_tokens, proj_tokens, ffn_tokens, n_layers")
    for kind, n in targets.items():
        if not is_int(n):
            raise TypeError(f"{kind}_tokens={n!r} is not an integer; allowed: an integer token count (or None)")
    if n_layers is not None and not (is_int(n_layers) and n_layers >= config.n_layers):
        raise ValueError(
            f"n_layers={n_layers!r} cannot be grown to; allowed: an integer >= the current {config.n_layers} "
            "(grow cannot shrink the depth)"
        )
    if n_layers is not None and n_layers > config.n_layers:
        _refuse_depth_with_memory(config, "grow")
    if config.projection == "linear" and set(targets) - {"ffn"}:
        raise ValueError(
            f"a projection='linear' model has no parameter tokens in its attention; "
            f"got {sorted(set(targets) - {'ffn'})}, allowed: ffn_tokens only (widens the MLP)"
        )
    chosen = _chosen_layers(layers, config.n_layers)
    before = layer_tokens(model)
    for i in chosen:
        for kind, n in targets.items():
            if n < before[i][kind]:
                raise ValueError(
                    f"grow cannot shrink: {kind}_tokens={n!r} is below layer {i}'s current {before[i][kind]}; "
                    f"allowed: an integer >= {before[i][kind]}"
                )
    deeper = n_layers is not None and n_layers > config.n_layers
    if not deeper and all(n == before[i][kind] for i in chosen for kind, n in targets.items()):
        depth = [] if n_layers is None else [f"n_layers={n_layers}"]
        asked = ", ".join([f"{kind}_tokens={n}" for kind, n in targets.items()] + depth)
        raise ValueError(
            f"nothing to grow: {asked} equals the current count of every chosen layer; "
            "allowed: a count above the current one for at least one kind and layer, or a larger n_layers"
        )
    if separate:  # before anything changes
        for i in chosen:
            for kind, n in targets.items():
                split = [name for name, m in model.layers[i].modules_of_kind(kind) if m.split and n > before[i][kind]]
                if split:
                    raise ValueError(
                        f"layer {i}'s {', '.join(split)} already normalise two groups of tokens apart; allowed: "
                        f"normalisation='joint' for {kind}_tokens (zero keys join the new group), or other kinds"
                    )
    if config.projection == "pattention" and not separate:  # before anything changes
        for kind, n in targets.items():
            _check_alive(
                config.pattention_init(kind, n)["value_std"] if value_std is None else value_std, key_init, kind
            )
    grown: list[GrownParameter] = []
    after = [dict(counts) for counts in before]
    with torch.no_grad():
        for i in chosen:
            block = model.layers[i]
            for kind, n in targets.items():
                if n == before[i][kind]:
                    continue
                for name, module in block.modules_of_kind(kind):
                    prefix = f"layers.{i}.{name}"
                    if isinstance(module, Pattention):
                        std = config.pattention_init(kind, n)["value_std"] if value_std is None else value_std
                        split_tau = config.pattention_init(kind, n - before[i][kind])["tau"] if separate else None
                        grown += _grow_pattention(module, n, key_init, std, generator, prefix, split_tau)
                    else:
                        std = config.linear_init_std(writes_residual=True) if value_std is None else value_std
                        in_std = config.linear_init_std(writes_residual=False)
                        grown += _grow_mlp(module, n, key_init, in_std, std, generator, prefix)
                after[i][kind] = n
    set_config_tokens(model, after)
    if separate:
        model.config = model.config.replace(norm_splits=layer_splits(model))
    softmax = config.projection == "pattention" and config.norm == "softmax"
    if softmax and grown and not separate:
        warnings.warn(
            "growing a softmax Pattention changes its outputs: zero keys still take probability mass", stacklevel=2
        )
    preserving = not grown or separate or (key_init == "zeros" and not softmax)
    record = GrowthRecord(before, after, key_init, preserving, grown, list(range(config.n_layers)))
    record.normalisation = normalisation
    if deeper:
        _grow_depth(model, n_layers, depth_position, generator, record)
    return record


def _check_normalisation(config, normalisation: str, n_layers: int | None, value_std: float | None) -> bool:
    """Whether ``normalisation`` asks for separate groups; refuses what that cannot do."""
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {normalisation!r}; allowed: {', '.join(NORMALISATIONS)}")
    if normalisation == "joint":
        return False
    if config.projection != "pattention":
        raise ValueError(
            f"normalisation='separate' needs Pattentions, this model has projection={config.projection!r}; "
            "allowed: normalisation='joint'"
        )
    if n_layers is not None and n_layers != config.n_layers:
        raise ValueError(
            f"normalisation='separate' grows the width only, got n_layers={n_layers!r} (the model has "
            f"{config.n_layers}); allowed: grow the depth in a call of its own"
        )
    if value_std is not None:
        raise ValueError(
            f"normalisation='separate' starts the new values at zero, got value_std={value_std!r}; allowed: None"
        )
    return True


def layer_splits(model: nn.Module) -> list[dict[str, int]] | None:
    """``norm_splits`` of ``model``'s config as its Pattentions are: each split layer's old count."""
    splits = [{name: m.split for name, m in block.pattentions() if m.split} for block in model.layers]
    return splits if any(splits) else None


def depth_order(n_old: int, n_new: int, position: str) -> list[int | None]:
    """The grown stack as old layer indices, ``None`` for each new block (see :func:`grow`)."""
    if position not in DEPTH_POSITIONS:
        raise ValueError(f"unknown depth_position {position!r}; allowed: {', '.join(DEPTH_POSITIONS)}")
    new = n_new - n_old
    if position == "top":
        return [*range(n_old), *[None] * new]
    if position == "bottom":
        return [*[None] * new, *range(n_old)]
    after = [0] * n_old
    for j in range(new):
        after[j * n_old // new] += 1
    return [item for i in range(n_old) for item in (i, *[None] * after[i])]


def _grow_depth(
    model: nn.Module, n_layers: int, position: str, generator: torch.Generator | None, record: GrowthRecord
) -> None:
    config = model.config
    sources = depth_order(config.n_layers, n_layers, position)
    # A new block takes the counts of the old block below it (the bottom one's when there is none).
    neighbour = [next((s for s in reversed(sources[: i + 1]) if s is not None), 0) for i in range(n_layers)]
    counts = [dict(record.after[j]) for j in neighbour]
    ghosts = None if config.ghost_ranks is None else [{} if s is None else config.ghost_ranks[s] for s in sources]
    splits = None if config.norm_splits is None else [{} if s is None else config.norm_splits[s] for s in sources]
    model.config = config.replace(n_layers=n_layers, ghost_ranks=ghosts, norm_splits=splits, layer_tokens=None)
    set_config_tokens(model, counts)
    # Widened parameters of old layers are named by their new indices.
    index = {source: i for i, source in enumerate(sources) if source is not None}
    for g in record.grown:
        old, rest = g.name.removeprefix("layers.").split(".", 1)
        g.name = f"layers.{index[int(old)]}.{rest}"
    old_blocks = list(model.layers)
    blocks = []
    for i, source in enumerate(sources):
        if source is not None:
            block = old_blocks[source]
        else:
            template = dict(old_blocks[neighbour[i]].named_parameters())
            like = next(iter(template.values()))
            block = _new_block(model, i, generator).to(device=like.device, dtype=like.dtype)
            for name, param in block.named_parameters():
                record.added.append(AddedParameter(f"layers.{i}.{name}", param, template[name]))
                record.grown.append(GrownParameter(f"layers.{i}.{name}", param, 0, 0))
        block.layer = i  # the block's index in the KV cache
        blocks.append(block)
    model.layers = nn.ModuleList(blocks)
    record.after, record.sources, record.depth_position = counts, sources, position


def _new_block(model: nn.Module, layer: int, generator: torch.Generator | None) -> nn.Module:
    """A fresh block of ``model``'s config whose residual outputs are zero. Its random weights come
    from ``generator`` (seeding a forked global generator: the block initialises itself)."""
    if generator is None:
        block = model.new_block(layer)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
            block = model.new_block(layer)
    with torch.no_grad():
        for kind in RESIDUAL_KINDS:
            for _, module in block.modules_of_kind(kind):
                for param in _residual_weights(module):
                    param.zero_()
    return block


def _residual_weights(module: nn.Module) -> list[nn.Parameter]:
    """The weights of a projection that writes into the residual stream: a Pattention's values,
    a Linear's weight, an MLP's second layer."""
    if isinstance(module, Pattention):
        return [module.value_param_tokens]
    if isinstance(module, MLP):
        return [module.fc2.weight]
    return [module.weight]


def _check_alive(value_std: float, key_init: str, kind: str) -> None:
    # Zero keys and zero values are a saddle no gradient leaves: neither would ever train.
    if value_std == 0 and key_init == "zeros":
        raise ValueError(
            f"new {kind} tokens would have zero keys and zero values (value std 0, e.g. value_scale 0), and "
            "no gradient reaches either; allowed: value_std > 0, or key_init='random'"
        )


def _require_bare_model(model: nn.Module, what: str) -> None:
    # A data-parallel wrapper hides config and layers; growing the model inside it in place would
    # also leave the wrapper's gradient buckets built for the old shapes.
    if hasattr(model, "config") and hasattr(model, "layers"):
        return
    inner = getattr(model, "module", None)
    hint = (
        f"; pass the model inside it ({type(model).__name__}.module) and wrap the result again"
        if inner is not None and hasattr(inner, "layers")
        else ""
    )
    raise TypeError(
        f"{what} takes a TokenformerLM or TokenformerViT (a model with config and layers), got a "
        f"{type(model).__name__}{hint}"
    )


def _chosen_layers(layers: Iterable[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    layers = list(layers)
    wrong = [i for i in layers if not is_int(i)]
    if wrong:
        raise TypeError(f"layers={layers!r} holds non-integers {wrong!r}; allowed: layer indices 0..{n_layers - 1}")
    if not layers:
        raise ValueError(f"layers=[] selects no layer; allowed: None (every layer) or indices 0..{n_layers - 1}")
    out_of_range = sorted({i for i in layers if not 0 <= i < n_layers})
    if out_of_range:
        raise ValueError(f"layers {out_of_range} out of range; allowed: 0..{n_layers - 1}")
    return sorted(set(layers))


def set_config_tokens(model: nn.Module, counts: list[dict[str, int]]) -> None:
    """Record per-layer token counts in ``model.config`` (the three fields when every layer agrees)."""
    if all(c == counts[0] for c in counts):
        uniform = counts[0]
        model.config = model.config.replace(
            qkv_tokens=uniform["qkv"], proj_tokens=uniform["proj"], ffn_tokens=uniform["ffn"], layer_tokens=None
        )
    else:
        model.config = model.config.replace(layer_tokens=[dict(c) for c in counts])


@dataclass
class StackRecord:
    """What one call of :func:`stack_layers` changed: layer ``i`` of ``sources`` copies old layer ``sources[i]``."""

    before: int
    after: int
    sources: list[int]

    def to_dict(self) -> dict:
        return {"n_layers_before": self.before, "n_layers_after": self.after, "sources": self.sources}


def stack_layers(model: nn.Module, n_layers: int) -> StackRecord:
    """Grow ``model`` in depth to ``n_layers`` by stacking copies of its trained layers (G_stack).

    The layer list becomes ``old[i % n_old]`` for ``i < n_layers``: the old layers stay first and
    copies of the whole stack (from its bottom) go on top, the depth-wise stacking operator of
    Du et al., 2024 ("Stacking Your Transformers"). Unlike :func:`grow` this is *not* function
    preserving: each copy adds its residual update again. Works on any model with ``config`` and
    ``layers`` of blocks whose config tokens are uniform or per layer; updates ``model.config``.
    """
    _require_bare_model(model, "stack_layers")
    config = model.config
    old = config.n_layers
    if not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers <= old:
        raise ValueError(
            f"stack_layers cannot shrink or keep the depth: n_layers={n_layers!r}; allowed: an integer > {old}"
        )
    _refuse_depth_with_memory(config, "stack_layers")
    sources = [i % old for i in range(n_layers)]
    for i in range(old, n_layers):
        block = copy.deepcopy(model.layers[sources[i]])
        block.layer = i  # the block's index in the KV cache
        model.layers.append(block)
    layer_tokens = None if config.layer_tokens is None else [dict(config.layer_tokens[j]) for j in sources]
    ghost_ranks = None if config.ghost_ranks is None else [dict(config.ghost_ranks[j]) for j in sources]
    norm_splits = None if config.norm_splits is None else [dict(config.norm_splits[j]) for j in sources]
    model.config = config.replace(
        n_layers=n_layers, layer_tokens=layer_tokens, ghost_ranks=ghost_ranks, norm_splits=norm_splits
    )
    return StackRecord(old, n_layers, sources)


def carry_optimizer_state(optimizer: torch.optim.Optimizer, record: GrowthRecord | None = None) -> int:
    """Pad every per-parameter state tensor (AdamW moments, ...) to its grown parameter's shape,
    and with ``record`` (of a depth growth) add the new blocks' parameters to the optimizer.

    Old tokens keep their moments; new rows/columns start at zero; scalar state such as the
    step count is kept, so training resumes without a restart. A new block's parameter joins the
    param group of its counterpart in the old block next to it (same weight decay) with the state
    of a parameter never stepped: every state tensor and number zero, the step count included
    (AdamW's bias correction starts afresh for it). Returns how many tensors grew.
    """
    if record is not None:
        for added in record.added:
            group = next((g for g in optimizer.param_groups if any(p is added.template for p in g["params"])), None)
            if group is None:  # a template the optimizer does not train (frozen): neither is its copy
                continue
            group["params"].append(added.param)
            template = optimizer.state.get(added.template)
            if template:  # explicit zeros: state dicts keyed by name need an entry for every parameter
                optimizer.state[added.param] = {
                    key: torch.zeros_like(value) if torch.is_tensor(value) else type(value)(0)
                    for key, value in template.items()
                }
    padded = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state:
                continue
            for key, value in state.items():
                if not torch.is_tensor(value) or value.shape == param.shape or value.dim() != param.dim():
                    continue
                if any(old > new for old, new in zip(value.shape, param.shape, strict=True)):
                    raise ValueError(
                        f"optimizer state {key!r} of shape {tuple(value.shape)} "
                        f"is larger than its parameter {tuple(param.shape)}"
                    )
                grown = value.new_zeros(param.shape)
                grown[tuple(slice(0, s) for s in value.shape)] = value
                state[key] = grown
                padded += 1
    return padded


def _rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    # A scalar parameter (e.g. a learned temperature) as one row, so that it narrows like the others.
    return t.view(1) if t.dim() == 0 and dim == 0 else t


@dataclass
class ScaledRows:
    """The update scale of each row (``dim=0``) or column (``dim=1``) of one parameter:
    ``scale [param.shape[dim]]`` (one entry for a scalar parameter); 0 freezes that row."""

    name: str
    param: nn.Parameter
    dim: int
    scale: torch.Tensor


class RowUpdateScale:
    """Scale the optimizer's update of each row of some parameters by its own factor.

    Rows of one tensor share its param group, so param groups cannot tell them apart: this
    snapshots each listed tensor before ``step()`` and rescales the step's change afterwards. The
    step of AdamW (decoupled weight decay included), Adam and SGD is proportional to the learning
    rate, so this equals a per-row learning rate, and a row of scale 0 stays bit for bit (its
    weight decay and moments move nothing). Rows of scale 0 also get zero gradients, so they do not
    count towards gradient clipping.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, rows: list[ScaledRows]) -> None:
        if any(bool((r.scale < 0).any()) for r in rows):
            raise ValueError("update scales must be >= 0")
        self.rows = list(rows)
        self._before: list[torch.Tensor] = []
        self._handles = [
            optimizer.register_step_pre_hook(self._snapshot),
            optimizer.register_step_post_hook(self._rescale),
        ]
        frozen = [r for r in self.rows if bool((r.scale == 0).any())]
        self._handles += [r.param.register_hook(self._zero_frozen_grad(r)) for r in frozen]

    @staticmethod
    def _shaped(r: ScaledRows, like: torch.Tensor) -> torch.Tensor:
        """``r.scale`` broadcastable against ``like`` (a parameter's shape)."""
        shape = [-1 if d == r.dim else 1 for d in range(max(like.dim(), 1))]
        return r.scale.to(like.device, like.dtype).view(shape)

    @classmethod
    def _zero_frozen_grad(cls, r: ScaledRows):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            rows = _rows(grad, r.dim)
            return torch.where(cls._shaped(r, rows) == 0, 0.0, rows).view_as(grad)

        return hook

    def _snapshot(self, *_) -> None:
        self._before = [r.param.detach().clone() for r in self.rows]

    @torch.no_grad()
    def _rescale(self, *_) -> None:
        for r, before in zip(self.rows, self._before, strict=True):
            delta = _rows(r.param - before, r.dim)
            # A frozen row is written back from the snapshot, not as before + 0 * delta: a delta of
            # inf or NaN must not reach it either.
            scale = self._shaped(r, delta)
            moved = _rows(before, r.dim) + delta * scale
            r.param.copy_(torch.where(scale == 0, _rows(before, r.dim), moved).view_as(r.param))
        self._before = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class TokenUpdateScale(RowUpdateScale):
    """Scale the optimizer's update of old and new parameter tokens separately (a
    :class:`RowUpdateScale` with two scales per grown tensor).

    ``old_scale=0`` freezes the tokens that existed before growth; ``new_scale`` is the new
    tokens' learning rate as a multiple of the group's.

    ``record`` is a :class:`GrowthRecord` or a list of :class:`GrownParameter` (e.g. from
    :func:`grown_parameters`); an entry whose ``old_size`` is its whole length is all old.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        record: GrowthRecord | list[GrownParameter],
        old_scale: float = 1.0,
        new_scale: float = 1.0,
    ) -> None:
        if old_scale < 0 or new_scale < 0:
            raise ValueError(f"update scales must be >= 0, got old_scale={old_scale}, new_scale={new_scale}")
        self.grown = record.grown if isinstance(record, GrowthRecord) else list(record)
        self.old_scale, self.new_scale = old_scale, new_scale
        rows = []
        for g in self.grown:
            size = _rows(g.param.detach(), g.dim).shape[g.dim]
            scale = torch.full((size,), float(new_scale), dtype=torch.float64)
            scale[: g.old_size] = old_scale
            rows.append(ScaledRows(g.name, g.param, g.dim, scale))
        super().__init__(optimizer, rows)


@dataclass
class MemoryGrowthRecord:
    """What one call of :func:`grow_memory` changed: the sub-keys of each memory table before
    and after, and the parameters of the new tables (by name in the model)."""

    before: list[int]
    after: list[int]
    new_parameters: list[tuple[str, nn.Parameter]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"memory_sub_keys_before": self.before, "memory_sub_keys_after": self.after}


def grow_memory(model: nn.Module, sub_keys: int, *, generator: torch.Generator | None = None) -> MemoryGrowthRecord:
    """Append a table of ``sub_keys**2`` parameter tokens per head to every sparse memory, keeping
    the function exactly.

    Zero keys cannot do this for a memory: a new token that enters a row's top-k takes the place
    of an old one and joins the normalisation, so the output changes even with a zero value. The
    new tokens form a table of their own instead (:class:`~tokenformer.sparse_pattention.SparseMemory`),
    with its own top-k and normalisation, whose output is added to the old tables': its values
    start at zero, so it adds exactly 0, and its keys are random (as a new table's, from the
    config), so that its values get gradient from the first step. ``memory_top_k`` applies to the
    new table too, so ``sub_keys**2`` must reach it. Updates ``model.config.memory_sub_keys`` to
    the list of every table's sub-keys.

    The new tables are new parameters: an optimizer built before the growth does not hold them
    (build it again, or add ``record.new_parameters`` as a param group).
    """
    _require_bare_model(model, "grow_memory")
    config = model.config
    if not config.memory_layers:
        raise ValueError("grow_memory needs a model with a sparse memory; this one has memory_layers=[]")
    if not is_int(sub_keys) or sub_keys**2 < config.memory_top_k:
        raise ValueError(
            f"grow_memory sub_keys={sub_keys!r} is invalid; allowed: an integer whose square reaches "
            f"memory_top_k={config.memory_top_k} (at least {math.isqrt(config.memory_top_k - 1) + 1})"
        )
    before = config.memory_tables
    new_parameters = []
    for i in config.memory_layers:
        memory = model.layers[i].memory
        reference = memory[0].value_param_tokens
        table = make_memory_table(config, sub_keys, value_std=0.0).to(reference.device, reference.dtype)
        table.train(memory.training)
        with torch.no_grad():
            table.sub_key_tokens.normal_(std=table.key_std, generator=generator)
        memory.append(table)
        prefix = f"layers.{i}.memory.{len(memory) - 1}"
        new_parameters += [(f"{prefix}.{name}", p) for name, p in table.named_parameters()]
    model.config = config.replace(memory_sub_keys=[*before, sub_keys])
    return MemoryGrowthRecord(before, model.config.memory_tables, new_parameters)
