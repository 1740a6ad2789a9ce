"""SparsePattention: Pattention over a large set of parameter tokens indexed by product keys.

A head holds ``n = sub_keys**2`` parameter tokens. Its key tokens are not stored one by one: the
query ``x [d_in]`` is split into halves ``x1, x2`` and token ``(i, j)`` has the key
``[K1_i ; K2_j]`` made of row ``i`` of the first sub-key table and row ``j`` of the second (each
``[sub_keys, d_in / 2]``), so its score is ``x1 . K1_i + x2 . K2_j`` (Lample et al., 2019,
"Large Memory Layers with Product Keys"). The ``top_k`` best of the ``n`` scores are found
without computing them all: the ``k' = min(top_k, sub_keys)`` best sub-key scores of each half
give ``k' * k'`` candidate sums, which hold the ``top_k`` best of all ``n``; ``top_k`` of them are
kept::

    a, b  = x1 @ K1^T, x2 @ K2^T                  # [sub_keys] each
    A     = topk(topk(a, k') (+) topk(b, k'), k)  # the k best scores of all n
    S     = theta(A)                              # Pattention's normalisation, over the k
    out   = sum_t S_t * V[token_t]                # k rows of V gathered, never all n

``theta`` is :func:`tokenformer.pattention.normalise_scores`, Pattention's own, applied to the
``k`` selected scores with ``tau = sqrt(top_k)`` (frozen at creation like Pattention's). Over the
selected scores because the others are never computed (a norm over all ``n`` would couple every
output to tokens it does not read), and ``sqrt(k)`` because the normalised vector then has entries
of root-mean-square 1, the regime the dense layer's ``tau = sqrt(n)`` keeps its ``n`` entries in;
with ``top_k == n`` every token is selected and the layer is the dense Pattention with its own
``tau`` (:meth:`SparsePattention.to_dense` computes that one).

Heads are independent tables of the same kind, each reading the whole input, with their own
sub-keys and values; their outputs add up (``embedding_bag`` sums one bag of ``heads * top_k``
weighted value rows per input row).

:func:`memory_usage` measures how much of a model's memories its inputs reach: the share of
tokens ever selected and how far the selections are from uniform.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .pattention import check_norm, normalise_scores, pattention, release_tau

QUERY_NORMS = ("none", "layer", "batch")


def _positive_int(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"SparsePattention {name} must be a positive integer, got {value!r}")
    return value


class QueryBatchNorm(nn.Module):
    """``BatchNorm1d`` over the rows of ``[N, features]`` (weight, bias, running mean and variance),
    without its integer batch counter: a model's files hold floating-point tensors only."""

    def __init__(self, features: int, momentum: float = 0.1, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.empty(features, **factory))
        self.bias = nn.Parameter(torch.empty(features, **factory))
        self.register_buffer("running_mean", torch.empty(features, **factory))
        self.register_buffer("running_var", torch.empty(features, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for t, value in ((self.weight, 1.0), (self.bias, 0.0), (self.running_mean, 0.0), (self.running_var, 1.0)):
            if not t.is_meta:
                nn.init.constant_(t, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps
        )


class SparsePattention(nn.Module):
    """Pattention whose ``heads * sub_keys**2`` parameter tokens are read ``top_k`` per head.

    Parameters ``sub_key_tokens [heads, 2, sub_keys, in_features // 2]`` (each head's two
    sub-key tables) and ``value_param_tokens [heads * sub_keys**2, out_features]`` (head ``h``'s
    token ``(i, j)`` is row ``h * sub_keys**2 + i * sub_keys + j``); the buffer ``tau`` (saved in
    the state dict) is the score scale, ``sqrt(top_k)`` unless given, frozen at creation.

    ``query_norm`` normalises the input before its scores are taken: ``"none"``; ``"layer"``, a
    layer norm without weights; ``"batch"``, a batch norm (:class:`QueryBatchNorm`, with weight
    and bias) over every input row of the batch, as product-key memories use to spread the
    queries over the keys. ``"batch"`` normalises with the batch's statistics in training (so a
    row's output depends on the other rows of its batch, later positions of a sequence included)
    and with running statistics in evaluation.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        sub_keys: int,
        top_k: int,
        heads: int = 1,
        norm: str = "l2_norm_gelu",
        *,
        query_norm: str = "none",
        key_std: float = 0.02,
        value_std: float = 0.02,
        tau: float | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features), ("heads", heads)):
            _positive_int(value, name)
        _positive_int(sub_keys, "sub_keys")
        if in_features % 2:
            raise ValueError(
                f"SparsePattention in_features must be even (the query is split into two halves), got {in_features}"
            )
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= sub_keys**2:
            raise ValueError(
                f"SparsePattention top_k must be an integer from 1 to sub_keys**2 = {sub_keys**2}, got {top_k!r}"
            )
        if query_norm not in QUERY_NORMS:
            raise ValueError(f"unknown SparsePattention query_norm {query_norm!r}; allowed: {', '.join(QUERY_NORMS)}")
        if tau is not None and not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"SparsePattention tau must be a finite number > 0 or None (sqrt(top_k)), got {tau!r}")
        self.in_features, self.out_features = in_features, out_features
        self.sub_keys, self.top_k, self.heads = sub_keys, top_k, heads
        self.norm = check_norm(norm)
        self.query_norm = query_norm
        self.key_std, self.value_std = key_std, value_std
        self.initial_tau = release_tau(top_k) if tau is None else float(tau)
        factory = {"device": device, "dtype": dtype}
        self.sub_key_tokens = nn.Parameter(torch.empty(heads, 2, sub_keys, in_features // 2, **factory))
        self.value_param_tokens = nn.Parameter(torch.empty(heads * sub_keys**2, out_features, **factory))
        self.register_buffer("tau", torch.tensor(self.initial_tau, **factory))
        self.batch_norm = QueryBatchNorm(in_features, **factory) if query_norm == "batch" else None
        self.reset_parameters()

    @property
    def num_tokens(self) -> int:
        """Parameter tokens of one head: ``sub_keys**2``."""
        return self.sub_keys**2

    @property
    def candidates(self) -> int:
        """Best sub-keys kept per half before the final top-k: ``min(top_k, sub_keys)``."""
        return min(self.top_k, self.sub_keys)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.sub_key_tokens, std=self.key_std)
        nn.init.normal_(self.value_param_tokens, std=self.value_std)
        if not self.tau.is_meta:
            self.tau.fill_(self.initial_tau)
        if self.batch_norm is not None:
            self.batch_norm.reset_parameters()

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, in_features]`` normalised as ``query_norm`` says."""
        if self.query_norm == "layer":
            return F.layer_norm(x, (self.in_features,))
        if self.query_norm == "batch":
            return self.batch_norm(x)
        return x

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``top_k`` best scores of each head and their tokens, both ``[N, heads, top_k]``, for
        the (normalised) queries ``x [N, in_features]``; tokens index ``value_param_tokens``."""
        heads, sub_keys, half, k = self.heads, self.sub_keys, self.in_features // 2, self.candidates
        keys = self.sub_key_tokens
        # The scores of both halves against every head's sub-keys: [N, heads, sub_keys] each.
        first = F.linear(x[:, :half], keys[:, 0].reshape(-1, half)).view(-1, heads, sub_keys)
        second = F.linear(x[:, half:], keys[:, 1].reshape(-1, half)).view(-1, heads, sub_keys)
        first, rows = first.topk(k, dim=-1)
        second, cols = second.topk(k, dim=-1)
        # Every sum of a kept first-half and a kept second-half score: [N, heads, k * k].
        sums = (first.unsqueeze(-1) + second.unsqueeze(-2)).flatten(-2)
        scores, best = sums.topk(self.top_k, dim=-1)
        tokens = rows.gather(-1, best // k) * sub_keys + cols.gather(-1, best % k)
        return scores, tokens + torch.arange(heads, device=x.device).view(1, heads, 1) * self.num_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"SparsePattention expects inputs [..., in_features={self.in_features}], got {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        scores, tokens = self.select(self.query(x.reshape(-1, self.in_features)))
        weights = normalise_scores(scores, self.norm, self.tau)
        values = self.value_param_tokens
        # One bag of heads * top_k value rows per input row: the value gradient reaches those rows only.
        out = F.embedding_bag(
            tokens.flatten(1), values, per_sample_weights=weights.flatten(1).to(values.dtype), mode="sum"
        )
        return out.view(*lead, self.out_features)

    def to_dense(self) -> DenseProductKeys:
        """The dense computation of this layer: every head a Pattention over all ``sub_keys**2``
        tokens with the materialised keys ``[K1_i ; K2_j]``, the same values and ``tau``. It shares
        this layer's parameters (gradients reach them). With ``top_k == sub_keys**2`` it computes
        this layer's function."""
        return DenseProductKeys(self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, sub_keys={self.sub_keys}, "
            f"top_k={self.top_k}, heads={self.heads}, norm={self.norm!r}, query_norm={self.query_norm!r}"
        )


class DenseProductKeys(nn.Module):
    """The dense reference of a :class:`SparsePattention` (its :meth:`~SparsePattention.to_dense`):
    ``sum over heads of pattention(query(x), keys_h, values_h, tau)`` with every token of a head
    scored, its keys ``[K1_i ; K2_j]`` built from the sparse layer's sub-keys at every call."""

    def __init__(self, sparse: SparsePattention) -> None:
        super().__init__()
        self.sparse = sparse

    def keys(self) -> torch.Tensor:
        """Materialised keys ``[heads, sub_keys**2, in_features]``: row ``i * sub_keys + j`` is ``[K1_i ; K2_j]``."""
        sub = self.sparse.sub_key_tokens
        heads, _, n, half = sub.shape
        first = sub[:, 0].unsqueeze(2).expand(heads, n, n, half)
        second = sub[:, 1].unsqueeze(1).expand(heads, n, n, half)
        return torch.cat((first, second), dim=-1).reshape(heads, n * n, 2 * half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sparse = self.sparse
        lead = x.shape[:-1]
        query = sparse.query(x.reshape(-1, sparse.in_features))
        values = sparse.value_param_tokens.view(sparse.heads, sparse.num_tokens, -1)
        heads = [
            pattention(query, keys, head_values, sparse.tau, sparse.norm, impl="reference")
            for keys, head_values in zip(self.keys().unbind(0), values.unbind(0), strict=True)
        ]
        return torch.stack(heads).sum(0).view(*lead, sparse.out_features)


class SparseMemory(nn.ModuleList):
    """A memory of one or more :class:`SparsePattention` tables reading the same input: the sum
    of their outputs. Each table keeps its own selection and normalisation, so a table appended
    with zero values adds exactly 0 (see :func:`tokenformer.growth.grow_memory`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self[0](x)
        for table in self[1:]:
            out = out + table(x)
        return out


def memory_tables(model: nn.Module) -> list[tuple[str, SparsePattention]]:
    """``(module name, table)`` of every sparse-memory table of ``model`` (``layers.<i>.memory.<t>``)."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, SparsePattention)]


@torch.no_grad()
def memory_usage(
    model: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any] | None = None
) -> dict[str, dict[str, Any]]:
    """How much of every memory table of ``model`` the inputs ``batches`` read, in eval mode.

    ``forward(model, batch)`` runs the model on one batch (default ``model(batch)``, a batch of
    input ids). Returns, per table (``"layers.<i>.memory.<t>"``, every :class:`SparsePattention`
    of the model by its module name)::

        tokens      heads * sub_keys**2, the table's value tokens
        selected    the tokens selected at least once
        share       selected / tokens
        kl_uniform  KL(p || uniform) = log(tokens) - H(p), in nats, of p the share of all
                    selections each token got: 0 when every token is selected equally often
        counts      how often each token was selected (int64 [tokens], value_param_tokens' rows)
    """
    # A function-level import: pruning imports the model, which imports this module.
    from .pruning import forward_with_hooks

    tables = memory_tables(model)
    if not tables:
        config = getattr(model, "config", None)
        given = f"memory_layers={config.memory_layers!r}" if hasattr(config, "memory_layers") else "no SparsePattention"
        raise ValueError(
            f"memory_usage needs a model with a sparse memory; this one has {given}; "
            "allowed: a model with memory layers (a config with memory_layers, e.g. [1]) or SparsePattention modules"
        )
    counts = {name: torch.zeros(table.heads * table.num_tokens, dtype=torch.int64) for name, table in tables}

    def hook(name: str):
        def count(table: SparsePattention, inputs: tuple, _output: Any) -> None:
            # The hook sees the table's input, not its selection: it selects again (the same
            # tokens, as eval mode normalises queries with fixed statistics).
            _, tokens = table.select(table.query(inputs[0].reshape(-1, table.in_features)))
            counts[name] += torch.bincount(tokens.flatten(), minlength=counts[name].numel()).cpu()

        return count

    forward_with_hooks(model, [(table, hook(name)) for name, table in tables], batches, forward, "memory_usage")
    return {name: selection_statistics(count) for name, count in counts.items()}


def selection_statistics(counts: torch.Tensor) -> dict[str, Any]:
    """``tokens``, ``selected``, ``share``, ``kl_uniform`` and ``counts`` (see :func:`memory_usage`)
    of the selection ``counts`` of one table's tokens."""
    tokens = counts.numel()
    p = counts.to(torch.float64) / counts.sum().clamp_min(1)
    p = p[p > 0]
    selected = int(p.numel())
    return {
        "tokens": tokens,
        "selected": selected,
        "share": selected / tokens,
        "kl_uniform": float((p * (p * tokens).log()).sum()),
        "counts": counts,
    }
