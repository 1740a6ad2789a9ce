"""Parameter and FLOP accounting from the config alone (no model is built).

FLOPs count matrix multiplications (2 per multiply-add), the convention of Kaplan et al. and
PaLM: a weight matrix costs ``2 * params`` per token forward; the tied output head costs
``2 * d * vocab``; token-token attention costs ``2 * 2 * seq_len * d`` per token per layer
(``QK^T`` and ``AV`` over the full context, not halved for the causal mask, as in PaLM's MFU).
Backward costs twice the forward, so training is 3x forward. The Pattention normalisation and
GeLU are elementwise and not counted. A pruned Pattention's ghost factor (a buffer, not a
parameter) costs ``2 * rank * d`` per token like a weight matrix of that size.

A sparse memory (``memory_layers``) is counted for what a token computes, not for every
parameter token it holds: per table and head, the sub-key scores (``2 * sub_keys * d``: both
halves of width ``d / 2``), the ``k' * k'`` candidate sums (``k' = min(top_k, sub_keys)``, one
addition each) and the weighted sum of the ``top_k`` gathered values (``2 * top_k * d``). The
top-k selections are comparisons, not counted. Its *active* parameters are those a token reads:
the sub-keys, ``top_k`` values per head and the query's batch norm.
"""

from __future__ import annotations

from typing import Any

# The counts read config fields only (a BlockConfig, TokenformerConfig or VisionConfig): this
# module imports no config or model module, so every model module can count with it.
BlockConfig = TokenformerConfig = VisionConfig = Any


def _block_weights(config: BlockConfig, layer: int) -> int:
    """Weights of a block's projections and FFN (its memory aside)."""
    d = config.d_model
    tokens = config.tokens(layer)
    ffn = 0 if _memory_replaces_ffn(config, layer) else tokens["ffn"]
    if config.projection == "pattention":
        # Each Pattention holds n keys of width d and n values of width d.
        return 2 * d * (3 * tokens["qkv"] + tokens["proj"] + ffn)
    return 4 * d * d + 2 * d * ffn


def _memory_replaces_ffn(config: BlockConfig, layer: int) -> bool:
    return layer in config.memory_layers and config.memory_position == "replace"


def memory_parameters(config: BlockConfig, active: bool = False) -> int:
    """Trainable parameters of every sparse memory; ``active``: those one token reads."""
    d, heads, k = config.d_model, config.memory_heads, config.memory_top_k
    norm = 2 * d if config.memory_query_norm == "batch" else 0
    per_layer = sum(heads * s * d + heads * (k if active else s * s) * d + norm for s in config.memory_tables)
    return per_layer * len(config.memory_layers)


def memory_flops_per_token(config: BlockConfig) -> int:
    """Forward FLOPs of every sparse memory for one token (see the module docstring)."""
    d, heads, k = config.d_model, config.memory_heads, config.memory_top_k
    per_layer = sum(heads * (2 * s * d + min(k, s) ** 2 + 2 * k * d) for s in config.memory_tables)
    return per_layer * len(config.memory_layers)


def block_parameters(config: BlockConfig, active: bool = False) -> int:
    """Weights of all transformer blocks (their LayerNorms have none), sparse memories included
    (``active``: only what one token reads of them)."""
    return sum(_block_weights(config, i) for i in range(config.n_layers)) + memory_parameters(config, active)


def ghost_weights(config: BlockConfig) -> int:
    """Entries of every ghost factor of a pruned model (buffers: not trained, but multiplied)."""
    ghosts = getattr(config, "ghost_ranks", None) or []
    return sum(rank * config.d_model for layer in ghosts for rank in layer.values())


def count_parameters(config: TokenformerConfig, non_embedding: bool = False, active: bool = False) -> int:
    """Trainable parameters; ``non_embedding`` leaves out the (tied) word embedding; ``active``
    counts of a sparse memory only what one token reads (without a memory: all of them)."""
    blocks = block_parameters(config, active)
    final_norm = 2 * config.d_model
    embedding = 0 if non_embedding else config.vocab_size * config.d_model
    return blocks + final_norm + embedding


def forward_flops_per_token(config: TokenformerConfig, seq_len: int | None = None) -> int:
    seq_len = config.max_seq_len if seq_len is None else seq_len
    if seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    weights = block_parameters(config) - memory_parameters(config) + ghost_weights(config)
    head = config.d_model * config.vocab_size
    attention = 2 * 2 * seq_len * config.d_model * config.n_layers
    return 2 * (weights + head) + attention + memory_flops_per_token(config)


def training_flops_per_token(config: TokenformerConfig, seq_len: int | None = None) -> int:
    """Forward + backward FLOPs per trained token."""
    return 3 * forward_flops_per_token(config, seq_len)


def training_flops(config: TokenformerConfig, tokens: int, seq_len: int | None = None) -> int:
    """FLOPs to train ``config`` on ``tokens`` tokens of sequences of ``seq_len``."""
    return tokens * training_flops_per_token(config, seq_len)


def count_vision_parameters(config: VisionConfig) -> int:
    """Trainable parameters of a ``TokenformerViT`` built from ``config``."""
    d = config.d_model
    if config.projection == "pattention":
        patch = config.patch_tokens * (config.patch_dim + d)
        head = config.head_tokens * (d + config.num_classes)
    else:
        patch = config.patch_dim * d
        head = d * config.num_classes
    class_token = d if config.pool == "cls" else 0
    temperatures = config.n_layers if config.lsa else 0
    return patch + class_token + config.seq_len * d + block_parameters(config) + temperatures + 2 * d + head


def training_flops_per_image(config: VisionConfig) -> int:
    """Forward + backward FLOPs per image, by the conventions of :mod:`tokenformer.flops`: every
    token of the sequence passes the block weights and attends to the whole sequence; the patch
    projection runs once per patch and the head once per image."""
    d, n = config.d_model, config.seq_len
    patch_weights = (
        config.patch_tokens * (config.patch_dim + d) if config.projection == "pattention" else config.patch_dim * d
    )
    head_weights = (
        config.head_tokens * (d + config.num_classes) if config.projection == "pattention" else d * config.num_classes
    )
    weights = block_parameters(config) - memory_parameters(config) + ghost_weights(config)
    blocks = n * (2 * weights + memory_flops_per_token(config) + 2 * 2 * n * d * config.n_layers)
    return 3 * (blocks + 2 * patch_weights * config.num_patches + 2 * head_weights)
