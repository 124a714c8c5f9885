"""`collisions`: how Engram's hashed tables fill and collide on real text, and where memory helps.

Engram looks up each position's suffix N-grams in prime-sized tables through a multiplicative-XOR
hash (paper section 2.2). Distinct N-grams that land on the same row share (and fight over) one
embedding; multi-head hashing exists so that an N-gram rarely collides in every head at once.
This study tokenises a validation split, hashes it with a spec and measures, per layer, order and
head: distinct N-grams, distinct rows used, row utilisation, and the share of distinct N-grams
whose row holds another N-gram too, next to what a uniformly random hash would give. With a
trained checkpoint it also splits the per-token loss, with Engram on and off, by how often the
position's N-gram occurs in the split, to show which N-gram frequencies the memory helps most.

The N-gram keys are rebuilt from canonical ids with numpy, independently of the hasher, and every
key is checked to map to a single row in every head: a key with two rows would be a hashing bug.

Axes: N stream positions, K shifts (max order), H heads of a layer (order-major).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engram.assembly import autocast_for, get_tokenizer, to_device
from engram.config import TrainConfig
from engram.data import build_shard, eval_batches
from engram.experiments.collisions_report import write_report
from engram.experiments.report import machine_info
from engram.hashing import NgramHasher
from engram.inference.load import load_trained
from engram.model import EngramLM, model_preset
from engram.spec import HashSpec, SpecConfig, resolve
from engram.tokenizer import Tokenizer
from engram.vocab import compress

# Frequency buckets of an N-gram in the split: [low, high] occurrences, high None = unbounded.
BUCKETS: tuple[tuple[int, int | None], ...] = ((1, 1), (2, 9), (10, 99), (100, 999), (1000, None))
CHUNK = 4096  # tokens hashed per call: bounds the hasher's temporaries on a long split
QUICK_TOKENS = 65536  # `--quick`: a prefix of the split; the hashing study then takes seconds


# ---- hashing the stream --------------------------------------------------------------------------
def hash_stream(
    hasher: NgramHasher, tokens: np.ndarray, chunk: int = CHUNK
) -> dict[int, np.ndarray]:
    """Rows of every position of one token stream, {layer: [N, H] int64}, hashed chunk by chunk.

    The HashState carried between chunks makes this equal to hashing the whole stream at once.
    """
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))[None]  # [1, N]
    state = hasher.initial_state(1)
    parts: dict[int, list[np.ndarray]] = {layer: [] for layer in hasher.spec.layer_ids}
    for begin in range(0, ids.shape[1], chunk):
        rows, state = hasher.step(ids[:, begin : begin + chunk], state)
        for layer, r in rows.items():
            parts[layer].append(r[0].numpy())  # [T, H]
    H = hasher.spec.heads_total
    return {
        layer: np.concatenate(p) if p else np.empty((0, H), dtype=np.int64)
        for layer, p in parts.items()
    }


def ngram_shifts(raw: np.ndarray, canon: np.ndarray, spec: HashSpec) -> np.ndarray:
    """s_j[t] = canon[t - j] for j < K as [K, N], the canonical pad where the hasher sees none.

    Mirrors the hasher's rules: nothing precedes the stream, and with `spec.eos_id` the token after
    an EOS starts a document, so no N-gram reaches back across it.
    """
    N, K, pad = len(canon), spec.max_order, spec.canonical_pad_id
    pos = np.arange(N)
    starts = np.zeros(N, dtype=bool)
    if spec.eos_id is not None:
        starts[1:] = raw[:-1] == spec.eos_id
    if N:
        starts[0] = True  # before the stream there is only pad, as in the hasher's first state
    dist = pos - np.maximum.accumulate(np.where(starts, pos, 0))  # visible past positions
    shifts = np.full((K, N), pad, dtype=np.int64)
    for j in range(K):
        shifts[j, j:] = canon[: N - j]
        shifts[j, dist < j] = pad
    return shifts


def ngram_keys(shifts: np.ndarray, order: int, num_ids: int) -> tuple[np.ndarray, int]:
    """Dense id [N] of each position's suffix N-gram (s_0..s_{order-1}), and how many there are."""
    if not 1 <= order <= shifts.shape[0]:
        raise ValueError(f"order={order} must be in [1, {shifts.shape[0]}]")
    cols = shifts[:order]  # [order, N]
    if num_ids**order < 2**63:  # one int64 per N-gram: a 1-D unique is much faster than axis=0
        code = np.zeros(cols.shape[1], dtype=np.int64)
        for col in cols:
            code = code * num_ids + col
        _, inverse = np.unique(code, return_inverse=True)
    else:
        _, inverse = np.unique(cols.T, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    return inverse, int(inverse.max()) + 1 if inverse.size else 0


def rows_by_key(keys: np.ndarray, rows: np.ndarray, num_keys: int) -> np.ndarray:
    """The row [num_keys] each distinct N-gram maps to; raises if one N-gram maps to two rows."""
    row_of = np.full(num_keys, -1, dtype=np.int64)
    row_of[keys] = rows
    bad = np.flatnonzero(row_of[keys] != rows)
    if bad.size:
        t = int(bad[0])
        raise RuntimeError(
            f"N-gram key {int(keys[t])} maps to rows {int(row_of[keys[t]])} and {int(rows[t])} "
            f"(position {t}): the rebuilt N-grams disagree with the hasher"
        )
    return row_of


# ---- statistics ----------------------------------------------------------------------------------
def uniform_collision_share(num_ngrams: int, prime: int) -> float:
    """Expected share of n distinct N-grams sharing a row, were rows uniform: 1-(1-1/p)^(n-1)."""
    if prime < 1 or num_ngrams < 0:
        raise ValueError(f"prime={prime} must be >= 1 and num_ngrams={num_ngrams} >= 0")
    if num_ngrams <= 1:
        return 0.0
    if prime == 1:
        return 1.0
    return -math.expm1((num_ngrams - 1) * math.log1p(-1.0 / prime))  # exact for huge p too


def uniform_utilisation(num_ngrams: int, prime: int) -> float:
    """Expected share of the p rows used by n uniformly hashed N-grams: 1-(1-1/p)^n."""
    if prime < 1 or num_ngrams < 0:
        raise ValueError(f"prime={prime} must be >= 1 and num_ngrams={num_ngrams} >= 0")
    if num_ngrams == 0 or prime == 1:
        return float(num_ngrams > 0)
    return -math.expm1(num_ngrams * math.log1p(-1.0 / prime))


def head_stats(keys: np.ndarray, rows: np.ndarray, num_keys: int, prime: int) -> dict[str, Any]:
    """One head's table on the stream; `shared` [num_keys] bool: the key's row holds another key."""
    row_of = rows_by_key(keys, rows, num_keys)
    _, which, counts = np.unique(row_of, return_inverse=True, return_counts=True)
    shared = counts[which.reshape(-1)] > 1  # [num_keys]
    distinct_rows = int(counts.size)
    return {
        "prime": prime,
        "distinct_ngrams": num_keys,
        "distinct_rows": distinct_rows,
        "utilisation": distinct_rows / prime,
        "uniform_utilisation": uniform_utilisation(num_keys, prime),
        "collision_share": float(shared.mean()) if num_keys else 0.0,
        "uniform_collision_share": uniform_collision_share(num_keys, prime),
        # Lookups rather than N-grams: frequent N-grams weigh by how often they are read.
        "collided_lookups": float(shared[keys].mean()) if keys.size else 0.0,
        "shared": shared,
    }


def order_stats(
    shifts: np.ndarray, rows: dict[int, np.ndarray], spec: HashSpec, order: int
) -> tuple[list[dict], dict[str, Any], np.ndarray, np.ndarray]:
    """Per-head stats of one order over every layer, their summary, the keys [N], and per
    position [N] the share of this order's heads (over all layers) whose row is shared."""
    keys, num_keys = ngram_keys(shifts, order, spec.compressed_vocab_size)
    k = spec.config.heads_per_order
    first = spec.orders.index(order) * k  # heads are order-major within a layer
    heads, collided, all_heads = [], np.zeros(len(keys)), []
    for layer in spec.layer_ids:
        all_shared = np.ones(num_keys, dtype=bool)
        for h in range(first, first + k):
            prime = spec.layer_primes(layer)[h]
            stats = head_stats(keys, rows[layer][:, h], num_keys, prime)
            shared = stats.pop("shared")
            all_shared &= shared
            collided += shared[keys]
            heads.append({"layer": layer, "order": order, "head": h - first, **stats})
        # An N-gram with no private row in any head of the layer: what multi-head hashing avoids.
        all_heads.append(float(all_shared.mean()) if num_keys else 0.0)
    collided /= len(spec.layer_ids) * k
    summary = _summarise(heads, order, num_keys)
    summary["all_heads_collide"] = float(np.mean(all_heads))
    summary["uniform_all_heads_collide"] = float(
        np.mean(
            [
                # Independent uniform heads: the product of each head's collision probability.
                math.prod(h["uniform_collision_share"] for h in heads if h["layer"] == layer)
                for layer in spec.layer_ids
            ]
        )
    )
    return heads, summary, keys, collided


def _summarise(heads: list[dict], order: int, num_keys: int) -> dict[str, Any]:
    def mean(name: str) -> float:
        return float(np.mean([h[name] for h in heads]))

    shares = [h["collision_share"] for h in heads]
    return {
        "order": order,
        "heads": len(heads),
        "prime_min": min(h["prime"] for h in heads),
        "prime_max": max(h["prime"] for h in heads),
        "distinct_ngrams": num_keys,
        "distinct_rows": mean("distinct_rows"),
        "utilisation": mean("utilisation"),
        "uniform_utilisation": mean("uniform_utilisation"),
        "collision_share": mean("collision_share"),
        "collision_share_min": min(shares),
        "collision_share_max": max(shares),
        "uniform_collision_share": mean("uniform_collision_share"),
        "collided_lookups": mean("collided_lookups"),
    }


# ---- frequency buckets and the memory's effect ---------------------------------------------------
def bucket_label(low: int, high: int | None) -> str:
    return str(low) if high == low else f">={low}" if high is None else f"{low}-{high}"


def frequency_buckets(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position [N]: the occurrences of its N-gram in the stream, and its index in BUCKETS."""
    freq = np.bincount(keys)[keys] if keys.size else np.zeros(0, dtype=np.int64)
    lows = np.array([low for low, _ in BUCKETS])
    return freq, np.searchsorted(lows, freq, side="right") - 1


@torch.no_grad()
def token_losses(
    model: EngramLM, tokens: np.ndarray, config: TrainConfig, device: torch.device
) -> dict[str, np.ndarray]:
    """Next-token cross-entropy at each input position [N] (NaN where unscored), Engram on/off.

    Uses `evaluate`'s windows (non-overlapping, window i = tokens[i*T : i*T+T+1], fresh context at
    each window start), so the scored mean equals `evaluate(model, tokens, ...)` over these tokens.
    """
    was_training = model.training
    model.eval()
    out = {name: np.full(len(tokens), np.nan) for name in ("on", "off")}
    position = 0
    for batch in eval_batches(tokens, config.seq_len, config.batch_size, model.hasher):
        ids, targets, rows = to_device(batch, device)
        B, T = targets.shape
        for name in out:
            with autocast_for(device, config.precision):
                logits = model(ids, rows=rows, engram_off=name == "off")  # [B, T, V]
            loss = F.cross_entropy(
                logits.float().flatten(0, 1), targets.flatten(), reduction="none"
            )  # [B*T]; window b covers positions position + b*T .. + T - 1
            out[name][position : position + B * T] = loss.cpu().numpy()
        position += B * T
    model.train(was_training)
    return out


def bucket_rows(
    keys: np.ndarray, collided: np.ndarray, losses: dict[str, np.ndarray] | None
) -> list[dict[str, Any]]:
    """One row per frequency bucket: positions, N-grams, row sharing and (with losses) the loss."""
    _, bucket = frequency_buckets(keys)
    total = max(len(keys), 1)
    rows = []
    for b, (low, high) in enumerate(BUCKETS):
        mask = bucket == b
        n = int(mask.sum())
        row: dict[str, Any] = {
            "bucket": bucket_label(low, high),
            "low": low,
            "high": high,
            "positions": n,
            "position_share": n / total,
            "distinct_ngrams": int(np.unique(keys[mask]).size),
            "collided_lookups": float(collided[mask].mean()) if n else None,
        }
        if losses is not None:
            scored = mask & np.isfinite(losses["on"])
            on = float(losses["on"][scored].mean()) if scored.any() else None
            off = float(losses["off"][scored].mean()) if scored.any() else None
            row.update(
                scored=int(scored.sum()),
                loss_engram_on=on,
                loss_engram_off=off,
                engram_gain=None if on is None else off - on,
            )
        rows.append(row)
    return rows


def analyse(
    tokens: np.ndarray, hasher: NgramHasher, losses: dict[str, np.ndarray] | None = None
) -> dict[str, Any]:
    """Per-order summaries, per-head stats and frequency buckets of one token stream [N]."""
    spec = hasher.spec
    rows = hash_stream(hasher, tokens)
    canon = hasher.canonicalize(torch.from_numpy(tokens)[None])[0].numpy()  # [N]
    shifts = ngram_shifts(tokens, canon, spec)  # [K, N]
    heads, orders, buckets = [], [], {}
    for order in spec.orders:
        order_heads, summary, keys, collided = order_stats(shifts, rows, spec, order)
        heads += order_heads
        orders.append(summary)
        buckets[str(order)] = bucket_rows(keys, collided, losses)
    return {"orders": orders, "heads": heads, "buckets": buckets}


# ---- the study -----------------------------------------------------------------------------------
def _default_spec(tok: Tokenizer, tokenizer: str, spec: SpecConfig | None) -> HashSpec:
    """`spec` (default: the `demo` model's Engram spec) resolved against `tok`."""
    config = spec if spec is not None else model_preset("demo").engram.spec
    config = replace(config, tokenizer=tokenizer)
    if config.pad_id is None or config.pad_id >= tok.vocab_size:
        # The presets name DeepSeek's pad id; a small BPE has its own (as `build_model` does).
        config = replace(config, pad_id=tok.pad_id if tok.pad_id is not None else tok.eos_id)
    return resolve(config, tokenizer=tok, vocab=compress(tok, enabled=config.compress))


@dataclass(frozen=True)
class Subject:
    """What is studied: a split's source, its tokenizer and hasher, and maybe a trained model."""

    data: str
    tokenizer: str  # the name the tokenizer was built from, for the report
    tok: Tokenizer
    hasher: NgramHasher
    model: EngramLM | None = None
    train_config: TrainConfig | None = None


def load_subject(
    data: str | None = None,
    tokenizer: str | None = None,
    spec: SpecConfig | None = None,
    ckpt: str | Path | None = None,
    device: str = "auto",
) -> Subject:
    """The tokenizer and hasher to study; with `ckpt`, the checkpoint's own, and its model."""
    if ckpt is None:
        data, tokenizer = data or "default", tokenizer or "bpe:4096"
        tok = get_tokenizer(tokenizer, data)
        hash_spec = _default_spec(tok, tokenizer, spec)
        vocab = compress(tok, enabled=hash_spec.config.compress)
        return Subject(data, tokenizer, tok, NgramHasher(hash_spec, vocab))
    if tokenizer is not None or spec is not None:
        raise ValueError(
            f"tokenizer={tokenizer!r} and spec={spec!r} must be None with ckpt={str(ckpt)!r}: "
            "the checkpoint's own tokenizer and hash spec are studied"
        )
    trained = load_trained(ckpt, device=device)
    model, tok, config = trained.model, trained.tokenizer, trained.config
    if model.spec is None or model.hasher is None:
        raise ValueError(f"the model of ckpt={str(ckpt)!r} has no Engram layers: nothing to hash")
    return Subject(data or config.data, config.tokenizer, tok, model.hasher, model, config)


def _stream(data: str, tok: Tokenizer, max_tokens: int | None) -> np.ndarray:
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens} must be >= 2 (or None for the whole split)")
    tokens = build_shard(data, "val", tok).tokens
    return np.asarray(tokens[:max_tokens], dtype=np.int64)


HELP = "row sharing per head and order, loss by frequency"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="the first 65,536 validation tokens")
    p.add_argument("--ckpt", help="a trained run: its spec, and losses with Engram on and off")
    p.add_argument("--max-tokens", type=int, help="validation tokens to analyse")
    p.add_argument("--data", help="text source (default: the checkpoint's, or the stdlib)")
    p.add_argument("--out", help="report folder (default runs/collisions[-quick])")


