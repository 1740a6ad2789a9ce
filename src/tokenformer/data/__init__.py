"""Data: text sources, tokenizers, memory-mapped token shards and batches."""

from .corpus import DEFAULT_CORPUS, Document, fingerprint, kjv_documents, load_documents
from .shards import SPLITS, TokenShards, build_shards, even_windows, token_dtype, windows_to_batch
from .tokenizer import Tokenizer, default_cache_dir, get_tokenizer, load_tokenizer, train_bpe

__all__ = [
    "DEFAULT_CORPUS",
    "Document",
    "SPLITS",
    "TokenShards",
    "Tokenizer",
    "build_shards",
    "default_cache_dir",
    "even_windows",
    "fingerprint",
    "get_tokenizer",
    "kjv_documents",
    "load_documents",
    "load_tokenizer",
    "token_dtype",
    "train_bpe",
    "windows_to_batch",
]
