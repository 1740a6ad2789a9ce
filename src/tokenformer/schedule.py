"""Growth schedules: when a model grows and to what size, as data.

A schedule is a list of :class:`GrowthStage`: a model size (the totals of ``qkv_tokens``,
``proj_tokens``, ``ffn_tokens`` and ``n_layers``) and the optimizer steps trained at it. Stages
are given by their *share* of the step budget, so one schedule serves any budget. A scaling
plan's ``schedule:`` section spells out each stage's share and size
(:mod:`tokenformer.experiments.scaling.plan`); :func:`growth_schedule` derives them from a rule,
a start size and a target size, for ordinary training (``tokenformer train --grow_schedule RULE
--grow_to SIZE``).

Rules:

- ``shares:S1,S2,...``: one stage per share of the step budget (shares > 0, summing to 1);
- ``equal:K``: K stages of equal shares.

Stage ``i`` of ``K`` has the token counts ``start * (target / start) ** (i / (K - 1))``
(geometric: every growth multiplies by the same factor), rounded, and the depth
``start + (target - start) * i / (K - 1)`` (linear), rounded; the last stage is the target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .growth import GrowthRecord, grow
from .validation import is_int, is_number

TOKEN_KEYS = ("qkv_tokens", "proj_tokens", "ffn_tokens")
SIZE_KEYS = (*TOKEN_KEYS, "n_layers")
RULES = "shares:S1,S2,... (shares > 0 summing to 1) or equal:K (K >= 2 stages of equal shares)"


@dataclass(frozen=True)
class GrowthStage:
    """Train at ``size`` from step ``start`` up to step ``end`` (the model grows to ``size`` at
    ``start``; the first stage is the size the model starts at)."""

    start: int
    end: int
    size: dict[str, int]

    @property
    def steps(self) -> int:
        return self.end - self.start


def check_shares(shares: Any, where: str) -> list[float]:
    """``shares`` as floats, refused unless each is a number > 0 and they sum to 1."""
    if not isinstance(shares, (list, tuple)) or len(shares) < 2:
        raise ValueError(f"{where}={shares!r} is invalid; allowed: at least 2 shares of the step budget")
    for i, share in enumerate(shares):
        if not (is_number(share) and 0 < share <= 1):
            raise ValueError(f"{where}[{i}]={share!r} is invalid; allowed: a number in (0, 1]")
    if not math.isclose(sum(shares), 1.0, abs_tol=1e-6):
        raise ValueError(f"{where}={list(shares)!r} sums to {sum(shares):.6g}; allowed: shares summing to 1")
    return [float(s) for s in shares]


def stage_ends(shares: Sequence[float], total_steps: int, where: str) -> list[int]:
    """The last step of each stage: the cumulative shares of ``total_steps``, rounded (the last is
    ``total_steps``); refused when a stage would get no step."""
    ends, cumulative = [], 0.0
    for share in shares[:-1]:
        cumulative += share
        ends.append(round(total_steps * cumulative))
    ends.append(total_steps)
    starts = [0, *ends[:-1]]
    empty = [i for i, (a, b) in enumerate(zip(starts, ends, strict=True)) if b <= a]
    if empty:
        raise ValueError(
            f"{where}: stage {empty[0] + 1} of {list(shares)!r} gets no step of {total_steps}; "
            "allowed: shares large enough for at least one step each (or more steps)"
        )
    return ends


def parse_rule(rule: Any) -> list[float]:
    """The stage shares of a rule (see the module docstring)."""
    kind, _, argument = rule.partition(":") if isinstance(rule, str) else ("", "", "")
    try:
        if kind == "equal":
            count = int(argument)
            if count < 2:
                raise ValueError
            return [1.0 / count] * count
        if kind == "shares":
            shares = [float(s) for s in argument.split(",")]
            return check_shares(shares, f"grow_schedule {rule!r}: shares")
    except ValueError as exc:
        if str(exc).startswith("grow_schedule"):
            raise
    raise ValueError(f"grow_schedule={rule!r} is invalid; allowed: {RULES}")


def model_size(config: Any) -> dict[str, int]:
    """The size of a model config in schedule terms (the largest count of each kind over layers)."""
    layers = [config.tokens(i) for i in range(config.n_layers)]
    size = {f"{kind}_tokens": max(counts[kind] for counts in layers) for kind in ("qkv", "proj", "ffn")}
    return {**size, "n_layers": config.n_layers}


def check_size(size: Any, where: str) -> dict[str, int]:
    """A (partial) size: a mapping from ``SIZE_KEYS`` to positive integers."""
    if not isinstance(size, dict) or not size or set(size) - set(SIZE_KEYS):
        raise ValueError(f"{where}={size!r} is invalid; allowed: a mapping from {', '.join(SIZE_KEYS)} to integers")
    for key, value in size.items():
        if not (is_int(value) and value >= 1):
            raise ValueError(f"{where}.{key}={value!r} is invalid; allowed: a positive integer")
    return dict(size)


def growth_schedule(rule: str, start: dict[str, int], target: dict[str, int], total_steps: int) -> list[GrowthStage]:
    """The stages of ``rule`` from the size ``start`` to ``target`` over ``total_steps`` steps.

    ``start`` is the model's size (:func:`model_size`); ``target`` gives the final size of the
    kinds that grow (kinds left out keep ``start``'s). Sizes between follow the module docstring.
    """
    shares = parse_rule(rule)
    target = {**start, **check_size(target, "grow_to")}
    smaller = {k: v for k, v in target.items() if v < start[k]}
    if smaller:
        raise ValueError(
            f"grow_to={smaller!r} is below the model's { ({k: start[k] for k in smaller})!r}; "
            "allowed: sizes >= the model's (a schedule grows)"
        )
    if target == start:
        raise ValueError(f"grow_to={target!r} equals the model's size; allowed: a larger size for at least one key")
    ends = stage_ends(shares, total_steps, f"grow_schedule {rule!r}")
    last = len(shares) - 1
    stages = []
    for i, end in enumerate(ends):
        size = {}
        for key in SIZE_KEYS:
            a, b = start[key], target[key]
            size[key] = round(a + (b - a) * i / last) if key == "n_layers" else round(a * (b / a) ** (i / last))
        stages.append(GrowthStage(0 if i == 0 else ends[i - 1], end, size))
    return stages


def growth_to(config: Any, size: dict[str, int]) -> dict[str, int]:
    """The arguments of :func:`~tokenformer.grow` that take a model of ``config`` to ``size``:
    the entries of ``size`` above the model's (empty: it has that size)."""
    current = model_size(config)
    return {k: v for k, v in size.items() if v > current[k]}


def grow_to_size(model: nn.Module, size: dict[str, int], **options: Any) -> GrowthRecord | None:
    """:func:`~tokenformer.grow` ``model`` to ``size`` (keys of ``SIZE_KEYS``; the kinds that are
    not larger are left alone); ``None`` when the model has that size already. ``options`` go
    to ``grow`` (``depth_position``, ``generator``, ...)."""
    larger = growth_to(model.config, size)
    return grow(model, **larger, **options) if larger else None


def growth_generator(seed: int, stage: int) -> torch.Generator:
    """The generator of the random new weights of growth into ``stage`` of a run seeded ``seed``:
    a regrowth after a resume is identical, and every rank of a distributed run grows alike."""
    return torch.Generator().manual_seed(seed * 1000 + stage)