def run_cli(args: argparse.Namespace) -> None:
    max_tokens = args.max_tokens if args.max_tokens else (QUICK_TOKENS if args.quick else None)
    out = args.out or ("runs/collisions-quick" if args.quick else "runs/collisions")
    run_collisions(data=args.data, ckpt=args.ckpt, max_tokens=max_tokens, out_dir=out)


def run_collisions(
    *,
    data: str | None = None,
    tokenizer: str | None = None,
    spec: SpecConfig | None = None,
    ckpt: str | Path | None = None,
    max_tokens: int | None = None,
    out_dir: str | Path = "runs/collisions",
    device: str = "auto",
) -> dict[str, Any]:
    """Measure table use and collisions on the validation split of `data`; write the report.

    Without `ckpt`: `data` defaults to "default", `tokenizer` to "bpe:4096" and `spec` to the
    `demo` model's Engram spec. With `ckpt` (a run folder or checkpoint), its own data (unless
    `data` is given), tokenizer, spec and hasher, and the per-bucket loss with Engram on and off.
    `max_tokens` caps the split (None: all of it). Writes report.json, report.md and
    collisions.png to `out_dir`, prints a short table and returns the report.
    """
    start = time.perf_counter()
    s = load_subject(data, tokenizer, spec, ckpt, device)
    spec_ = s.hasher.spec
    tokens = _stream(s.data, s.tok, max_tokens)
    losses = None
    if s.model is not None and s.train_config is not None:
        device_ = next(s.model.parameters()).device
        losses = token_losses(s.model, tokens, s.train_config, device_)
    report = {
        "config": {
            "data": s.data,
            "tokenizer": s.tokenizer,
            "ckpt": None if ckpt is None else str(ckpt),
            "max_tokens": max_tokens,
            "tokens": len(tokens),
            "eos_tokens": int((tokens == s.tok.eos_id).sum()),  # documents ended in the stream
            "spec": spec_.to_dict(),
        },
        "spec_digest": spec_.digest,
        **analyse(tokens, s.hasher, losses),
        "loss": _mean_losses(losses),
        "machine": machine_info(),
        "seconds": time.perf_counter() - start,
    }
    write_report(report, Path(out_dir))
    return report


def _mean_losses(losses: dict[str, np.ndarray] | None) -> dict[str, Any] | None:
    if losses is None:
        return None
    scored = np.isfinite(losses["on"])
    on, off = float(losses["on"][scored].mean()), float(losses["off"][scored].mean())
    return {
        "scored": int(scored.sum()),
        "engram_on": on,
        "engram_off": off,
        "engram_gain": off - on,
    }


__all__ = [
    "BUCKETS",
    "QUICK_TOKENS",
    "Subject",
    "analyse",
    "hash_stream",
    "load_subject",
    "ngram_keys",
    "ngram_shifts",
    "rows_by_key",
    "run_collisions",
    "token_losses",
    "uniform_collision_share",
    "uniform_utilisation",
]
