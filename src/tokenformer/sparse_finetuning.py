"""Sparse token fine-tuning: learn new data by training only the parameter tokens that it uses
much and the old data little, every other weight frozen.

The idea of sparse memory fine-tuning (Lin et al., 2025, arXiv 2510.15103), which ranks the slots
of a memory layer by TF-IDF, applied to the dense Pattentions. The *usage* of token ``i`` of a
Pattention on a corpus is its share of the layer's mean absolute normalised score::

    m_i = mean over input rows of |S_i|,      u_i = m_i / sum_j m_j

(``S`` the scores after ``theta``, as the layer uses them; the means run over every position of
the batches). Shares make corpora and layers comparable: each layer's usage sums to 1. A token's
score ranks it by how much more the new data uses it than the old::

    score_i = u_new_i * log(1 / (u_old_i + eps))

the term frequency on the new corpus times an inverse document frequency on the old one
(``eps = USAGE_EPS`` keeps a token the old data never uses finite: a zero-key token is one, but
its new usage is 0 too). The ``budget`` highest-scoring tokens of *each* Pattention train (a
per-layer budget: shares are per layer, so a global ranking would favour the layers with fewer
tokens); their key and value rows are the only weights that move (:func:`trainable_rows`, applied
with :class:`~tokenformer.growth.RowUpdateScale`, which keeps the other rows bit for bit, AdamW's
weight decay included).

The same for the slots of a sparse memory (:class:`~tokenformer.sparse_pattention.SparsePattention`
tables, the layer the paper's method was made for): a slot's usage is its share of the table's
summed absolute normalised weights over every selection of every input row (a slot no row selects
has usage 0), and the ``budget`` highest-scoring slots of each table train their value rows only
(:func:`slot_usage`, :func:`trainable_slots`, :func:`freeze_all_but_memory_values`): the sub-keys,
and with them which slots every input selects, stay as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import io
from .growth import ScaledRows
from .pattention import Pattention, normalise_scores
from .pruning import forward_with_hooks, normalised_scores, select_tokens
from .sparse_pattention import SparsePattention, memory_tables

# Added to the old usage inside the logarithm, so that a token the old data never uses scores finitely.
USAGE_EPS = 1e-8
# Where a run keeps its usage statistics (beside its checkpoints).
USAGE_FILE = "token_usage.safetensors"


def pattentions(model: nn.Module) -> list[tuple[str, Pattention]]:
    """``("layers.<i>.<name>", layer)`` of every dense Pattention in the blocks of ``model``."""
    return [
        (f"layers.{i}.{name}", layer) for i, block in enumerate(model.layers) for name, layer in block.pattentions()
    ]


@torch.no_grad()
def token_usage(
    model: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any] | None = None
) -> dict[str, torch.Tensor]:
    """Usage of every token of every dense Pattention on ``batches``: its share of the layer's
    mean absolute normalised score (float64, summing to 1 per layer; see the module docstring).

    ``forward(model, batch)`` runs the model on one batch (default ``model(batch)``). Returns
    ``{"layers.<i>.<name>": usage}``.
    """
    layers = pattentions(model)
    if not layers:
        raise ValueError("token_usage needs a model with Pattentions; this one has none (projection='linear')")
    sums = {name: torch.zeros(layer.num_tokens, dtype=torch.float64) for name, layer in layers}

    def hook(name: str):
        def accumulate(layer: nn.Module, inputs: tuple, _output: Any) -> None:
            scores = normalised_scores(layer, inputs[0]).abs().reshape(-1, layer.num_tokens)
            sums[name] += scores.sum(dim=0, dtype=torch.float64).cpu()

        return accumulate

    forward_with_hooks(model, [(layer, hook(name)) for name, layer in layers], batches, forward, "token_usage")
    return _shares(sums)


@torch.no_grad()
def slot_usage(
    model: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any] | None = None
) -> dict[str, torch.Tensor]:
    """Usage of every slot (value row) of every sparse-memory table on ``batches``: its share of
    the table's summed absolute normalised weights over all selections (float64 ``[heads *
    sub_keys**2]``, summing to 1 per table; see the module docstring). Runs in eval mode, so a
    batch-normalised query uses its running statistics. ``forward`` as in :func:`token_usage`."""
    tables = memory_tables(model)
    if not tables:
        raise ValueError(
            "slot usage needs a model with a sparse memory; this one has none; "
            "allowed: a model with memory layers (a config with memory_layers, e.g. [1])"
        )
    sums = {name: torch.zeros(table.heads * table.num_tokens, dtype=torch.float64) for name, table in tables}

    def hook(name: str):
        def accumulate(table: SparsePattention, inputs: tuple, _output: Any) -> None:
            scores, slots = table.select(table.query(inputs[0].reshape(-1, table.in_features)))
            weights = normalise_scores(scores, table.norm, table.tau).abs()
            sums[name].index_add_(0, slots.flatten().cpu(), weights.flatten().to(torch.float64).cpu())

        return accumulate

    forward_with_hooks(model, [(table, hook(name)) for name, table in tables], batches, forward, "slot_usage")
    return _shares(sums)


def _shares(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each layer's sums as shares of its total (a layer nothing reached stays all zero)."""
    return {name: total / total.sum().clamp_min(torch.finfo(torch.float64).tiny) for name, total in sums.items()}


