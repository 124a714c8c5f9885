"""The language model's data: text sources, cached token shards and packed, prefetching loaders."""

from engram.data.loader import Batch, PackedLoader, eval_batches, make_batch
from engram.data.shards import SHARD_VERSION, TokenShard, build_shard, token_dtype
from engram.data.sources import (
    SPLITS,
    VAL_FRACTION,
    canonical_source,
    documents,
    read_texts,
    source_fingerprint,
    stdlib_files,
    stdlib_root,
)

__all__ = [
    "SHARD_VERSION",
    "SPLITS",
    "VAL_FRACTION",
    "Batch",
    "PackedLoader",
    "TokenShard",
    "build_shard",
    "canonical_source",
    "documents",
    "eval_batches",
    "make_batch",
    "read_texts",
    "source_fingerprint",
    "stdlib_files",
    "stdlib_root",
    "token_dtype",
]
