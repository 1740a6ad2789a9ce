"""The released forward pass written out plainly in float64, for tests to compare against.

Written from the facts of the paper and release, sharing no code with the package: one
sequence at a time, rotary positions applied pair by pair by hand. Weights come in a neutral
form, so the same reference checks our key layout and the released one.
"""

import math

import torch

# Neutral name -> module path below a layer (the same in both layouts).
LAYER_MODULES = {
    "query": "attention.query",
    "key": "attention.key",
    "value": "attention.value",
    "proj": "attention.proj",
    "ffn": "mlp",
}
KIND = {"query": "qkv", "key": "qkv", "value": "qkv", "proj": "proj", "ffn": "ffn"}


def random_released_state_dict(vocab_size: int, d_model: int, layer_tokens: list, device=None) -> dict:
    """A state dict in the released key layout with random weights (``layer_tokens``: one
    ``{"qkv", "proj", "ffn"}`` count dict per layer). On the meta device it has shapes only."""
    sd = {"sequential.0.word_embeddings.weight": torch.randn(vocab_size, d_model, device=device)}
    for i, tokens in enumerate(layer_tokens):
        for name, path in LAYER_MODULES.items():
            n = tokens[KIND[name]]
            sd[f"sequential.{i + 2}.{path}.key_param_tokens"] = torch.randn(n, d_model, device=device)
            sd[f"sequential.{i + 2}.{path}.value_param_tokens"] = torch.randn(n, d_model, device=device) * 0.3
    norm = f"sequential.{len(layer_tokens) + 3}.norm"
    sd[norm + ".weight"] = 1 + 0.1 * torch.randn(d_model, device=device)
    sd[norm + ".bias"] = 0.1 * torch.randn(d_model, device=device)
    return sd


def our_weights(state_dict: dict, n_layers: int) -> dict:
    """Neutral weights from a ``TokenformerLM`` state dict (tau read from the buffers)."""
    sd = {k: v.double() for k, v in state_dict.items()}

    def patt(prefix):
        return sd[prefix + ".key_param_tokens"], sd[prefix + ".value_param_tokens"], sd[prefix + ".tau"]

    layers = [{name: patt(f"layers.{i}.{path}") for name, path in LAYER_MODULES.items()} for i in range(n_layers)]
    return {
        "embedding": sd["word_embeddings.weight"],
        "final_norm": (sd["final_norm.weight"], sd["final_norm.bias"]),
        "layers": layers,
    }


def released_weights(state_dict: dict) -> dict:
    """Neutral weights from a released ``pytorch_model.bin`` state dict.

    Layer i sits at ``sequential.{i+2}``, the final norm at ``sequential.{L+3}``; the release
    stores no tau and uses sqrt(number of parameter tokens).
    """
    sd = {k: v.double() for k, v in state_dict.items()}
    n_layers = max(int(k.split(".")[1]) for k in sd if ".attention." in k) - 1

    def patt(prefix):
        keys = sd[prefix + ".key_param_tokens"]
        return keys, sd[prefix + ".value_param_tokens"], torch.tensor(math.sqrt(keys.shape[0]), dtype=torch.float64)

    layers = [
        {name: patt(f"sequential.{i + 2}.{path}") for name, path in LAYER_MODULES.items()} for i in range(n_layers)
    ]
    norm = f"sequential.{n_layers + 3}.norm"
    return {
        "embedding": sd["sequential.0.word_embeddings.weight"],
        "final_norm": (sd[norm + ".weight"], sd[norm + ".bias"]),
        "layers": layers,
    }


def reference_logits(
    weights: dict,
    ids: torch.Tensor,
    n_heads: int,
    rotary_pct: float = 0.25,
    rope_base: float = 10000.0,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Logits ``[B, T, vocab]`` in float64."""
    embedding = weights["embedding"]
    d = embedding.shape[1]
    hd = d // n_heads
    rot = int(hd * rotary_pct)
    half = rot // 2

    def gelu(t):
        return 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))

    def patt(x, kvt):
        keys, values, tau = kvt
        a = x @ keys.T
        return gelu(a / a.norm(dim=-1, keepdim=True) * tau) @ values

    def ln(x):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps)

    def rotate(t):  # t [T, heads, hd]
        out = t.clone()
        for pos in range(t.shape[0]):
            for i in range(half):
                theta = pos * rope_base ** (-2 * i / rot)
                a, b = t[pos, :, i], t[pos, :, i + half]
                out[pos, :, i] = a * math.cos(theta) - b * math.sin(theta)
                out[pos, :, i + half] = b * math.cos(theta) + a * math.sin(theta)
        return out

    results = []
    for seq in ids:
        x = embedding[seq]
        T = x.shape[0]
        for layer in weights["layers"]:
            h = ln(x)
            q = rotate(patt(h, layer["query"]).view(T, n_heads, hd))
            k = rotate(patt(h, layer["key"]).view(T, n_heads, hd))
            v = patt(h, layer["value"]).view(T, n_heads, hd)
            scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
            scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
            att = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(T, d)
            x = x + patt(att, layer["proj"])
            x = x + patt(ln(x), layer["ffn"])
        weight, bias = weights["final_norm"]
        x = ln(x) * weight + bias
        results.append(x @ embedding.T)
    return torch.stack(results)