def token_scores(usage_new: dict[str, torch.Tensor], usage_old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``u_new * log(1 / (u_old + eps))`` per token: how much more the new data uses it than the old."""
    if set(usage_new) != set(usage_old):
        raise ValueError(
            f"usage of different layers: new data {sorted(usage_new)}, old data {sorted(usage_old)}; "
            "allowed: statistics of the same model"
        )
    return {name: usage_new[name] * -torch.log(usage_old[name] + USAGE_EPS) for name in usage_new}


def chosen_tokens(scores: dict[str, torch.Tensor], budget: int) -> dict[str, torch.Tensor]:
    """The indices of the ``budget`` highest-scoring tokens of each layer (all of a smaller one),
    ascending; ties go to the earlier token."""
    if not (isinstance(budget, int) and not isinstance(budget, bool) and budget >= 1):
        raise ValueError(f"a token budget must be a positive integer, got {budget!r}")
    return {name: select_tokens(score, min(budget, score.numel())) for name, score in scores.items()}


def trainable_rows(model: nn.Module, chosen: dict[str, torch.Tensor]) -> list[ScaledRows]:
    """Update scales for the key and value tokens of every dense Pattention: 1 for the ``chosen``
    rows, 0 for the others (for :class:`~tokenformer.growth.RowUpdateScale`)."""
    rows = []
    for name, layer in pattentions(model):
        if name not in chosen:
            raise ValueError(f"no chosen tokens for {name}; allowed: a selection of this model's Pattentions")
        scale = torch.zeros(layer.num_tokens, dtype=torch.float64)
        scale[chosen[name]] = 1.0
        rows += [
            ScaledRows(f"{name}.key_param_tokens", layer.key_param_tokens, 0, scale),
            ScaledRows(f"{name}.value_param_tokens", layer.value_param_tokens, 0, scale),
        ]
    return rows


def freeze_all_but_tokens(model: nn.Module) -> None:
    """Stop every parameter but the dense Pattentions' key and value tokens requiring gradients
    (before the optimizer is built: frozen tensors then get no update, decay or state)."""
    tokens = {id(p) for _, layer in pattentions(model) for p in (layer.key_param_tokens, layer.value_param_tokens)}
    for param in model.parameters():
        if id(param) not in tokens:
            param.requires_grad_(False)


def trainable_slots(model: nn.Module, chosen: dict[str, torch.Tensor]) -> list[ScaledRows]:
    """Update scales for the value rows of every sparse-memory table: 1 for the ``chosen`` slots,
    0 for the others (for :class:`~tokenformer.growth.RowUpdateScale`)."""
    rows = []
    for name, table in memory_tables(model):
        if name not in chosen:
            raise ValueError(f"no chosen slots for {name}; allowed: a selection of this model's memory tables")
        scale = torch.zeros(table.value_param_tokens.shape[0], dtype=torch.float64)
        scale[chosen[name]] = 1.0
        rows.append(ScaledRows(f"{name}.value_param_tokens", table.value_param_tokens, 0, scale))
    return rows


def freeze_all_but_memory_values(model: nn.Module) -> None:
    """Stop every parameter but the sparse-memory tables' value rows requiring gradients (before
    the optimizer is built)."""
    values = {id(table.value_param_tokens) for _, table in memory_tables(model)}
    for param in model.parameters():
        if id(param) not in values:
            param.requires_grad_(False)


def save_usage(path: Path, usage_new: dict[str, torch.Tensor], usage_old: dict[str, torch.Tensor]) -> None:
    """Write both corpora's usage statistics (safetensors: ``new/<layer>`` and ``old/<layer>``)."""
    tensors = {f"new/{name}": t.contiguous() for name, t in usage_new.items()}
    tensors.update({f"old/{name}": t.contiguous() for name, t in usage_old.items()})
    io.save_weights(tensors, path, metadata={"score": "u_new * log(1 / (u_old + eps))", "eps": str(USAGE_EPS)})


def load_usage(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(usage_new, usage_old)`` as :func:`save_usage` wrote them."""
    tensors = io.load_weights(path)
    parts: dict[str, dict[str, torch.Tensor]] = {"new": {}, "old": {}}
    for key, value in tensors.items():
        corpus, _, name = key.partition("/")
        if corpus not in parts:
            raise ValueError(f"{path} is not a usage file: it holds {key!r}; allowed keys: new/<layer>, old/<layer>")
        parts[corpus][name] = value
    return parts["new"], parts["old"]
