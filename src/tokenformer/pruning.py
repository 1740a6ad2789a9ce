"""Pruning: remove parameter tokens from a trained model, the inverse of :func:`~tokenformer.grow`.

With ``l2_norm_gelu`` a Pattention computes ``GeLU(A / ||A|| * tau) @ V`` over each row of scores
``A = x K^T``. Dropping tokens removes their terms from the sum *and* their scores from ``||A||``,
so every kept score is normalised differently too. The **ghost norm** keeps the second part: the
pruned layer stores a factor ``F [r, d_in]`` with ``F^T F = K_r^T K_r`` for the removed keys
``K_r``, so that ``||x K_r^T||^2 = ||x F^T||^2`` for every input and::

    out = GeLU(A_kept * tau / sqrt(||A_kept||^2 + ||x F^T||^2)) @ V_kept

normalises the kept scores exactly as before pruning; only the removed tokens' own terms are gone.
``F`` comes from an SVD of ``K_r`` (of the old ghost stacked on ``K_r`` when a layer is pruned
again); its rank is that of ``K_r``, at most ``min(removed, d_in)``, and ``ghost_rank`` keeps
only the strongest directions (then the norm is underestimated by the energy left out). It costs
``r * d_in`` multiply-adds per input token, against ``removed * (d_in + d_out)`` for the removed
tokens. The ghost is a buffer: fine-tuning after pruning trains the kept tokens only.

The other normalisations have no compact exact ghost: ``gelu_l2_norm`` normalises ``GeLU(A)``,
and ``||GeLU(x K_r^T)||^2`` is no quadratic form of ``x``; nor is ``softmax``'s removed mass
``sum exp(x k_i)``. Pruning them drops the tokens outright (the normaliser then covers the kept
tokens only), which changes the function; ``ghost=True`` is refused for them.

Which tokens go is decided by an importance score per token; the highest scores stay, in their
old order (ties go to the earlier token):

- data-free (``scores=None``): ``||k_i|| * ||v_i||``;
- measured (:func:`calibration_scores`, the command line's default): ``mean |S_i| * ||v_i||``,
  the token's mean absolute normalised score over calibration inputs times its value's norm,
  i.e. how much it adds to the layer's output on average.

Either way a token with a zero key scores 0: its score is 0 for every input and ``GeLU(0) = 0``,
so it adds nothing. Pruning right after a zero-key growth therefore removes exactly the grown
tokens and gives back the model before growth (their zero keys leave no ghost). The Transformer
baseline (``projection="linear"``) prunes its MLP hidden units by the same rules, with
``fc1``'s rows as keys and ``fc2``'s columns as values.

Parameters are resized in place (``param.data`` is replaced), so optimizer param groups and
references stay valid; :func:`prune_optimizer_state` cuts the optimizer's moments alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import TOKEN_KINDS
from .growth import _chosen_layers, _require_bare_model, layer_tokens, set_config_tokens
from .model import MLP
from .pattention import Pattention, normalise_scores


@dataclass
class PrunedParameter:
    """One parameter that kept the rows (``dim=0``) or columns (``dim=1``) ``kept`` of its old ones."""

    name: str
    param: nn.Parameter
    dim: int
    kept: torch.Tensor


@dataclass
class PruneRecord:
    """What one call of :func:`prune` changed.

    ``kept`` maps every pruned module (``layers.<i>.<name>``) to the indices of the tokens (MLP
    hidden units) it kept, ascending; ``ghost_ranks`` the rank of each one's ghost afterwards.
    ``function_preserving``: every removed token had a zero key (or an MLP unit zero weights on one
    side), so the outputs did not change.
    """

    before: list[dict[str, int]]
    after: list[dict[str, int]]
    ghost: bool
    function_preserving: bool
    kept: dict[str, torch.Tensor] = field(default_factory=dict)
    ghost_ranks: dict[str, int] = field(default_factory=dict)
    pruned: list[PrunedParameter] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "operation": "prune",
            "before": self.before,
            "after": self.after,
            "ghost": self.ghost,
            "ghost_ranks": self.ghost_ranks,
            "function_preserving": self.function_preserving,
        }


# -- importance ---------------------------------------------------------------------------------


def _keys_and_values(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token (hidden unit) rows: its key (incoming weights) and its value (outgoing weights)."""
    if isinstance(module, Pattention):
        return module.key_param_tokens.detach(), module.value_param_tokens.detach()
    return module.fc1.weight.detach(), module.fc2.weight.detach().T


