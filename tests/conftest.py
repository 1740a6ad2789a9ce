import math
import os
from pathlib import Path

import pytest
import torch

from tokenformer import TokenformerConfig

torch.set_flush_denormal(True)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several test processes share the cores: each keeps to one intra-op thread, and so do the
    # processes its tests start (torchrun ranks, command lines), unless a test asks for more.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

# Data shared by the project's checkouts, beside the repository: <parent>/shared/data.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GPT_NEOX_TOKENIZER = SHARED_DATA / "gpt-neox-20b-tokenizer.json"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _no_fsync():
    """In this process, ``os.fsync`` checks its file descriptor but does not wait for the disk.

    fsync only matters when the machine itself goes down, which no test simulates: a killed
    process loses nothing the kernel already holds, and the tests that kill processes kill
    subprocesses, which fsync as usual. Every write still goes through the same calls in the
    same order; a bad descriptor still raises.
    """

    def fsync(fd: int) -> None:
        os.fstat(fd)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fsync", fsync)
        yield


def tiny_config(**overrides) -> TokenformerConfig:
    """A model small enough for float64 references: distinct token counts per kind."""
    base = dict(
        vocab_size=97, d_model=32, n_layers=2, n_heads=4, qkv_tokens=24, proj_tokens=20, ffn_tokens=40, max_seq_len=64
    )
    return TokenformerConfig(**{**base, **overrides})


NEOX_TOKENIZER = Path(__file__).resolve().parents[2] / "shared/data/gpt-neox-20b-tokenizer.json"
# A model and batches small enough that a training step takes milliseconds.
TINY_MODEL = dict(n_layers=2, d_model=32, n_heads=2, qkv_tokens=16, proj_tokens=16, ffn_tokens=32)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """About 200 KB of the embedded corpus as a user's text file."""
    from tokenformer.data import kjv_documents

    path = tmp_path_factory.mktemp("corpus") / "genesis-exodus.txt"
    path.write_text("".join(doc.text for doc in kjv_documents()[:2]), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Shared by the tests so that the tiny BPE is trained once."""
    return tmp_path_factory.mktemp("cache")


def tiny_train_options(corpus_file: Path, cache_dir: Path, out_dir: Path, **overrides) -> dict:
    base = dict(
        model="cpu-0.3M",
        model_overrides=dict(TINY_MODEL),
        data=str(corpus_file),
        vocab_size=512,
        cache_dir=str(cache_dir),
        seq_len=32,
        batch_size=4,
        max_steps=12,
        warmup_steps=2,
        lr=3e-3,
        min_lr=3e-4,
        eval_interval=4,
        eval_batches=2,
        log_interval=1,
        ckpt_interval=4,
        keep_last=10,
        out_dir=str(out_dir),
        device="cpu",
        progress=False,
    )
    return {**base, **overrides}


def cli_flags(options: dict) -> list[str]:
    """The same options as ``tokenformer train`` flags."""
    import json

    flat = {}
    for key, value in options.items():
        if key == "vision":  # a group of options: --vision.dataset cifar10 ...
            flat.update({f"vision.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return [
        item
        for key, value in flat.items()
        for item in (f"--{key}", json.dumps(value) if not isinstance(value, str) else value)
    ]


@pytest.fixture
def one_thread():
    """For training tiny models: a second intra-op thread only adds synchronisation, and on a
    busy machine waiting for it dominates each step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_ops(state: dict[str, torch.Tensor], eps: float):
    """Pattention (``l2_norm_gelu``) and weight-free LayerNorm written out from the paper's
    formulas over a float64 state dict, for reference forward passes that share no code with
    the models."""

    def gelu(t):
        return 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))

    def pattention(x, prefix):
        a = x @ state[prefix + ".key_param_tokens"].T
        s = gelu(a / a.norm(dim=-1, keepdim=True) * state[prefix + ".tau"])
        return s @ state[prefix + ".value_param_tokens"]

    def layer_norm(x):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps)

    return pattention, layer_norm


def word_level_tokenizer(words):
    """A fast tokenizer for data tests: whitespace-separated words, ``<|endoftext|>`` is id 0 (and unknown words)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from tokenformer.data import Tokenizer

    vocab = {"<|endoftext|>": 0} | {w: i + 1 for i, w in enumerate(sorted(set(words) - {"<|endoftext|>"}))}
    backend = Backend(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend, backend.to_str())


def expected_splits(texts, tokenizer, chunk_tokens=2048, val_fraction=0.05):
    """The train and validation ids of ``texts`` as documented: each whole text encoded at once and
    followed by the end-of-text id, then :func:`split_stream`."""
    import numpy as np

    stream = np.concatenate([np.asarray(tokenizer.encode(t) + [tokenizer.eos_id], dtype=np.int64) for t in texts])
    return split_stream(stream, chunk_tokens, val_fraction)


def split_stream(stream, chunk_tokens=2048, val_fraction=0.05):
    """A token stream cut into chunks, chunk ``i`` in validation when ``frac(i * golden ratio) < val_fraction``."""
    import numpy as np

    from tokenformer.data.shards import is_validation_chunk

    chunks = [stream[i : i + chunk_tokens] for i in range(0, len(stream), chunk_tokens)]
    return {
        split: np.concatenate(
            [c for i, c in enumerate(chunks) if is_validation_chunk(i, val_fraction) == (split == "val")]
            or [np.zeros(0, dtype=np.int64)]
        )
        for split in ("train", "val")
    }


def shard_splits(shards):
    """The ids of each split of a ``TokenShards``, concatenated over its files."""
    import numpy as np

    return {
        split: np.concatenate([np.asarray(a, dtype=np.int64) for a in arrays] or [np.zeros(0, dtype=np.int64)])
        for split, arrays in shards.arrays.items()
    }
