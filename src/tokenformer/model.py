"""The TokenFormer causal language model, exactly as released.

Per layer, pre-norm, two residuals, no biases, no dropout::

    h = x + Proj(CausalSelfAttention(Q(LN(x)), K(LN(x)), V(LN(x))))
    y = h + FFN(LN(h))

Q, K, V, Proj and FFN are five Pattentions; ``LN`` has no weight or bias; the final norm is an
ordinary LayerNorm; rotary embeddings (GPT-NeoX rotate-half) cover the first ``rotary_pct`` of
each head's dims; the output head is the transposed word embedding. ``projection="linear"``
gives the standard Transformer with the same code path (bias-free Linear Q/K/V/O, a
Linear-GELU-Linear MLP of hidden width ``ffn_tokens``).

The layers in ``memory_layers`` (none by default) add a sparse memory read from ``LN(h)``, beside
the FFN or in its place (:mod:`tokenformer.sparse_pattention`, docs/sparse-memory.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .config import BlockConfig, TokenformerConfig
from .pattention import Pattention, reuse_tokens, reused_concat, reused_weight, run_pattentions
from .sparse_pattention import SparseMemory, SparsePattention


def make_projection(
    config: BlockConfig,
    kind: str,
    num_tokens: int,
    writes_residual: bool,
    in_features: int | None = None,
    out_features: int | None = None,
) -> nn.Module:
    """A projection (``d_model -> d_model`` unless given): a Pattention of token ``kind``
    (initialised as ``config.pattention_init`` says), or a bias-free Linear for the baseline
    (initialised as ``config.linear_init_std`` says for a layer that does or does not write into
    the residual stream)."""
    in_features = config.d_model if in_features is None else in_features
    out_features = config.d_model if out_features is None else out_features
    if config.projection == "pattention":
        init = config.pattention_init(kind, num_tokens)
        return Pattention(in_features, out_features, num_tokens, config.norm, **init)
    return _linear(in_features, out_features, config.linear_init_std(writes_residual))


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``; a plain bias-free Linear reads its weight through :func:`reused_weight` (kept in
    its decoding layout during generation). A Linear wrapped by an adapter runs as itself."""
    if type(layer) is nn.Linear and layer.bias is None:
        return F.linear(x, reused_weight(layer.weight))
    return layer(x)


def _linear(in_features: int, out_features: int, std: float) -> nn.Linear:
    linear = nn.Linear(in_features, out_features, bias=False)
    nn.init.normal_(linear.weight, std=std)
    return linear


