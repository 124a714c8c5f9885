"""Plain numpy references written from the published algorithm (paper section 2.2 and the official
demo's `NgramHashMapping._get_ngram_hashes`), independent of `engram.hashing`: the oracles that the
torch hasher must match bit for bit. The benchmark imports `demo_hash` as its baseline.
"""

from __future__ import annotations

import numpy as np


def demo_hash(canon: np.ndarray, multipliers: list[int], primes: list[int], orders: list[int],
              heads_per_order: int, pad_id: int) -> np.ndarray:
    """The demo's vectorised hash of one layer: [B, T] canonical ids -> [B, T, H] rows."""
    x = np.asarray(canon, dtype=np.int64)
    B, T = x.shape
    max_order = max(orders)

    def shift(k: int) -> np.ndarray:
        if k == 0:
            return x
        return np.pad(x, ((0, 0), (k, 0)), mode="constant", constant_values=pad_id)[:, :T]

    shifts = [shift(k) for k in range(max_order)]
    out = []
    for i, n in enumerate(orders):
        mix = shifts[0] * np.int64(multipliers[0])
        for k in range(1, n):
            mix = np.bitwise_xor(mix, shifts[k] * np.int64(multipliers[k]))
        for p in primes[i * heads_per_order:(i + 1) * heads_per_order]:
            out.append(mix % np.int64(p))
    return np.stack(out, axis=2)


def loop_hash(canon: np.ndarray, multipliers: list[int], primes: list[int], orders: list[int],
              heads_per_order: int, pad_id: int, starts: np.ndarray | None) -> np.ndarray:
    """Position by position, with document starts: tokens before a start read as the pad id."""
    B, T = canon.shape
    H = len(primes)
    out = np.zeros((B, T, H), dtype=np.int64)
    for b in range(B):
        seg = 0
        for t in range(T):
            if starts is not None and starts[b, t]:
                seg = t
            h = 0
            for i, n in enumerate(orders):
                mix = 0
                for k in range(n):
                    tok = int(canon[b, t - k]) if t - k >= seg else pad_id
                    mix ^= tok * multipliers[k]
                for p in primes[i * heads_per_order:(i + 1) * heads_per_order]:
                    out[b, t, h] = mix % p
                    h += 1
    return out
