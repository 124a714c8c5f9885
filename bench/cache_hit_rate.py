"""Hot-row cache hit rate against cache size, on the training stream of the `demo` preset.

Replays the batches a training run of the `demo` model would see (tokenizer bpe:2048, the
default corpus, TrainConfig's seq_len 128 and batch size 16, seed 0: the same `PackedLoader`
stream as `engram.train.Run`) and, for each Engram layer's table, feeds each batch's sorted
unique global row ids (rows + offsets[h], as the lookup deduplicates them) to caches of 1/64 to
1/2 of the table's rows. Policies, all on the same stream:

- `lfu_prefetch`: our `CachedStore` (aged LFU, LRU among equal counts) in front of a
  `HostStore`, used as training will: `pin(batch n+1)` (which loads the misses) before
  `unpin(batch n)`, a prefetch depth of 1. Two batches are pinned at once, so this only runs
  where the capacity holds the union of two consecutive batches' rows; elsewhere `pin` must
  raise, and the point is reported as not feasible.
- `lfu`: the same `CachedStore` without prefetch, each batch's ids pinned then unpinned in
  chunks of at most a quarter of the capacity (`--chunk-share`), in sorted order. At 1/2 of the
  table that is the whole batch at once (training with no prefetch); where a batch does not fit
  in the cache, chunking is the only way to feed it, and a chunk much smaller than the cache
  lets the eviction policy, not the forced admission of a chunk, decide what stays, so the
  policy can be compared with LRU at every size.
- `lru`: a plain LRU (an OrderedDict over row ids) with the same capacity and chunks; a chunk's
  hits are refreshed before its misses are admitted, so a chunk never evicts its own rows. With
  pins it would behave the same wherever `lfu_prefetch` is feasible: the two newest batches are
  the most recently used rows, so LRU never picks them as victims.
- `belady`: the offline optimum at batch granularity (keep the `capacity` rows, among those
  resident and the batch's, whose next use comes soonest; Belady's MIN with bypass). No policy
  of this capacity can hit more often on this stream.
- `seen_before`: rows already seen earlier in the stream, i.e. an unbounded cache; it does not
  depend on the size.

A hit rate counts unique rows per batch (hits / (hits + misses)), which is what a cache loads:
repeats of a row inside one batch are not counted. "warm" leaves out the first 10% of batches
(the cold start), "overall" counts every batch.

Prints a table, writes the JSON record and a plot (hit rate vs cache size, log2 x axis) under
bench/results/; the last line of stdout is the JSON record.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

import engram.module
from engram.assembly import build_model, get_tokenizer
from engram.config import TrainConfig
from engram.data import PackedLoader, build_shard
from engram.experiments.report import machine_info, pyplot, write_json
from engram.model import model_preset
from engram.tables import CachedStore, HostStore, RowInit, TableLayout

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "cache_hit_rate.json"
DIVISORS = (64, 32, 16, 8, 4, 2)  # cache capacity = table rows / divisor
POLICIES = ("lfu_prefetch", "lfu", "lru", "belady")
LABELS = {
    "lfu_prefetch": "CachedStore (aged LFU), pin with prefetch depth 1",
    "lfu": "CachedStore (aged LFU), no prefetch",
    "lru": "LRU (OrderedDict)",
    "belady": "offline optimum (Belady, batch granularity)",
    "seen_before": "rows seen before (unbounded cache)",
}


@dataclass
class Layer:
    """One Engram table and its stream: each batch's sorted unique global row ids."""

    layer_id: int
    num_rows: int
    heads: int
    dim: int
    batches: list[np.ndarray]


# ---- the stream ----------------------------------------------------------------------------------
def replay_stream(args: argparse.Namespace) -> tuple[list[Layer], dict]:
    """The hashed rows of the first `args.batches` training batches, per Engram layer."""
    tok = get_tokenizer(args.tokenizer, args.data)
    torch.manual_seed(args.seed)  # as Run does before build_model
    # The tables themselves are not needed: skip allocating them where the module allows it.
    lazy = getattr(engram.module, "lazy_tables", contextlib.nullcontext)
    config = model_preset(args.preset)
    if args.scale != 1 and config.engram is not None:  # a larger table, same N-gram stream
        spec_cfg = config.engram.spec
        sizes = tuple(s * args.scale for s in spec_cfg.base_sizes)
        engram_cfg = replace(config.engram, spec=replace(spec_cfg, base_sizes=sizes))
        config = config.with_(engram=engram_cfg)
    with lazy():
        model, spec = build_model(config, tok, "tokenizer.json")
    if spec is None:
        raise SystemExit(f"preset {args.preset!r} has no Engram layer")
    tokens = build_shard(args.data, "train", tok).tokens
    loader = PackedLoader(
        tokens, args.seq_len, args.batch_size, model.hasher, seed=args.seed, prefetch=0
    )
    layers = {
        e.layer_id: Layer(
            e.layer_id, spec.layer_rows(e.layer_id), e.offsets.numel(), spec.row_dim, []
        )
        for e in model.engram_layers
    }
    offsets = {e.layer_id: e.offsets for e in model.engram_layers}
    for batch in loader.batches(args.batches):
        for layer_id, rows in batch.rows.items():
            ids = torch.unique(rows + offsets[layer_id])  # sorted
            layers[layer_id].batches.append(ids.numpy().astype(np.int64))
    info = {
        "vocab_size": tok.vocab_size,
        "train_tokens": len(tokens),
        "batches_per_epoch": loader.batches_per_epoch,
    }
    return list(layers.values()), info


