"""Token shards: one split of a source, tokenised once and kept on disk as a flat array of ids.

A shard is two files in `<cache>/shards/<key>/`: `{split}.bin`, the token ids of every document
with the tokenizer's EOS after each (uint16 when every id fits, else uint32), and `{split}.json`,
its meta. The key digests the source, the source's fingerprint, the tokenizer's fingerprint and
`SHARD_VERSION`, so editing the data or changing the tokenizer can never reuse stale tokens.
Both files are written to a temporary name and moved into place (the meta last), so a crashed or
concurrent build never leaves a half-written shard that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np

from engram.data.sources import SPLITS, canonical_source, documents, source_fingerprint
from engram.tokenizer import Tokenizer
from engram.vocab import cache_dir as default_cache_dir

# Bump when the layout of the .bin or .json changes: old shards are then rebuilt, not misread.
SHARD_VERSION = 1
_BATCH_DOCS = 512  # documents per encode_batch call
_BATCH_CHARS = 4 << 20  # ... or fewer, when they are long: bounds the memory of one batch
_PROGRESS_SECONDS = 5.0
T = TypeVar("T")


@dataclass(frozen=True)
class TokenShard:
    """A tokenised split: `tokens` is a read-only memory map of every document's ids + EOS."""

    tokens: np.memmap  # [n_tokens] uint16 or uint32
    meta: dict[str, Any]
    path: Path  # the .bin file

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def n_docs(self) -> int:
        return int(self.meta["n_docs"])

    def __repr__(self) -> str:
        return (
            f"TokenShard(source={self.meta['source']!r}, split={self.meta['split']!r}, "
            f"n_docs={self.n_docs}, n_tokens={self.n_tokens}, dtype={self.meta['dtype']})"
        )


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id in [0, vocab_size)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size} must be >= 1")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _expected_meta(name: str, split: str, tokenizer: Tokenizer) -> dict[str, Any]:
    """The fields a cached shard's meta must hold to be reused for this request."""
    return {
        "format_version": SHARD_VERSION,
        "source": name,
        "split": split,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "source_fingerprint": source_fingerprint(name),
        "eos_id": tokenizer.eos_id,
        "dtype": token_dtype(tokenizer.vocab_size).name,
    }


def _key(meta: dict[str, Any]) -> str:
    """The cache folder of a source tokenised by a tokenizer (both splits share it)."""
    parts = [meta["source"], meta["source_fingerprint"], meta["tokenizer_fingerprint"]]
    return hashlib.sha256(json.dumps([*parts, SHARD_VERSION]).encode()).hexdigest()[:32]


def _load(bin_path: Path, meta_path: Path, expected: dict[str, Any]) -> TokenShard | None:
    """The cached shard, or None when missing, corrupt or built for something else."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if any(meta.get(k) != v for k, v in expected.items()):
            return None
        n_tokens, n_docs = int(meta["n_tokens"]), int(meta["n_docs"])
        dtype = np.dtype(meta["dtype"])
        # A size mismatch means a truncated or foreign .bin: never map it.
        if min(n_tokens, n_docs) < 1 or bin_path.stat().st_size != n_tokens * dtype.itemsize:
            return None
        tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tokens,))
    except (OSError, ValueError, KeyError, TypeError):  # corrupt entries are rebuilt
        return None
    return TokenShard(tokens, meta, bin_path)


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _flatten(encoded: list[list[int]], eos_id: int, dtype: np.dtype) -> np.ndarray:
    """The ids of each document followed by EOS, as one array."""
    out = np.empty(sum(len(ids) + 1 for ids in encoded), dtype=dtype)
    pos = 0
    for ids in encoded:
        out[pos : pos + len(ids)] = ids
        out[pos + len(ids)] = eos_id
        pos += len(ids) + 1
    return out


def _tokenize_to(f: BinaryIO, source: str, split: str, tokenizer: Tokenizer) -> tuple[int, int]:
    """Tokenise every document of the split into the open binary file `f`: (docs, tokens)."""
    assert tokenizer.eos_id is not None  # checked by build_shard
    dtype = token_dtype(tokenizer.vocab_size)
    n_docs = n_tokens = 0
    start = last = time.monotonic()
    for batch in _batches(documents(source, split)):
        flat = _flatten(tokenizer.encode_batch(batch), tokenizer.eos_id, dtype)
        f.write(flat.tobytes())
        n_docs += len(batch)
        n_tokens += len(flat)
        if time.monotonic() - last >= _PROGRESS_SECONDS:
            last = time.monotonic()
            _progress(source, split, n_docs, n_tokens, last - start)
    if last != start:  # a long build also reports its end; a quick one stays silent
        _progress(source, split, n_docs, n_tokens, time.monotonic() - start, done=True)
    return n_docs, n_tokens


def _progress(
    source: str, split: str, n_docs: int, n_tokens: int, seconds: float, done: bool = False
) -> None:
    verb = "tokenised" if done else "tokenising"
    print(
        f"[data] {verb} {source} ({split}): {n_docs:,} docs, {n_tokens:,} tokens, "
        f"{n_tokens / max(seconds, 1e-9):,.0f} tokens/s",
        file=sys.stderr,
        flush=True,
    )


def _atomic_write(path: Path, write: Callable[[BinaryIO], T]) -> T:
    """Call `write(f)` on a temporary file next to `path`, then move it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            result = write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return result


def build_shard(
    source: str, split: str, tokenizer: Tokenizer, cache_dir: str | Path | None = None
) -> TokenShard:
    """The token shard of one split of `source`, tokenised on the first call and cached after.

    `cache_dir` defaults to `engram.vocab.cache_dir()` ($ENGRAM_CACHE_DIR, ...). A cached shard
    whose meta is corrupt or does not match (source, split, tokenizer) is rebuilt.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be 'train' or 'val'")
    if tokenizer.eos_id is None:
        raise ValueError(
            f"tokenizer {tokenizer.name!r} has no EOS id: documents in a shard are separated by "
            "EOS, so use a tokenizer with an eos token"
        )
    name = canonical_source(source)
    expected = _expected_meta(name, split, tokenizer)
    folder = Path(cache_dir or default_cache_dir()) / "shards" / _key(expected)
    bin_path, meta_path = folder / f"{split}.bin", folder / f"{split}.json"
    cached = _load(bin_path, meta_path, expected)
    if cached is not None:
        return cached

    folder.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    n_docs, n_tokens = _atomic_write(bin_path, lambda f: _tokenize_to(f, name, split, tokenizer))
    if n_docs == 0:
        bin_path.unlink(missing_ok=True)
        raise ValueError(f"split {split!r} of data source {source!r} has no documents")
    meta = {
        **expected,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "n_tokens": n_tokens,
        "n_docs": n_docs,
        "seconds": round(time.monotonic() - start, 3),
    }
    text = json.dumps(meta, indent=1).encode()
    _atomic_write(meta_path, lambda f: f.write(text))
    shard = _load(bin_path, meta_path, expected)
    if shard is None:  # pragma: no cover - only if another process broke the files meanwhile
        raise RuntimeError(f"token shard {bin_path} could not be read back after writing it")
    return shard
