"""Data: text sources, tokenizers, memory-mapped token shards and batches."""

from .cache import default_cache_dir
from .corpus import DEFAULT_CORPUS, Corpus, Document, FileDocument, fingerprint, kjv_documents, load_documents
from .shards import SPLITS, TokenShards, build_shards, even_windows, token_dtype, windows_to_batch
from .tokenizer import Tokenizer, get_tokenizer, load_tokenizer, train_bpe

__all__ = [
    "Corpus",
    "DEFAULT_CORPUS",
    "Document",
    "FileDocument",
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