def _zero_dead(scores: torch.Tensor, module: nn.Module) -> torch.Tensor:
    # A zero key scores 0 on every input and GeLU(0) = 0: the token adds nothing, whatever else
    # the rule says about it.
    keys, _ = _keys_and_values(module)
    return scores * keys.ne(0).any(dim=1).to(scores.dtype)


def magnitude_scores(module: nn.Module) -> torch.Tensor:
    """The data-free importance of each token: ``||k_i|| * ||v_i||`` (0 for a zero key)."""
    keys, values = _keys_and_values(module)
    return _zero_dead(keys.norm(dim=1) * values.norm(dim=1), module)


def _activations(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What each token contributes with, per input row: the normalised scores ``S`` of a
    Pattention (its ghost included), the ``GeLU`` activations of an MLP."""
    if isinstance(module, Pattention):
        return normalised_scores(module, x)
    return F.gelu(module.fc1(x))


def normalised_scores(layer: Pattention, x: torch.Tensor) -> torch.Tensor:
    """``S [..., num_tokens]``: every token's normalised score as ``layer`` computes it (each
    normalisation group over its own tokens; a pruned layer's ghost in the old group's norm)."""
    keys = layer.key_param_tokens
    ghost = None if layer.ghost is None else F.linear(x, layer.ghost)
    if not layer.split:
        return normalise_scores(F.linear(x, keys), layer.norm, layer.tau, ghost)
    s = layer.split
    old = normalise_scores(F.linear(x, keys[:s]), layer.norm, layer.tau, ghost)
    return torch.cat((old, normalise_scores(F.linear(x, keys[s:]), layer.norm, layer.split_tau)), dim=-1)


def forward_with_hooks(
    model: nn.Module,
    hooks: Iterable[tuple[nn.Module, Callable[[nn.Module, tuple, Any], None]]],
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any] | None,
    caller: str,
) -> None:
    """Run ``forward(model, batch)`` (default ``model(batch)``) in eval mode on every batch with
    each ``(module, hook)`` registered as a forward hook; hooks removed and the mode restored
    after, whatever happens. Refused (naming ``caller``) when ``batches`` is empty."""
    forward = forward or (lambda m, batch: m(batch))
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    was_training = model.training
    model.eval()
    try:
        seen = 0
        for batch in batches:
            forward(model, batch)
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not seen:
        raise ValueError(f"{caller} needs at least one batch")


def prunable_modules(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """``(name, kind, module)`` of every Pattention and MLP in the blocks of ``model``."""
    found = []
    for i, block in enumerate(model.layers):
        for kind in TOKEN_KINDS:
            for name, module in block.modules_of_kind(kind):
                if isinstance(module, (Pattention, MLP)):
                    found.append((f"layers.{i}.{name}", kind, module))
    return found


@torch.no_grad()
def calibration_scores(
    model: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any] | None = None
) -> dict[str, torch.Tensor]:
    """Importance of every token of every block, measured: ``mean |S_i| * ||v_i||``.

    ``S_i`` is token ``i``'s normalised score (an MLP's GeLU activation) and the mean runs over
    every input row of ``batches``; ``forward(model, batch)`` runs the model on one batch (default
    ``model(batch)``). Returns ``{"layers.<i>.<name>": scores}`` for :func:`prune`'s ``scores``.
    """
    modules = prunable_modules(model)
    sums = {name: torch.zeros(_keys_and_values(m)[0].shape[0], dtype=torch.float64) for name, _, m in modules}
    rows = dict.fromkeys(sums, 0)

    def hook(name: str):
        def accumulate(module: nn.Module, inputs: tuple, _output: Any) -> None:
            x = inputs[0]
            activations = _activations(module, x).abs().reshape(-1, sums[name].shape[0])
            sums[name] += activations.sum(dim=0, dtype=torch.float64).cpu()
            rows[name] += activations.shape[0]

        return accumulate

    forward_with_hooks(
        model, [(module, hook(name)) for name, _, module in modules], batches, forward, "calibration_scores"
    )
    scores = {}
    for name, _, module in modules:
        _, values = _keys_and_values(module)
        mean = (sums[name] / max(rows[name], 1)).to(values.device, values.dtype)
        scores[name] = _zero_dead(mean * values.norm(dim=1), module)
    return scores


def select_tokens(scores: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Indices of the ``num_tokens`` highest scores, ascending; ties go to the earlier token."""
    order = torch.sort(scores, descending=True, stable=True).indices[:num_tokens]
    return order.sort().values


