"""int8 weights for inference: :func:`quantize_int8` stores every Pattention's key and value tokens
(and every bias-free Linear's weight) as int8, one float scale per row.

Decoding reads every weight once per new token, so its speed follows the bytes the weights take:
int8 takes a quarter of float32's. A quantized Pattention computes::

    A = X @ (Kq * sk)^T          # Kq [n, d_in] int8, sk [n]: one scale per key token
    S = theta(A)                 # the layer's normalisation, unchanged (in float)
    out = S @ (Vq^T * sv)^T      # Vq^T [d_out, n] int8, sv [d_out]: one scale per output feature

On the CPU both products run in ``torch.ops.aten._weight_int8pack_mm`` (int8 weights, bfloat16
activations); elsewhere, and for widths that kernel cannot take, the weights are converted on the
fly (the same function, no faster). ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear})``
finds no Linear in a TokenFormer: its projections are Pattentions.

A quantized model is for inference: it is neither trained nor saved (quantize after loading).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .pattention import Pattention, huge_page_copy, normalise_scores

# _weight_int8pack_mm reads its reduction dimension in blocks of 16; other widths give garbage.
_PACK_BLOCK = 16


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: ``weight [rows, cols]`` as int8 with one float32 scale per row, ``weight ~ q * scale[:, None]``
    (symmetric, the largest magnitude of each row at 127). On the CPU ``q`` lies on huge pages,
    where decoding streams it faster (:func:`tokenformer.pattention.huge_page_copy`)."""
    weight = weight.detach().float().contiguous()
    scale = weight.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    q = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return (huge_page_copy(q) if q.device.type == "cpu" else q), scale


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, q * scale[:, None])`` for int8 ``q [out, in]``, in ``x``'s dtype."""
    lead, width = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, width)
    if x.device.type == "cpu" and width % _PACK_BLOCK == 0:
        out = torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16).contiguous(), q, scale.to(torch.bfloat16))
    else:
        out = F.linear(flat, q.to(x.dtype)) * scale.to(x.dtype)
    return out.to(x.dtype).view(*lead, q.shape[0])


class Int8Pattention(nn.Module):
    """A :class:`Pattention` with int8 key and value tokens (see the module's formula); the same
    normalisation, ``tau`` and ghost."""

    def __init__(self, layer: Pattention) -> None:
        super().__init__()
        if layer.split:
            raise ValueError(
                f"int8 Pattentions have one normalisation; this layer normalises its tokens from {layer.split} on "
                "apart (grown with normalisation='separate'); allowed: layers without a split"
            )
        self.in_features, self.out_features, self.num_tokens = layer.in_features, layer.out_features, layer.num_tokens
        self.norm = layer.norm
        for name, weight in (("key", layer.key_param_tokens), ("value", layer.value_param_tokens.T)):
            q, scale = quantize_rows(weight)
            self.register_buffer(f"{name}_tokens_int8", q)
            self.register_buffer(f"{name}_scales", scale)
        self.register_buffer("tau", layer.tau.detach().clone())
        self.register_buffer("ghost", None if layer.ghost is None else layer.ghost.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = int8_linear(x, self.key_tokens_int8, self.key_scales)
        ghost_scores = None if self.ghost is None else F.linear(x, self.ghost.to(x.dtype))
        probs = normalise_scores(scores, self.norm, self.tau, ghost_scores)
        return int8_linear(probs, self.value_tokens_int8, self.value_scales)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, num_tokens={self.num_tokens}"


class Int8Linear(nn.Module):
    """A bias-free ``nn.Linear`` with an int8 weight, one scale per output feature."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        q, scale = quantize_rows(layer.weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scales", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight_int8, self.weight_scales)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _quantized(module: nn.Module) -> nn.Module | None:
    if type(module) is Pattention:
        return Int8Pattention(module)
    if type(module) is nn.Linear and module.bias is None:
        return Int8Linear(module)
    return None


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every Pattention and bias-free Linear of ``model`` by its int8 version, in place;
    returns ``model``. The embedding and the (tied) output head stay as they are."""
    found = [(name, new) for name, module in model.named_modules() if (new := _quantized(module)) is not None]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no Pattention or bias-free Linear to quantize "
            "(quantized already, or wrapped by an adapter: merge it first)"
        )
    for name, new in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model


def check_savable(model: nn.Module) -> None:
    """Refuse a quantized model where weights are saved: its int8 tensors fit no config."""
    quantized = [name for name, m in model.named_modules() if isinstance(m, (Int8Pattention, Int8Linear))]
    if quantized:
        raise ValueError(
            f"{type(model).__name__} holds int8 weights ({quantized[0]}, ...): a quantized model is not saved; "
            "save it before quantize_int8 and quantize after loading"
        )
