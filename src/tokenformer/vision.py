"""The TokenFormer vision classifier: a ViT whose every linear is a Pattention.

The paper's ImageNet models are ViTs with every projection replaced by Pattention,
weight-free LayerNorm inside blocks and a parametric final norm; the blocks here are the
language model's blocks with bidirectional attention::

    x = PatchProj(patches) + pos            # [B, N, d], a class token in front with pool="cls"
    x = Block(x) ...                        # h = x + Proj(Attn(QKV(LN(x)))); y = h + FFN(LN(h))
    logits = Head(FinalNorm(pool(x)))       # pool: the class token or the mean over patches

``PatchProj`` (``C * p * p -> d``) and ``Head`` (``d -> num_classes``) are Pattentions too, or
bias-free Linears with ``projection="linear"`` (the ViT baseline on the same code path).
Positions are a learned embedding, as in ViT; the blocks get no rotary embedding.

``patch_shift=s`` turns on shifted patch tokenization (Lee et al., 2021, "Vision Transformer for
Small-Size Datasets"): the image and its four copies shifted by ``s`` pixels along the diagonals
(zero-padded, i.e. the mean pixel after normalisation) are stacked as channels before cutting
patches, so every patch token also sees the pixels around its patch (``5 * C * p * p -> d``).

Note that an l2-normalised Pattention is blind to the scale of its input (``x`` and ``2x`` give
the same scores after normalisation), so the patch projection sees the pattern of a patch, not
its overall contrast; ``patch_bias=True`` adds a constant input that keeps it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import TOKEN_KINDS, BlockConfig
from .flops import count_vision_parameters
from .model import Block, SelfAttention, make_projection, weight_decay_groups
from .validation import check, check_choice, check_divides, check_positive_ints, is_int, is_number, lookup_preset

POOLS = ("cls", "mean")


@dataclass
class VisionConfig(BlockConfig):
    """Architecture of a TokenFormer ViT; the block fields are the language model's.

    The defaults are the B/16 shape (224x224 RGB, 16x16 patches, d 768, 12 layers, every token
    count d, FFN 4d). ``patch_tokens`` and ``head_tokens`` are the parameter-token counts of the
    patch projection and the classifier head (ignored by ``projection="linear"``). ``pool`` is
    ``"mean"`` by default: the paper trained with the MAE recipe, whose fine-tuning averages the
    patch tokens; ``"cls"`` adds ViT's class token. ``patch_shift`` (pixels, below
    ``patch_size``; 0 off) adds the four diagonally shifted copies of the image to every patch.
    ``drop_path`` is stochastic depth (Huang et al., 2016) in training: block ``i`` of ``L`` is
    skipped for a sample with probability ``drop_path * i / (L - 1)`` (the last block with
    ``drop_path``) and its residual update scaled up by the inverse keep rate otherwise; in
    evaluation every block runs. ``lsa`` turns on locality self-attention (Lee et al., 2021, with
    shifted patches in the same paper): no token attends to itself and every layer learns its
    attention temperature (one scalar per layer). ``patch_bias`` appends a constant input of 1 to
    every patch vector: the l2-normalised patch Pattention otherwise gives a patch and the same
    patch at any other contrast the same token (its scores ``x . k`` only scale with ``x``); with the
    constant input they are ``x . k + b`` (for the linear baseline it is the patch embedding's bias).
    """

    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    num_classes: int = 1000
    pool: str = "mean"
    patch_tokens: int = 768
    head_tokens: int = 768
    patch_shift: int = 0
    drop_path: float = 0.0
    lsa: bool = False
    patch_bias: bool = False

    # The init fields (tau_scale, ...) also address the patch projection and the head.
    INIT_KINDS: ClassVar[tuple[str, ...]] = (*TOKEN_KINDS, "patch", "head")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(
            self, ("image_size", "patch_size", "in_channels", "num_classes", "patch_tokens", "head_tokens")
        )
        check_divides(self, "patch_size", "image_size")
        check_choice(self, "pool", POOLS)
        check(
            self,
            "patch_shift",
            lambda v: is_int(v) and 0 <= v < self.patch_size,
            f"an integer number of pixels from 0 (off) to patch_size - 1 = {self.patch_size - 1}",
        )
        check(self, "drop_path", lambda v: is_number(v) and 0 <= v < 1, "a probability in [0, 1)")
        check(self, "lsa", lambda v: isinstance(v, bool), "true or false")
        check(self, "patch_bias", lambda v: isinstance(v, bool), "true or false")

    def drop_rates(self) -> list[float]:
        """Stochastic-depth rate of each block: 0 for the first, rising linearly to ``drop_path``."""
        last = max(self.n_layers - 1, 1)
        return [self.drop_path * i / last for i in range(self.n_layers)]

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        """Values per patch token: ``C * p * p``, five times that with ``patch_shift``, one more with ``patch_bias``."""
        views = 5 if self.patch_shift else 1
        return views * self.in_channels * self.patch_size**2 + self.patch_bias

    @property
    def seq_len(self) -> int:
        """Tokens per image: the patches and, with ``pool="cls"``, the class token."""
        return self.num_patches + (self.pool == "cls")

    def parameter_matched_linear(self) -> VisionConfig:
        """The ``projection="linear"`` ViT with (almost) the same number of parameters.

        Blocks, patch projection and head all differ between the two; the MLP hidden width of
        the baseline absorbs the whole difference.
        """
        if self.layer_tokens is not None:
            raise ValueError("parameter_matched_linear needs uniform token counts (layer_tokens=None)")
        per_hidden_unit = 2 * self.d_model * self.n_layers
        without_mlp = count_vision_parameters(self.replace(projection="linear", ffn_tokens=1)) - per_hidden_unit
        hidden = round((count_vision_parameters(self) - without_mlp) / per_hidden_unit)
        if hidden < 1:
            raise ValueError(f"token counts too small to match with a linear ViT of d_model={self.d_model}")
        return self.replace(projection="linear", ffn_tokens=hidden)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> VisionConfig:
        return cls(**{**lookup_preset(VISION_PRESETS, name), **overrides})


def _small(image_size: int, patch_size: int, in_channels: int, n_layers: int, d: int, n_heads: int) -> dict[str, Any]:
    # Every token count d and FFN 4d, the released ratios.
    return dict(
        image_size=image_size,
        patch_size=patch_size,
        in_channels=in_channels,
        num_classes=10,
        n_layers=n_layers,
        d_model=d,
        n_heads=n_heads,
        qkv_tokens=d,
        proj_tokens=d,
        ffn_tokens=4 * d,
        patch_tokens=d,
        head_tokens=d,
    )


VISION_PRESETS: dict[str, dict[str, Any]] = {
    # Fashion-MNIST (28x28 grey, 10 classes): 16 patches of 7x7, or 49 of 4x4.
    "fmnist-0.3M": _small(28, 7, 1, 4, 64, 4),
    "fmnist-1M": _small(28, 4, 1, 4, 128, 4),
    # CIFAR-10 (32x32 RGB, 10 classes): 64 patches of 4x4.
    "cifar-1M": _small(32, 4, 3, 4, 128, 4),
}


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, N, C * p * p]``, patches in raster order, channel-major inside a patch."""
    batch, channels, height, width = images.shape
    p = patch_size
    patches = images.reshape(batch, channels, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // p) * (width // p), channels * p * p)


def shifted_views(images: torch.Tensor, shift: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, 5C, H, W]``: the image, then its copies moved by ``shift`` pixels
    towards the top-left, top-right, bottom-left and bottom-right, zero where they leave the frame."""
    height, width = images.shape[-2:]
    padded = F.pad(images, (shift, shift, shift, shift))
    # Moved towards the top-left, a view shows at (i, j) the pixel (i + shift, j + shift), which
    # sits at (i + 2 * shift, j + 2 * shift) of the padded image.
    corners = ((2 * shift, 2 * shift), (2 * shift, 0), (0, 2 * shift), (0, 0))
    views = [padded[..., top : top + height, left : left + width] for top, left in corners]
    return torch.cat([images, *views], dim=1)


# On CPU, PyTorch's fused attention kernels cost more than the plain softmax(QK^T)V for the short
# sequences of small images (benchmarks/results/attention-cpu*.md measure where they cross): up
# to this length the CPU takes the explicit form.
EXPLICIT_ATTENTION_MAX_LEN = 49


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(head_dim)) v`` computed step by step; ``allowed`` (boolean,
    broadcastable to the scores) masks out the False pairs, as ``scaled_dot_product_attention``'s
    boolean ``attn_mask`` does. The softmax runs in at least float32 (as SDPA's CPU kernels accumulate),
    under bf16 autocast too."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype) @ v


def bidirectional_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention without a causal mask: the explicit form for short sequences on CPU, else SDPA."""
    if q.device.type == "cpu" and k.shape[-2] <= EXPLICIT_ATTENTION_MAX_LEN:
        return explicit_attention(q, k, v, allowed)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


class BidirectionalAttention(SelfAttention):
    """Every patch token attends to every other (no causal mask, no cache).

    ``locality=True`` is locality self-attention (Lee et al., 2021): a token does not attend to
    itself, and the softmax temperature is learned, as ``log_temperature`` (a scalar added to
    the log of the usual 1/sqrt(head_dim) scale, starting at 0).
    """

    def __init__(self, config: BlockConfig, tokens: dict[str, int], locality: bool = False) -> None:
        super().__init__(config, tokens)
        self.log_temperature = nn.Parameter(torch.zeros(())) if locality else None

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, allowed: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.log_temperature is not None:
            q = q * self.log_temperature.exp().to(q.dtype)
            others = ~torch.eye(q.shape[2], dtype=torch.bool, device=q.device)
            allowed = others if allowed is None else allowed & others
        return bidirectional_attention(q, k, v, allowed)


def drop_path(update: torch.Tensor, rate: float) -> torch.Tensor:
    """Stochastic depth on a residual update ``[B, ...]``: zero for each sample with probability
    ``rate``, divided by ``1 - rate`` otherwise (the expectation is unchanged)."""
    keep = torch.rand(update.shape[0], *(1,) * (update.dim() - 1), device=update.device) >= rate
    return update * keep.to(update.dtype) / (1 - rate)


class TokenformerViT(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.patch_proj = make_projection(
            config, "patch", config.patch_tokens, writes_residual=False, in_features=config.patch_dim, out_features=d
        )
        self.cls_token = nn.Parameter(torch.empty(1, 1, d)) if config.pool == "cls" else None
        self.pos_embedding = nn.Parameter(torch.empty(1, config.seq_len, d))
        self.layers = nn.ModuleList(self.new_block(i) for i in range(config.n_layers))
        self.final_norm = nn.LayerNorm(d, eps=config.layernorm_eps)
        self.head = make_projection(
            config, "head", config.head_tokens, writes_residual=False, in_features=d, out_features=config.num_classes
        )
        nn.init.normal_(self.pos_embedding, std=config.init_std)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=config.init_std)

    def new_block(self, layer: int) -> Block:
        """A freshly initialised block for position ``layer`` under ``self.config`` (depth growth
        builds new blocks with it)."""
        return Block(self.config, layer, functools.partial(BidirectionalAttention, locality=self.config.lsa))

    def _check_input(self, images: torch.Tensor) -> None:
        c = self.config
        expected = (c.in_channels, c.image_size, c.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected or not images.is_floating_point():
            raise ValueError(
                f"images must be a float tensor of shape [batch, {', '.join(map(str, expected))}] "
                f"(config in_channels, image_size, image_size), got {images.dtype} {tuple(images.shape)}"
            )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The last block's output ``[B, seq_len, d]`` (class token first with ``pool="cls"``)."""
        self._check_input(images)
        if self.config.patch_shift:
            images = shifted_views(images, self.config.patch_shift)
        patches = patchify(images, self.config.patch_size)
        if self.config.patch_bias:
            patches = torch.cat((patches, patches.new_ones(*patches.shape[:-1], 1)), dim=-1)
        x = self.patch_proj(patches)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        x = x + self.pos_embedding
        # Zero-width rotary tables: apply_rotary is then the identity (positions are learned).
        no_rotary = x.new_empty(x.shape[1], 0)
        rates = self.config.drop_rates() if self.training and self.config.drop_path else None
        for i, block in enumerate(self.layers):
            if rates is None or rates[i] == 0:
                x = block(x, no_rotary, no_rotary)
            else:
                x = x + drop_path(block(x, no_rotary, no_rotary) - x, rates[i])
        return x

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, num_classes]``; with ``labels`` also the mean cross-entropy."""
        x = self.features(images)
        pooled = x[:, 0] if self.config.pool == "cls" else x.mean(dim=1)
        logits = self.head(self.final_norm(pooled))
        if labels is None:
            return logits
        return logits, F.cross_entropy(logits.float(), labels)

    def param_groups(self, weight_decay: float, token_weight_decay: float | None = None, **memory: float) -> list[dict]:
        """AdamW groups: matrices decay; norms, the position embedding and the class token do not (as in ViT).
        ``token_weight_decay``: another decay for the parameter tokens; ``memory_lr_scale``,
        ``memory_weight_decay``: the sparse memories' values (see :func:`weight_decay_groups`)."""
        exclude = (self.pos_embedding,) if self.cls_token is None else (self.pos_embedding, self.cls_token)
        return weight_decay_groups(self, weight_decay, exclude, token_weight_decay, **memory)