# -- the ghost ----------------------------------------------------------------------------------


def ghost_factor(removed_keys: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """``F [r, d]`` with ``F^T F = K^T K`` for ``K = removed_keys [m, d]``.

    ``F = S V^T`` from the SVD ``K = U S V^T`` (in float64), without the directions whose singular
    value is numerically zero: ``r`` is the rank of ``K`` (0 when every removed key is zero), or at
    most ``rank`` (the strongest directions: an approximation).
    """
    dtype = removed_keys.dtype if removed_keys.dtype.is_floating_point else torch.float32
    keys = removed_keys.detach().to(torch.float64)
    if keys.shape[0] == 0:
        return removed_keys.new_zeros(0, keys.shape[1])
    _, singular, vh = torch.linalg.svd(keys, full_matrices=False)
    tolerance = singular.max() * max(keys.shape) * torch.finfo(dtype).eps
    kept = int((singular > tolerance).sum())
    if rank is not None:
        kept = min(kept, rank)
    return (singular[:kept, None] * vh[:kept]).to(removed_keys.dtype)


# -- pruning ------------------------------------------------------------------------------------


def _select(param: nn.Parameter, kept: torch.Tensor, dim: int) -> None:
    param.data = param.data.index_select(dim, kept.to(param.device))
    param.grad = None


def _removed_mask(total: int, kept: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(total, dtype=torch.bool)
    mask[kept.cpu()] = False
    return mask


def _prune_pattention(
    layer: Pattention, kept: torch.Tensor, ghost: bool, ghost_rank: int | None, rows: int | None, name: str
) -> list[PrunedParameter]:
    keys, values = layer.key_param_tokens, layer.value_param_tokens
    if ghost:
        removed = keys.detach()[_removed_mask(keys.shape[0], kept).to(keys.device)]
        old = [] if layer.ghost is None else [layer.ghost]
        factor = ghost_factor(torch.cat([*old, removed]), ghost_rank)
        if rows is not None:  # a copy of a model pruned alike keeps that model's ghost shapes
            factor = torch.cat((factor, factor.new_zeros(max(rows - factor.shape[0], 0), factor.shape[1])))[:rows]
        layer.set_ghost(factor)
    _select(keys, kept, 0)
    _select(values, kept, 0)
    return [
        PrunedParameter(f"{name}.key_param_tokens", keys, 0, kept),
        PrunedParameter(f"{name}.value_param_tokens", values, 0, kept),
    ]


def _prune_mlp(mlp: MLP, kept: torch.Tensor, name: str) -> list[PrunedParameter]:
    w1, w2 = mlp.fc1.weight, mlp.fc2.weight
    _select(w1, kept, 0)
    _select(w2, kept, 1)
    mlp.fc1.out_features = mlp.fc2.in_features = kept.numel()
    return [PrunedParameter(f"{name}.fc1.weight", w1, 0, kept), PrunedParameter(f"{name}.fc2.weight", w2, 1, kept)]


def _contributes(module: nn.Module, removed: torch.Tensor) -> bool:
    """Whether any removed token can change the output (a non-zero key, or for an MLP unit
    non-zero weights on both sides); with softmax even a zero key holds probability mass."""
    keys, values = _keys_and_values(module)
    removed = removed.to(keys.device)
    if isinstance(module, Pattention) and module.norm == "softmax":
        return bool(removed.any())
    live = keys[removed].ne(0).any(dim=1)
    if isinstance(module, MLP):
        live &= values[removed].ne(0).any(dim=1)
    return bool(live.any())


def _record_ghosts(model: nn.Module) -> None:
    ranks = [{name: m.ghost_rank for name, m in block.pattentions() if m.ghost is not None} for block in model.layers]
    model.config = model.config.replace(ghost_ranks=ranks if any(ranks) else None)


def _apply(
    model: nn.Module,
    kept: dict[str, torch.Tensor],
    ghost: bool,
    ghost_rank: int | None,
    rows: dict[str, int] | None = None,
) -> tuple[list[PrunedParameter], bool]:
    pruned, preserving = [], True
    for name, _, module in prunable_modules(model):
        if name not in kept:
            continue
        total = _keys_and_values(module)[0].shape[0]
        preserving &= not _contributes(module, _removed_mask(total, kept[name]))
        if isinstance(module, Pattention):
            rank = None if rows is None else rows.get(name, 0)
            pruned += _prune_pattention(module, kept[name], ghost, ghost_rank, rank, name)
        else:
            pruned += _prune_mlp(module, kept[name], name)
    counts = layer_tokens(model)
    for name, kind, module in prunable_modules(model):
        counts[int(name.split(".")[1])][kind] = _keys_and_values(module)[0].shape[0]
    set_config_tokens(model, counts)
    _record_ghosts(model)
    return pruned, preserving


def _check_ghost_options(projection: str, norm: str, ghost: bool | None, ghost_rank: int | None) -> bool:
    exact = projection == "pattention" and norm == "l2_norm_gelu"
    if ghost is None:
        ghost = exact
    if ghost and not exact:
        raise ValueError(
            f"ghost=True needs norm='l2_norm_gelu' Pattentions, got projection={projection!r}, norm={norm!r}: "
            f"the removed tokens' share of a {norm} normaliser has no exact compact form; "
            "allowed: ghost=False (the kept tokens are normalised among themselves) or None"
        )
    if ghost_rank is not None:
        if not ghost:
            raise ValueError(
                f"ghost_rank={ghost_rank!r} needs the ghost norm; allowed: ghost_rank=None with ghost=False"
            )
        if not isinstance(ghost_rank, int) or isinstance(ghost_rank, bool) or ghost_rank < 1:
            raise ValueError(f"ghost_rank must be a positive integer or None (the exact rank), got {ghost_rank!r}")
    return ghost


def prune(
    model: nn.Module,
    qkv_tokens: int | None = None,
    proj_tokens: int | None = None,
    ffn_tokens: int | None = None,
    *,
    layers: Iterable[int] | None = None,
    scores: dict[str, torch.Tensor] | None = None,
    ghost: bool | None = None,
    ghost_rank: int | None = None,
) -> PruneRecord:
    """Remove parameter tokens from every Pattention of a kind, in all layers or in ``layers``.

    ``model`` is a ``TokenformerLM`` or a ``TokenformerViT`` (the ViT's patch projection and head
    keep their size). Each count is the new total, from 1 to the current count (``None`` leaves
    that kind alone); query, key and value each keep that many of their own tokens. The tokens
    with the highest ``scores`` stay: ``{"layers.<i>.<name>": [tokens]}`` (e.g. from
    :func:`calibration_scores`), by default ``||k|| * ||v||``; a token with a zero key always
    scores 0. ``ghost`` (default: on for ``l2_norm_gelu``, the only normalisation that has one)
    keeps the removed keys' share of every row's norm; ``ghost_rank`` caps each ghost's rank.
    On a ``projection="linear"`` model only ``ffn_tokens`` (MLP hidden units) can be pruned.
    Updates ``model.config`` (token counts and ``ghost_ranks``). Every argument is checked
    before anything changes; a call that would change nothing is refused.
    """
    _require_bare_model(model, "prune")
    config = model.config
    if config.norm_splits is not None:
        raise ValueError(
            f"prune keeps one normalisation per Pattention; this model normalises new tokens apart "
            f"(norm_splits={config.norm_splits}); allowed: a model grown with normalisation='joint'"
        )
    targets = {kind: n for kind, n in zip(TOKEN_KINDS, (qkv_tokens, proj_tokens, ffn_tokens), strict=True)}
    targets = {kind: n for kind, n in targets.items() if n is not None}
    if not targets:
        raise ValueError("prune needs at least one of qkv_tokens, proj_tokens, ffn_tokens")
    for kind, n in targets.items():
        if not isinstance(n, int) or isinstance(n, bool):
            raise TypeError(f"{kind}_tokens={n!r} is not an integer; allowed: an integer token count (or None)")
    if config.projection == "linear" and set(targets) - {"ffn"}:
        raise ValueError(
            f"a projection='linear' model has no parameter tokens in its attention; "
            f"got {sorted(set(targets) - {'ffn'})}, allowed: ffn_tokens only (MLP hidden units)"
        )
    ghost = _check_ghost_options(config.projection, config.norm, ghost, ghost_rank)
    chosen = _chosen_layers(layers, config.n_layers)
    before = layer_tokens(model)
    for i in chosen:
        for kind, n in targets.items():
            current = before[i][kind]
            if n < 1:
                raise ValueError(
                    f"prune cannot leave {kind}_tokens={n!r} in layer {i}: every layer keeps at least 1 token; "
                    f"allowed: an integer from 1 to {current}"
                )
            if n > current:
                raise ValueError(
                    f"prune cannot grow: {kind}_tokens={n} is above layer {i}'s current {current}; "
                    f"allowed: an integer from 1 to {current} (grow adds tokens)"
                )
    if all(n == before[i][kind] for i in chosen for kind, n in targets.items()):
        asked = ", ".join(f"{kind}_tokens={n}" for kind, n in targets.items())
        raise ValueError(
            f"nothing to prune: {asked} equals the current count of every chosen layer; "
            "allowed: a count below the current one for at least one kind and layer"
        )
    kept: dict[str, torch.Tensor] = {}
    for name, kind, module in prunable_modules(model):
        layer = int(name.split(".")[1])
        if layer not in chosen or kind not in targets or targets[kind] == before[layer][kind]:
            continue
        kept[name] = select_tokens(_module_scores(module, name, scores), targets[kind])
    pruned, preserving = _apply(model, kept, ghost, ghost_rank)
    return PruneRecord(before, layer_tokens(model), ghost, preserving, kept, _ghost_ranks(model, kept), pruned)


def _module_scores(module: nn.Module, name: str, scores: dict[str, torch.Tensor] | None) -> torch.Tensor:
    if scores is None:
        return magnitude_scores(module)
    total = _keys_and_values(module)[0].shape[0]
    given = scores.get(name)
    if given is None:
        raise ValueError(f"scores has no entry for {name!r}; it needs one for every pruned module (a [{total}] tensor)")
    given = torch.as_tensor(given)
    if tuple(given.shape) != (total,):
        raise ValueError(f"scores[{name!r}] must have shape [{total}] (one per token), got {tuple(given.shape)}")
    return _zero_dead(given.to(_keys_and_values(module)[0]), module)


def _ghost_ranks(model: nn.Module, kept: dict[str, torch.Tensor]) -> dict[str, int]:
    modules = {name: module for name, _, module in prunable_modules(model)}
    return {name: modules[name].ghost_rank for name in kept if isinstance(modules[name], Pattention)}


def prune_like(model: nn.Module, record: PruneRecord) -> PruneRecord:
    """Prune a copy of the model ``record`` came from (e.g. its moving average) alike: the same
    tokens go, and each ghost, computed from this model's own removed keys, gets the same shape."""
    before = layer_tokens(model)
    if before != record.before:
        raise ValueError(f"prune_like needs a model with the token counts {record.before}, this one has {before}")
    pruned, preserving = _apply(model, record.kept, record.ghost, None, rows=record.ghost_ranks)
    return PruneRecord(before, layer_tokens(model), record.ghost, preserving, record.kept, record.ghost_ranks, pruned)


def prune_pattention(
    layer: Pattention,
    num_tokens: int,
    scores: torch.Tensor | None = None,
    *,
    ghost: bool | None = None,
    ghost_rank: int | None = None,
) -> torch.Tensor:
    """Prune one Pattention to ``num_tokens`` tokens in place; returns the kept indices.

    As :func:`prune` does for a whole model (``scores``: one per token, default ``||k|| * ||v||``;
    ``ghost`` on by default for ``l2_norm_gelu``). A Pattention inside a model is pruned with
    :func:`prune`, which also records the new shapes in the model's config.
    """
    if not isinstance(layer, Pattention):
        raise ValueError(f"prune_pattention takes a Pattention, got {type(layer).__name__}")
    ghost = _check_ghost_options("pattention", layer.norm, ghost, ghost_rank)
    current = layer.num_tokens
    if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or not 1 <= num_tokens <= current:
        raise ValueError(
            f"prune_pattention num_tokens={num_tokens!r} is invalid for a layer of {current} tokens; "
            f"allowed: an integer from 1 to {current} (grow adds tokens)"
        )
    kept = select_tokens(_module_scores(layer, "layer", None if scores is None else {"layer": scores}), num_tokens)
    _prune_pattention(layer, kept, ghost, ghost_rank, None, "layer")
    return kept


def prune_optimizer_state(optimizer: torch.optim.Optimizer, record: PruneRecord) -> int:
    """Cut every per-parameter state tensor (AdamW moments, ...) of a pruned parameter alike:
    kept tokens keep their moments; scalar state such as the step count is kept. Returns how
    many tensors were cut."""
    cut = 0
    for pruned in record.pruned:
        state = optimizer.state.get(pruned.param)
        if not state:
            continue
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() == pruned.param.dim() and value.shape != pruned.param.shape:
                state[key] = value.index_select(pruned.dim, pruned.kept.to(value.device))
                cut += 1
    return cut