def stream_stats(layer: Layer) -> dict:
    sizes = np.array([b.size for b in layer.batches])
    pairs = [np.union1d(a, b).size for a, b in zip(layer.batches, layer.batches[1:], strict=False)]
    touched = np.unique(np.concatenate(layer.batches)).size
    return {
        "table_rows": layer.num_rows,
        "heads": layer.heads,
        "unique_rows_per_batch": {
            "mean": float(sizes.mean()),
            "min": int(sizes.min()),
            "max": int(sizes.max()),
            "share_of_table": float(sizes.mean() / layer.num_rows),
        },
        # Rows pinned at once with a prefetch depth of 1: the largest union of two neighbours.
        "pinned_rows_depth1_max": int(max(pairs)) if pairs else int(sizes.max()),
        "touched_rows": int(touched),
        "touched_share": touched / layer.num_rows,
    }


# ---- the policies: each returns the hits of every batch --------------------------------------
def run_lfu_prefetch(layer: Layer, backing: HostStore, capacity: int) -> np.ndarray:
    """CachedStore as training will use it: pin(n+1) before unpin(n)."""
    cache = CachedStore(backing, capacity)
    hits, held = [], None
    for ids in layer.batches:
        rows = torch.from_numpy(ids)
        before = cache.stats.hits
        cache.pin(rows)  # the prefetch of this batch, while the previous one is still pinned
        hits.append(cache.stats.hits - before)
        if held is not None:
            cache.unpin(held)  # the previous step is done
        held = rows
    cache.unpin(held)
    cache.check_invariants()
    return np.array(hits)


def run_lfu(layer: Layer, backing: HostStore, capacity: int, chunk: int) -> np.ndarray:
    """CachedStore without prefetch: each batch pinned and unpinned, in chunks of `chunk`."""
    cache = CachedStore(backing, capacity)
    hits = []
    for ids in layer.batches:
        before = cache.stats.hits
        for start in range(0, ids.size, chunk):
            rows = torch.from_numpy(ids[start : start + chunk])
            cache.pin(rows)
            cache.unpin(rows)
        hits.append(cache.stats.hits - before)
    cache.check_invariants()
    return np.array(hits)


