"""Tokenizer compression: a surjective map from token ids to canonical ids.

Engram hashes N-grams of *canonical* ids so that "Apple", " apple" and "APPLE" share memory rows.
The map follows the official demo (`CompressedTokenizer` in deepseek-ai/Engram `engram_demo_v1.py`)
exactly: decode each id; normalise (NFKC, NFD, strip accents, lowercase, collapse whitespace runs to
one space, strip, but a whitespace-only token stays a single space); a decoded text containing
U+FFFD (a partial UTF-8 byte sequence) keys on its raw token string instead; an empty result keys on
the decoded text; canonical ids are assigned in order of first occurrence over ids 0..V-1.
The paper reports 23.43% fewer ids for the 129,280-id DeepSeek-V3 tokenizer.

Building decodes every id (seconds for 129k ids), so the map is cached on disk, keyed by the
tokenizer fingerprint and NORMALIZER_VERSION.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from tokenizers import Regex, normalizers

from engram.tokenizer import Tokenizer

# Bump when the normalisation or key rules change: old caches and specs then no longer match.
NORMALIZER_VERSION = 1
_SENTINEL = "\ue000"  # private-use char that marks "this token was only whitespace"


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(_SENTINEL, " "),
        ]
    )


def canonical_key(tokenizer: Tokenizer, token_id: int, normalizer: normalizers.Normalizer) -> str:
    """The string two token ids must share to get the same canonical id."""
    text = tokenizer.decode([token_id])
    if "\ufffd" in text:
        return tokenizer.id_to_token(token_id) or text
    norm = normalizer.normalize_str(text)
    return norm if norm else text


def build_lookup(tokenizer: Tokenizer) -> tuple[np.ndarray, list[str]]:
    """Return `lookup[id] -> canonical id` (int64) and the canonical keys in id order."""
    normalizer = _normalizer()
    key_to_new: dict[str, int] = {}
    lookup = np.empty(tokenizer.vocab_size, dtype=np.int64)
    for tid in range(tokenizer.vocab_size):
        key = canonical_key(tokenizer, tid, normalizer)
        lookup[tid] = key_to_new.setdefault(key, len(key_to_new))
    return lookup, list(key_to_new)


def cache_dir() -> Path:
    """`$ENGRAM_CACHE_DIR`, else `$XDG_CACHE_HOME/engram`, else `~/.cache/engram`."""
    if os.environ.get("ENGRAM_CACHE_DIR"):
        return Path(os.environ["ENGRAM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "engram"


def _atomic_save(arrays: dict[str, np.ndarray], metadata: dict[str, str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(arrays, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _digest(lookup: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(lookup, dtype="<i8").tobytes()).hexdigest()


def _read_cached(path: Path, vocab_size: int) -> np.ndarray | None:
    """A cached map, or None when it cannot be trusted (unreadable, another size, or bytes that
    differ from the digest stored beside them, e.g. a flipped bit): it is then rebuilt."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            digest = (f.metadata() or {}).get("sha256")
            lookup = f.get_tensor("lookup")
    except Exception:  # whatever a damaged file makes the reader raise: rebuild, never trust
        return None
    if lookup.shape != (vocab_size,) or digest != _digest(lookup):
        return None
    return lookup


@dataclass(frozen=True)
class CompressedVocab:
    """The id -> canonical id map of one tokenizer, or the identity when compression is off."""

    lookup: np.ndarray  # [V] int64, canonical id of each token id
    size: int  # number of canonical ids
    tokenizer_fingerprint: str
    compressed: bool

    @property
    def vocab_size(self) -> int:
        return int(self.lookup.shape[0])

    @property
    def reduction(self) -> float:
        """Share of ids removed by the map (0.2343 in the paper for DeepSeek-V3)."""
        return 1.0 - self.size / self.vocab_size

    @property
    def fingerprint(self) -> str:
        """Digest of the map itself: what a spec or checkpoint records to detect a mismatch."""
        h = hashlib.sha256(self.lookup.astype("<i8").tobytes())
        return h.hexdigest()

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        return self.lookup[np.asarray(ids, dtype=np.int64)]

    def as_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.from_numpy(self.lookup).to(device)

    def groups(self, tokenizer: Tokenizer, top: int = 10) -> list[dict]:
        """The `top` largest merge groups: canonical id, size and the raw tokens it merges."""
        counts = Counter(self.lookup.tolist())
        members: dict[int, list[int]] = {}
        for tid, cid in enumerate(self.lookup.tolist()):
            if counts[cid] > 1:
                members.setdefault(cid, []).append(tid)
        largest = sorted(members.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:top]
        return [
            {
                "canonical_id": cid,
                "size": len(ids),
                "ids": ids[:16],
                "tokens": [tokenizer.decode([i]) for i in ids[:16]],
            }
            for cid, ids in largest
        ]

    @classmethod
    def identity(cls, tokenizer: Tokenizer) -> CompressedVocab:
        """Compression switched off (an ablation): canonical id == token id."""
        lookup = np.arange(tokenizer.vocab_size, dtype=np.int64)
        return cls(lookup, tokenizer.vocab_size, tokenizer.fingerprint, compressed=False)

    @classmethod
    def build(cls, tokenizer: Tokenizer, use_cache: bool = True) -> CompressedVocab:
        """Build the demo's map, reading and writing the on-disk cache unless `use_cache=False`."""
        key = hashlib.sha256(f"{tokenizer.fingerprint}:{NORMALIZER_VERSION}".encode()).hexdigest()
        path = cache_dir() / "vocab" / f"{key[:32]}.safetensors"
        if use_cache and path.is_file():
            lookup = _read_cached(path, tokenizer.vocab_size)
            if lookup is not None:
                return cls(lookup, int(lookup.max()) + 1, tokenizer.fingerprint, True)
        lookup, keys = build_lookup(tokenizer)
        if use_cache:
            meta = {
                "tokenizer_fingerprint": tokenizer.fingerprint,
                "normalizer_version": str(NORMALIZER_VERSION),
                "size": str(len(keys)),
                "sha256": _digest(lookup),
            }
            _atomic_save({"lookup": lookup}, meta, path)
        return cls(lookup, len(keys), tokenizer.fingerprint, compressed=True)


def compress(tokenizer: Tokenizer, enabled: bool = True, use_cache: bool = True) -> CompressedVocab:
    """The compressed vocabulary of `tokenizer`, or the identity map when `enabled` is False."""
    if not enabled:
        return CompressedVocab.identity(tokenizer)
    return CompressedVocab.build(tokenizer, use_cache=use_cache)
