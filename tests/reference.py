"""Plain numpy references written from the published algorithm (paper section 2.2 and the official
demo's `NgramHashMapping._get_ngram_hashes`), independent of `engram.hashing`: the oracles that the
torch hasher must match bit for bit. The benchmark imports `demo_hash` as its baseline.
"""

from __future__ import annotations

import numpy as np


def demo_hash(
    canon: np.ndarray,
    multipliers: list[int],
    primes: list[int],
    orders: list[int],
    heads_per_order: int,
    pad_id: int,
) -> np.ndarray:
    """The demo's vectorised hash of one layer: [B, T] canonical ids -> [B, T, H] rows."""
    x = np.asarray(canon, dtype=np.int64)
    _B, T = x.shape
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
        for p in primes[i * heads_per_order : (i + 1) * heads_per_order]:
            out.append(mix % np.int64(p))
    return np.stack(out, axis=2)


def loop_hash(
    canon: np.ndarray,
    multipliers: list[int],
    primes: list[int],
    orders: list[int],
    heads_per_order: int,
    pad_id: int,
    starts: np.ndarray | None,
) -> np.ndarray:
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
                for p in primes[i * heads_per_order : (i + 1) * heads_per_order]:
                    out[b, t, h] = mix % p
                    h += 1
    return out


def demo_engram_forward(module, hidden, rows):
    """The demo's `Engram.forward` (per-branch loops, symmetric-pad-then-trim conv) in plain torch,
    reading the weights of an `engram.module.Engram` so both compute from the same parameters."""
    import math

    import torch
    import torch.nn.functional as F

    B, T, M, d = hidden.shape
    e = module.table.weight[rows + module.offsets].flatten(start_dim=-2)
    value = F.linear(e, module.value_proj.weight, module.value_proj.bias)
    wk = module.key_proj.weight.view(-1, d, e.shape[-1])
    bk = module.key_proj.bias.view(-1, d)
    gates = []
    for m in range(M):
        km = m if wk.shape[0] > 1 else 0
        key = F.linear(e, wk[km], bk[km])
        nk = F.rms_norm(key, (d,), module.key_norm.weight[m])
        nq = F.rms_norm(hidden[:, :, m], (d,), module.query_norm.weight[m])
        g = (nk * nq).sum(dim=-1) / math.sqrt(d)
        g = g.abs().clamp_min(1e-6).sqrt() * g.sign()
        gates.append(g.sigmoid().unsqueeze(-1))
    u = torch.stack(gates, dim=2) * value.unsqueeze(2)
    conv = module.conv.conv
    normed = torch.cat(
        [F.rms_norm(u[:, :, m], (d,), module.conv.norm.weight[m], eps=1e-5) for m in range(M)],
        dim=-1,
    )
    pad = (conv.kernel_size[0] - 1) * conv.dilation[0]
    y = F.conv1d(
        normed.transpose(1, 2), conv.weight, padding=pad, dilation=conv.dilation, groups=conv.groups
    )[..., :T]
    return u + F.silu(y).transpose(1, 2).reshape(B, T, M, d)


def reference_rows(spec, vocab, ids, starts=None):
    """Per layer, the numpy reference's rows for raw ids [B, T]."""
    canon = vocab.lookup[ids.numpy()]
    out = {}
    for layer in spec.layer_ids:
        args = (
            canon,
            list(spec.layer_multipliers(layer)),
            list(spec.layer_primes(layer)),
            list(spec.orders),
            spec.config.heads_per_order,
            spec.canonical_pad_id,
        )
        out[layer] = demo_hash(*args) if starts is None else loop_hash(*args, starts)
    return out