def run_lru(layer: Layer, capacity: int, chunk: int) -> np.ndarray:
    """Plain LRU over row ids, fed the same chunks as `run_lfu`."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = []
    for ids in layer.batches:
        h = 0
        for start in range(0, ids.size, chunk):
            misses = []
            for row in ids[start : start + chunk].tolist():
                if row in cache:
                    cache.move_to_end(row)
                    h += 1
                else:
                    misses.append(row)
            for row in misses:
                cache[row] = None
            for _ in range(len(cache) - capacity):  # the chunk's rows sit at the newest end
                cache.popitem(last=False)
        hits.append(h)
    return np.array(hits)


def run_belady(layer: Layer, capacity: int) -> np.ndarray:
    """Offline optimum: after each batch keep the `capacity` rows whose next use is soonest."""
    n = len(layer.batches)
    never = n  # "not used again"
    upcoming = np.full(layer.num_rows, never, dtype=np.int64)
    next_use = [np.empty(0, dtype=np.int64)] * n
    for b in range(n - 1, -1, -1):  # next batch using each row of batch b
        ids = layer.batches[b]
        next_use[b] = upcoming[ids].copy()
        upcoming[ids] = b
    resident = np.zeros(layer.num_rows, dtype=bool)
    res_rows = np.empty(0, dtype=np.int64)
    res_next = np.empty(0, dtype=np.int64)
    hits = []
    for b, ids in enumerate(layer.batches):
        hits.append(int(resident[ids].sum()))
        in_batch = np.zeros(layer.num_rows, dtype=bool)
        in_batch[ids] = True
        keep = ~in_batch[res_rows]  # resident rows this batch does not use keep their next use
        rows = np.concatenate([res_rows[keep], ids])
        nxt = np.concatenate([res_next[keep], next_use[b]])
        alive = nxt < never
        rows, nxt = rows[alive], nxt[alive]
        if rows.size > capacity:
            chosen = np.argpartition(nxt, capacity - 1)[:capacity]
            rows, nxt = rows[chosen], nxt[chosen]
        resident[res_rows] = False
        resident[rows] = True
        res_rows, res_next = rows, nxt
    return np.array(hits)


def run_seen_before(layer: Layer) -> np.ndarray:
    seen = np.zeros(layer.num_rows, dtype=bool)
    hits = []
    for ids in layer.batches:
        hits.append(int(seen[ids].sum()))
        seen[ids] = True
    return np.array(hits)


def rates(hits: np.ndarray, lookups: np.ndarray, warm_from: int) -> dict:
    return {
        "warm": float(hits[warm_from:].sum() / lookups[warm_from:].sum()),
        "overall": float(hits.sum() / lookups.sum()),
    }


# ---- one layer ---------------------------------------------------------------------------------
def measure_layer(
    layer: Layer, divisors: tuple[int, ...], warm_skip: float, chunk_share: float, seed: int
) -> dict:
    stats = stream_stats(layer)
    lookups = np.array([b.size for b in layer.batches])
    warm_from = min(len(lookups) - 1, math.ceil(warm_skip * len(lookups)))
    need = stats["pinned_rows_depth1_max"]
    layout = TableLayout(layer.num_rows, layer.dim, ())  # rows only: no optimiser state
    backing = HostStore(layout, RowInit(seed=seed, table_id=layer.layer_id, std=1.0))
    seconds = dict.fromkeys(POLICIES, 0.0)
    sizes = []
    for divisor in divisors:
        capacity = max(1, layer.num_rows // divisor)
        chunk = max(1, int(capacity * chunk_share))
        entry: dict = {
            "fraction": 1 / divisor,
            "label": f"1/{divisor}",
            "capacity": capacity,
            "chunk_rows": chunk,
            "capacity_over_batch_rows": capacity / stats["unique_rows_per_batch"]["mean"],
            "hit_rate": {},
        }
        for policy in POLICIES:
            t0 = time.perf_counter()
            if policy == "lfu_prefetch":
                if capacity < need:
                    entry["hit_rate"][policy] = None
                    entry["lfu_prefetch_note"] = (
                        f"not feasible: {need} rows are pinned at once (two batches), "
                        f"the cache holds {capacity}"
                    )
                    continue
                hits = run_lfu_prefetch(layer, backing, capacity)
            elif policy == "lfu":
                hits = run_lfu(layer, backing, capacity, chunk)
            elif policy == "lru":
                hits = run_lru(layer, capacity, chunk)
            else:
                hits = run_belady(layer, capacity)
            seconds[policy] += time.perf_counter() - t0
            entry["hit_rate"][policy] = rates(hits, lookups, warm_from)
        sizes.append(entry)
    backing.close()
    seen = rates(run_seen_before(layer), lookups, warm_from)
    return {
        **stats,
        "warm_from_batch": warm_from,
        "seen_before": seen,
        "sizes": sizes,
        "policy_seconds": seconds,
    }


# ---- output ------------------------------------------------------------------------------------
def fmt(rate: dict | None, key: str) -> str:
    return "     n/a" if rate is None else f"{rate[key]:8.3f}"


def print_layer(layer_id: int, res: dict) -> None:
    u = res["unique_rows_per_batch"]
    print(
        f"\nEngram layer {layer_id}: {res['table_rows']} rows ({res['heads']} heads); unique "
        f"rows per batch {u['mean']:.0f} (min {u['min']}, max {u['max']}, "
        f"{u['share_of_table']:.1%} of the table); pinned at once with prefetch 1: up to "
        f"{res['pinned_rows_depth1_max']}; touched in the run: {res['touched_rows']} "
        f"({res['touched_share']:.1%}); rows seen before: warm {res['seen_before']['warm']:.3f}, "
        f"overall {res['seen_before']['overall']:.3f}"
    )
    head = f"{'cache':>6}{'rows':>8}{'x batch':>8}"
    for policy in POLICIES:
        head += f"{policy[:12]:>14}"
    print("hit rate, warm (overall):")
    print(head)
    for s in res["sizes"]:
        line = f"{s['label']:>6}{s['capacity']:>8}{s['capacity_over_batch_rows']:>8.2f}"
        for policy in POLICIES:
            r = s["hit_rate"][policy]
            cell = "n/a" if r is None else f"{r['warm']:.3f} ({r['overall']:.3f})"
            line += f"{cell:>14}"
        print(line)


def plot(record: dict, path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    layers = record["results"]["layers"]
    fig, axes = plt.subplots(1, len(layers), figsize=(7 * len(layers), 4.8), dpi=120, squeeze=False)
    cfg = record["config"]
    for ax, (layer_id, res) in zip(axes[0], layers.items(), strict=True):
        x = [s["fraction"] for s in res["sizes"]]
        for policy, style in zip(POLICIES, ("o-", "s-", "^--", ":"), strict=True):
            pts = [
                (s["fraction"], s["hit_rate"][policy]["warm"])
                for s in res["sizes"]
                if s["hit_rate"][policy] is not None
            ]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, style, label=LABELS[policy], markersize=5)
        ax.axhline(
            res["seen_before"]["warm"], color="grey", ls="--", lw=1, label=LABELS["seen_before"]
        )
        n = res["table_rows"]
        ax.axvline(res["unique_rows_per_batch"]["mean"] / n, color="k", ls=":", lw=0.8)
        ax.axvline(res["pinned_rows_depth1_max"] / n, color="k", ls="-.", lw=0.8)
        ax.text(res["unique_rows_per_batch"]["mean"] / n, 0.02, " 1 batch", fontsize=7)
        ax.text(res["pinned_rows_depth1_max"] / n, 0.08, " 2 batches pinned", fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [s["label"] for s in res["sizes"]])
        ax.set_ylim(0, 1)
        ax.set_xlabel("cache size (fraction of the table's rows)")
        ax.set_ylabel(f"warm hit rate (unique rows; after batch {res['warm_from_batch']})")
        ax.set_title(
            f"{cfg['preset']} layer {layer_id}: {n} rows, {cfg['batches']} batches of "
            f"{cfg['batch_size']}x{cfg['seq_len']}"
        )
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = TrainConfig()
    ap.add_argument("--batches", type=int, default=300, help="training batches to replay")
    ap.add_argument("--quick", action="store_true", help="a tiny run (30 batches), files to /tmp")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--scale", type=int, default=1, help="table size x the preset's")
    ap.add_argument("--tokenizer", default="bpe:2048")
    ap.add_argument("--data", default="default")
    ap.add_argument("--seq-len", type=int, default=defaults.seq_len)
    ap.add_argument("--batch-size", type=int, default=defaults.batch_size)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warm-skip", type=float, default=0.1, help="share of batches left out")
    ap.add_argument(
        "--chunk-share",
        type=float,
        default=0.25,
        help="lfu/lru without prefetch: rows per pin call, as a share of the capacity",
    )
    ap.add_argument("--out", type=Path, default=None, help=f"JSON path (default {OUT})")
    args = ap.parse_args(argv)
    if args.quick:
        args.batches = min(args.batches, 30)
    if args.batches < 2 or not 0 <= args.warm_skip < 1 or not 0 < args.chunk_share <= 1:
        ap.error("--batches must be >= 2, --warm-skip in [0, 1) and --chunk-share in (0, 1]")
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "cache_hit_rate_quick.json" if args.quick else OUT
    torch.set_num_threads(1)

    t_start = time.perf_counter()
    layers, info = replay_stream(args)
    t_stream = time.perf_counter() - t_start
    results: dict = {"layers": {}}
    for layer in layers:
        res = measure_layer(layer, DIVISORS, args.warm_skip, args.chunk_share, args.seed)
        results["layers"][str(layer.layer_id)] = res
    total = time.perf_counter() - t_start
    results["seconds"] = {"stream": t_stream, "total": total}

    print(
        f"Hot-row cache hit rate: preset {args.preset}, tokenizer {args.tokenizer}, data "
        f"{args.data}, {args.batches} batches of {args.batch_size}x{args.seq_len}, seed "
        f"{args.seed}; hit rate over each batch's unique rows"
    )
    for layer_id, res in results["layers"].items():
        print_layer(int(layer_id), res)
    print(f"\n{total:.1f} s ({t_stream:.1f} s replaying the stream)")

    machine = machine_info()
    record = {
        "benchmark": "cache_hit_rate",
        "machine": {k: machine[k] for k in ("platform", "processor", "cpu_count", "torch_threads")},
        "versions": {
            "python": machine["python"],
            "torch": machine["torch"],
            "numpy": np.__version__,
        },
        "commit": machine["commit"],
        "commit_dirty": machine["commit_dirty"],
        "config": {
            "preset": args.preset,
            "table_scale": args.scale,
            "tokenizer": args.tokenizer,
            "data": args.data,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "batches": args.batches,
            "warm_skip": args.warm_skip,
            "chunk_share": args.chunk_share,
            "cache_fractions": [f"1/{d}" for d in DIVISORS],
            "hit_rate_unit": "unique rows per batch",
            "policies": {p: LABELS[p] for p in (*POLICIES, "seen_before")},
            "command": " ".join(["python", sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
            **info,
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, record)
    png = plot(record, args.out.with_suffix(".png"))
    print(f"wrote {args.out}" + (f" and {png}" if png else ""))
    print(json.dumps(record))


if __name__ == "__main__":
    sys.exit(main())