class MLP(nn.Module):
    """The baseline's feed-forward block: Linear -> GELU -> Linear, no biases."""

    def __init__(self, config: BlockConfig, hidden: int) -> None:
        super().__init__()
        self.fc1 = _linear(config.d_model, hidden, config.linear_init_std(writes_residual=False))
        self.fc2 = _linear(hidden, config.d_model, config.linear_init_std(writes_residual=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.fc2, F.gelu(linear(self.fc1, x)))


def make_ffn(config: BlockConfig, num_tokens: int) -> nn.Module:
    # With Pattention the FFN is a single Pattention: its GeLU is the only non-linearity.
    if config.projection == "pattention":
        return make_projection(config, "ffn", num_tokens, writes_residual=True)
    return MLP(config, num_tokens)


def make_memory_table(config: BlockConfig, sub_keys: int, value_std: float | None = None) -> SparsePattention:
    """A table of a layer's sparse memory with ``sub_keys`` sub-keys per half, initialised as an FFN
    Pattention of ``memory_top_k`` tokens (``value_std`` overrides its value std)."""
    init = config.pattention_init("ffn", config.memory_top_k)
    if value_std is not None:
        init["value_std"] = value_std
    return SparsePattention(
        config.d_model,
        config.d_model,
        sub_keys,
        config.memory_top_k,
        config.memory_heads,
        config.norm,
        query_norm=config.memory_query_norm,
        **init,
    )


def make_memory(config: BlockConfig, layer: int) -> SparseMemory | None:
    """The sparse memory of ``layer`` (one table per entry of ``memory_sub_keys``), or None."""
    if not config.has_memory(layer):
        return None
    return SparseMemory(make_memory_table(config, sub_keys) for sub_keys in config.memory_tables)


def rotary_cos_sin(
    config: TokenformerConfig, positions: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[..., T, rotary_dims]`` for the given absolute positions ``[..., T]``."""
    dims = config.rotary_dims
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = config.rope_base ** (-torch.arange(0, dims, 2, device=positions.device, dtype=compute) / dims)
    freqs = positions.to(compute)[..., None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # NeoX rotate-half: the angle table repeats after half of the rotary dims, so the pairs are
    # (i, i + half) and only the first half of cos/sin is needed.
    half = cos.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    first, second = x[..., :half], x[..., half : 2 * half]
    out = x.clone()  # keeps x's memory layout: the heads stay a view of [B, T, H, head_dim]
    out[..., :half] = torch.addcmul(first * c, second, s, value=-1)
    out[..., half : 2 * half] = torch.addcmul(second * c, first, s)
    return out


class _Rotary(torch.autograd.Function):
    """A rotation is orthogonal: its gradient is the rotation by the opposite angles. Spelled
    out, backward needs no zero-filled slice gradients and no concatenations."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of ``x [B, H, T, head_dim]`` (NeoX rotate-half); the
    tables are ``[T, dims]``, or ``[B, 1, T, dims]`` for positions that differ between rows."""
    if cos.shape[-1] == 0:
        return x
    if not (torch.is_grad_enabled() and x.requires_grad):  # decoding: no autograd bookkeeping
        return _rotate(x, cos, sin)
    return _Rotary.apply(x, cos, sin)


class KVCache:
    """Keys and values of the token-token attention, per layer, for incremental decoding.

    Parameter tokens are weights, so only the ``[B, H, T, head_dim]`` keys and values of the
    input tokens are cached. The buffers grow with the tokens (doubling, from ``CHUNK`` slots)
    up to ``max_len``, so a long request takes memory as its text is produced, never up front.
    """

    CHUNK = 256

    def __init__(self, n_layers: int, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"the KV cache holds at most max_len={self.max_len} tokens; {end} were given")
        self.keys[layer] = self._room(self.keys[layer], k, end)
        self.values[layer] = self._room(self.values[layer], v, end)
        self.keys[layer].narrow(2, self.length, k.shape[2]).copy_(k)
        self.values[layer].narrow(2, self.length, v.shape[2]).copy_(v)
        return self.keys[layer].narrow(2, 0, end), self.values[layer].narrow(2, 0, end)

    def _room(self, buffer: torch.Tensor | None, new: torch.Tensor, end: int) -> torch.Tensor:
        """``buffer``, or a larger copy of its cached slots, with room for ``end`` tokens."""
        capacity = 0 if buffer is None else buffer.shape[2]
        if end <= capacity:
            return buffer
        size = min(self.max_len, max(end, 2 * capacity, self.CHUNK))
        grown = new.new_zeros((new.shape[0], new.shape[1], size, new.shape[3]))
        if buffer is not None:
            grown[:, :, : self.length] = buffer[:, :, : self.length]
        return grown


def tracing() -> bool:
    """Whether torch.compile, torch.export or TorchScript is tracing: code that branches on a tensor's
    values would fix the branch taken for every later input."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position ``[B, S]`` of every slot of a padded batch (``attention_mask`` 1 for a token, 0
    for padding): each row's tokens count from 0; padding takes its preceding token's position, or 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def padding_allowed(attention_mask: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Which keys the queries at slots ``start .. start + length - 1`` attend to, as the boolean
    ``attn_mask [B, 1, length, start + length]`` of ``scaled_dot_product_attention``: the tokens at
    or before their own slot. A padding query sees itself too, so that no softmax row is empty (its
    output is never used)."""
    slots = torch.arange(start + length, device=attention_mask.device)
    rows = torch.arange(start, start + length, device=attention_mask.device)[:, None]
    tokens = attention_mask.bool()[:, None, None, :]
    return ((slots <= rows) & tokens) | (slots == rows)


class SelfAttention(nn.Module):
    """Multi-head causal token-token attention with rotary positions and a KV cache.

    :meth:`attend` is the token-token step; a subclass changes only it (the vision model's
    bidirectional attention does).
    """

    def __init__(self, config: BlockConfig, tokens: dict[str, int]) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.query = make_projection(config, "qkv", tokens["qkv"], writes_residual=False)
        self.key = make_projection(config, "qkv", tokens["qkv"], writes_residual=False)
        self.value = make_projection(config, "qkv", tokens["qkv"], writes_residual=False)
        self.proj = make_projection(config, "proj", tokens["proj"], writes_residual=True)

    def _qkv(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Query, key and value of ``x``. Three Pattentions run as one group: one score product over
        their concatenated key tokens and one batched value product (see ``pattention_group``);
        three Linears as one product with their concatenated weights. Each keeps its own
        parameters, so state dicts, growth and conversion see three layers."""
        layers = (self.query, self.key, self.value)
        if all(isinstance(layer, Pattention) for layer in layers):
            return run_pattentions(layers, x)
        if all(type(layer) is nn.Linear for layer in layers):
            weights = [layer.weight for layer in layers]
            return list(F.linear(x, reused_concat(weights)).split([w.shape[0] for w in weights], dim=-1))
        return [layer(x) for layer in layers]

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, allowed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``softmax(q k^T / sqrt(head_dim)) v`` over ``[B, H, T, head_dim]`` heads, causal: query
        ``i`` (at absolute position ``start + i``) sees keys up to its own position. ``allowed``
        (boolean, broadcastable to the scores) is the mask of a padded batch, causal already
        (:func:`padding_allowed`)."""
        if allowed is not None:
            if allowed.is_floating_point():  # an additive mask: in the scores' dtype
                allowed = allowed.to(q.dtype)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        length = q.shape[2]
        if start == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if length == 1:  # one new token sees every cached one
            return F.scaled_dot_product_attention(q, k, v)
        rows = torch.arange(start, start + length, device=q.device)[:, None]
        mask = torch.arange(start + length, device=q.device)[None, :] <= rows
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        allowed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``allowed``: the mask of a padded batch, passed on to :meth:`attend`."""
        batch, length, d_model = x.shape
        q, k, v = (self._heads(t) for t in self._qkv(x))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.update(layer, k, v)
            if k.shape[2] != start + length:  # a static cache (transformers'): its later slots are empty
                k, v = k.narrow(2, 0, start + length), v.narrow(2, 0, start + length)
        y = self.attend(q, k, v, start, allowed)
        return linear(self.proj, y.transpose(1, 2).reshape(batch, length, d_model))


class Block(nn.Module):
    """``h = x + Proj(Attention(LN(x))); y = h + FFN(LN(h))``; ``attention(config, tokens)``
    builds the attention (by default the language model's causal :class:`SelfAttention`). A
    memory layer adds ``Memory(LN(h))`` to ``y`` (``memory``; ``mlp`` is None where it replaces
    the FFN)."""

    # Which modules of a block hold each kind of parameter tokens (growth, pruning and the
    # released layout all address them by these names).
    KIND_MODULES: dict[str, tuple[str, ...]] = {
        "qkv": ("attention.query", "attention.key", "attention.value"),
        "proj": ("attention.proj",),
        "ffn": ("mlp",),
    }

    def __init__(
        self,
        config: BlockConfig,
        layer: int,
        attention: Callable[[BlockConfig, dict[str, int]], SelfAttention] = SelfAttention,
    ) -> None:
        super().__init__()
        tokens = config.tokens(layer)
        self.layer = layer
        self.width, self.eps = config.d_model, config.layernorm_eps
        self.attention = attention(config, tokens)
        # A sparse memory beside the FFN, or in its place (then the layer has no FFN: mlp is None).
        self.memory = make_memory(config, layer)
        replaced = self.memory is not None and config.memory_position == "replace"
        self.mlp = None if replaced else make_ffn(config, tokens["ffn"])
        for name, rank in config.ghosts(layer).items():  # a pruned model's ghosts (filled by its state dict)
            module = dict(self.pattentions()).get(name)
            if module is None:
                raise ValueError(
                    f"config field ghost_ranks[{layer}] names {name!r}, not a Pattention of a block; "
                    f"allowed: {', '.join(n for names in self.KIND_MODULES.values() for n in names)}"
                )
            module.set_ghost(module.key_param_tokens.new_zeros(rank, module.in_features))
        for name, split in config.splits(layer).items():  # separately normalised groups (tau from the state dict)
            module = dict(self.pattentions()).get(name)
            if module is None:
                raise ValueError(
                    f"config field norm_splits[{layer}] names {name!r}, not a Pattention of a block; "
                    f"allowed: {', '.join(n for names in self.KIND_MODULES.values() for n in names)}"
                )
            module.set_split(split, 1.0)
        # A torch.utils.checkpoint-style function, set by set_activation_checkpointing: with one,
        # backward recomputes this block's activations instead of keeping them from the forward pass.
        self.checkpoint_fn: Callable[..., torch.Tensor] | None = None

    def modules_of_kind(self, kind: str) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of every projection of token ``kind`` (qkv, proj or ffn) in this block
        (none of kind ffn where a memory replaces the FFN)."""
        modules = dict(self.named_modules())
        return [(name, modules[name]) for name in self.KIND_MODULES[kind] if name in modules]

    def pattentions(self) -> list[tuple[str, Pattention]]:
        """``(name, module)`` of every Pattention of this block, by name in the block."""
        found = [item for kind in self.KIND_MODULES for item in self.modules_of_kind(kind)]
        return [(name, module) for name, module in found if isinstance(module, Pattention)]

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # The release's in-block LayerNorm has no learnable weight or bias.
        # (Its width is the config's, a constant: traced for ONNX, a shape read from x would not be.)
        return F.layer_norm(x, (self.width,), eps=self.eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        allowed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # Not with a cache: recomputing the block would write its keys and values twice.
        if self.checkpoint_fn is not None and cache is None and torch.is_grad_enabled():
            return self.checkpoint_fn(self._forward, x, cos, sin, None, allowed)
        return self._forward(x, cos, sin, cache, allowed)

    def _forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        allowed: torch.Tensor | None,
    ) -> torch.Tensor:
        h = x + self.attention(self._norm(x), cos, sin, cache, self.layer, allowed)
        if self.memory is None:
            return h + self.mlp(self._norm(h))
        normed = self._norm(h)
        out = h + self.memory(normed)
        return out if self.mlp is None else out + self.mlp(normed)


def set_activation_checkpointing(
    model: nn.Module,
    enabled: bool = True,
    checkpoint_fn: Callable[..., torch.Tensor] | None = None,
    every_n_layers: int = 1,
) -> None:
    """Activation checkpointing of a model's transformer blocks: when gradients are recorded, each
    block keeps only its input for backward and runs its forward pass again there, trading one more
    forward pass of the blocks for the memory of their activations.

    ``checkpoint_fn`` defaults to ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``;
    ``every_n_layers`` checkpoints every n-th block only. Gradients are those without it.
    """
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no transformer blocks (tokenformer.model.Block) to checkpoint")
    if not isinstance(every_n_layers, int) or every_n_layers < 1:
        raise ValueError(f"every_n_layers must be a positive integer, got {every_n_layers!r}")
    if checkpoint_fn is None:
        checkpoint_fn = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    for i, block in enumerate(blocks):
        block.checkpoint_fn = checkpoint_fn if enabled and i % every_n_layers == 0 else None


class TokenformerLM(nn.Module):
    def __init__(self, config: TokenformerConfig) -> None:
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(self.new_block(i) for i in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.d_model, eps=config.layernorm_eps)
        nn.init.normal_(self.word_embeddings.weight, std=config.init_std)

    def new_block(self, layer: int) -> Block:
        """A freshly initialised block for position ``layer`` under ``self.config`` (depth growth
        builds new blocks with it)."""
        return Block(self.config, layer)

    def _check_input(self, input_ids: torch.Tensor, start: int) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                "input_ids must be an integer tensor of shape [batch, seq], "
                f"got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        end = start + input_ids.shape[1]
        if end > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {end} exceeds max_seq_len={self.config.max_seq_len}; "
                f"allowed: at most {self.config.max_seq_len} tokens (cached and new together)"
            )
        if input_ids.numel() and not tracing():
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.config.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(f"token id {bad} out of range; allowed: 0 <= id < vocab_size={self.config.vocab_size}")

    def _check_padding(
        self,
        input_ids: torch.Tensor,
        start: int,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> None:
        batch, length = input_ids.shape
        if attention_mask is not None and attention_mask.dim() == 4:
            rows, heads, queries, keys = attention_mask.shape
            if rows not in (1, batch) or heads != 1 or queries != length or keys < start + length:
                raise ValueError(
                    f"a 4-d attention_mask must have shape [batch, 1, new tokens, key slots >= cached + new tokens] "
                    f"= [{batch}, 1, {length}, >= {start + length}] (transformers' form: True or 0 where a token "
                    f"attends to a key, False or -inf where not), got {list(attention_mask.shape)}"
                )
        elif attention_mask is not None:
            expected = (batch, start + length)
            if tuple(attention_mask.shape) != expected or attention_mask.is_floating_point():
                raise ValueError(
                    f"attention_mask must be an integer or bool tensor of shape [batch, cached + new tokens] = "
                    f"{list(expected)} (1 for a token, 0 for padding), or transformers' 4-d mask, got "
                    f"{attention_mask.dtype} {list(attention_mask.shape)}"
                )
        if position_ids is not None and (
            position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != length
        ):
            raise ValueError(
                f"position_ids must have shape [batch, seq] = {[batch, length]} (or [1, seq]), "
                f"got {list(position_ids.shape)}"
            )

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        every_layer: bool = False,
    ) -> list[torch.Tensor]:
        """The final (normalised) hidden states ``[B, T, d_model]`` in a list; with ``every_layer``
        the input of every block first (``n_layers + 1`` tensors, as transformers'
        ``output_hidden_states``). The arguments are :meth:`forward`'s."""
        start = cache.length if cache is not None else 0
        self._check_input(input_ids, start)
        self._check_padding(input_ids, start, attention_mask, position_ids)
        length = input_ids.shape[1]
        allowed = None
        if attention_mask is not None and attention_mask.dim() == 4:
            # transformers' mask (a static cache's covers all its slots; those after the tokens are cut off)
            allowed = attention_mask[..., : start + length]
        elif attention_mask is not None:
            if position_ids is None:
                position_ids = positions_from_mask(attention_mask)[:, start:]
            # Without padding the mask changes nothing: the unmasked causal path is faster. Compiled or
            # exported code cannot look at the values, so it always takes the mask.
            if tracing() or not bool(attention_mask.all()):
                allowed = padding_allowed(attention_mask, start, length)
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device) + start
        cos, sin = rotary_cos_sin(self.config, position_ids, self.word_embeddings.weight.dtype)
        if cos.dim() == 3:  # positions per row: [B, T, dims] -> [B, 1, T, dims] against [B, H, T, head_dim]
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        x = self.word_embeddings(input_ids)
        states = []
        for block in self.layers:
            if every_layer:
                states.append(x)
            x = block(x, cos, sin, cache, allowed)
        if cache is not None:
            cache.length += length
        return [*states, self.final_norm(x)]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits of final hidden states: the output head is the word embedding (tied)."""
        embedding = self.word_embeddings
        if type(embedding) is nn.Embedding:
            return F.linear(hidden, reused_weight(embedding.weight))
        # An adapter wraps the embedding (LoRA): the tied head reads the rows the input reads.
        return F.linear(hidden, embedding(torch.arange(self.config.vocab_size, device=hidden.device)))

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, T, vocab]``; with ``targets`` (``-100`` ignored) also the mean cross-entropy.

        A batch of sequences of different lengths is padded and given ``attention_mask`` ``[B,
        cached + T]`` (1 for a token, 0 for padding, cached tokens included): padding on the left for
        generation, on the right for scoring (with ``-100`` targets there). Tokens then attend to
        the tokens of their own row only, and their positions (``position_ids [B, T]``, by default
        from the mask) count tokens, not padding: each row's logits are those of the row alone.
        """
        hidden = self.hidden_states(input_ids, cache=cache, attention_mask=attention_mask, position_ids=position_ids)
        logits = self.logits(hidden[-1])
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    def param_groups(self, weight_decay: float, token_weight_decay: float | None = None, **memory: float) -> list[dict]:
        """AdamW groups: matrices (embedding, parameter tokens, linears) decay; norms do not.
        ``token_weight_decay``: another decay for the parameter tokens; ``memory_lr_scale``,
        ``memory_weight_decay``: the sparse memories' values (see :func:`weight_decay_groups`)."""
        return weight_decay_groups(self, weight_decay, token_weight_decay=token_weight_decay, **memory)

    def next_logits(
        self, input_ids: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The logits ``[B, vocab]`` after the last of ``input_ids``, the cache extended by them: the
        output head, the largest product of a decoding step, runs for that position only."""
        hidden = self.hidden_states(input_ids, cache=cache, attention_mask=attention_mask)[-1]
        return self.logits(hidden[:, -1])

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Continue ``input_ids [B, T]`` by up to ``max_new_tokens`` tokens with a KV cache.

        ``temperature=0`` is greedy decoding. Rows that emit ``eos_token_id`` are padded with it;
        generation stops early once every row has. Prompts of different lengths are padded on the
        left with ``attention_mask`` (0 for padding); each row then continues as it would alone.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        check_sampling(temperature, top_k, top_p)
        total = input_ids.shape[-1] + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(
                f"prompt ({input_ids.shape[-1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                f"max_seq_len={self.config.max_seq_len}"
            )
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise ValueError(
                    f"attention_mask must have the prompt's shape {list(input_ids.shape)}, "
                    f"got {list(attention_mask.shape)}"
                )
            if not bool(attention_mask[:, -1].all()):
                raise ValueError(
                    "generate needs prompts padded on the left: the last position of every row must be a token "
                    "(attention_mask 1)"
                )
        # The weights do not change between new tokens: Pattention groups build their concatenated
        # tokens once.
        with reuse_tokens():
            cache = KVCache(self.config.n_layers, total)
            logits = self.next_logits(input_ids, cache, attention_mask)
            out = [input_ids]
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            for step in range(max_new_tokens):
                token = sample_next(logits, temperature, top_k, top_p, generator)
                if eos_token_id is not None:
                    token = torch.where(done, torch.full_like(token, eos_token_id), token)
                    done |= token == eos_token_id
                out.append(token[:, None])
                if step == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
                    break
                if attention_mask is not None:
                    attention_mask = torch.cat((attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)), 1)
                logits = self.next_logits(token[:, None], cache, attention_mask)
            return torch.cat(out, dim=1)


def weight_decay_groups(
    model: nn.Module,
    weight_decay: float,
    exclude: tuple[nn.Parameter, ...] = (),
    token_weight_decay: float | None = None,
    memory_lr_scale: float = 1.0,
    memory_weight_decay: float = 0.0,
) -> list[dict]:
    """AdamW groups: matrices decay; vectors (norms) and the parameters in ``exclude`` do not.

    With ``token_weight_decay`` the projection weights form a third group with that decay: the
    Pattention parameter tokens (keys and values, a sparse memory's sub-keys too), and for the
    Transformer baseline its Linear weights, their analogue. The value tokens of sparse memories
    (if any) form a group of their own, with ``memory_weight_decay`` (none by default: a token
    read by few inputs would be decayed at every step and trained at few) and ``lr_scale =
    memory_lr_scale``, the multiple of the schedule's learning rate the trainer gives them. Each
    group is named (``decay``, ``no_decay``, ``tokens``, ``memory``)."""
    skip = {id(p) for p in exclude}
    tokens, memory = set(), set()
    for m in model.modules():
        if isinstance(m, SparsePattention):
            memory.add(id(m.value_param_tokens))
            projection = (m.sub_key_tokens,)
        elif isinstance(m, Pattention):
            projection = (m.key_param_tokens, m.value_param_tokens)
        elif isinstance(m, nn.Linear):
            projection = (m.weight,)
        else:
            continue
        if token_weight_decay is not None:
            tokens |= {id(p) for p in projection}
    params = [p for p in model.parameters() if p.requires_grad]
    special = tokens | memory
    groups = [
        {
            "name": "decay",
            "params": [p for p in params if p.dim() >= 2 and id(p) not in skip and id(p) not in special],
            "weight_decay": weight_decay,
        },
        {"name": "no_decay", "params": [p for p in params if p.dim() < 2 or id(p) in skip], "weight_decay": 0.0},
    ]
    if token_weight_decay is not None:
        groups.append(
            {"name": "tokens", "params": [p for p in params if id(p) in tokens], "weight_decay": token_weight_decay}
        )
    if memory:
        groups.append(
            {
                "name": "memory",
                "params": [p for p in params if id(p) in memory],
                "weight_decay": memory_weight_decay,
                "lr_scale": memory_lr_scale,
            }
        )
    return groups


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p!r}")


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of ``logits [B, vocab]``: greedy, temperature, top-k and nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
