"""Training throughput: the Engram model vs the same backbone without Engram, in one run.

Both models are the `demo` preset's backbone (4 blocks of width 128, 64 routed experts top-2),
with the same weights (`share_backbone`: a router of its own would balance the experts its own
way, which is not Engram's cost); one has Engram at block 1 (the iso-parameter plan at rho =
0.8, a 118k-row table), the other none. A step is forward + backward + optimiser step (AdamW
for the backbone, sparse Adam for the table) on the same random token ids; the rows come
precomputed, as the data loader hands them over, and the hashing cost is timed separately.
Steps of the two models are interleaved so that machine noise hits both alike; the median is
reported.

The last line of output is one JSON record (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from gpu_models import share_backbone

from engram.assembly import get_tokenizer
from engram.config import OptimConfig
from engram.experiments.demo import demo_arms
from engram.experiments.report import machine_info
from engram.hashing import NgramHasher
from engram.model import EngramLM, model_preset
from engram.optim import Optimizers
from engram.spec import resolve
from engram.vocab import compress


def build(config, tok, vocab):
    config = config.with_(vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    if config.engram is None:
        return EngramLM(config)
    spec = resolve(config.engram.spec, tokenizer=tok, vocab=vocab, pad_id=tok.pad_id)
    return EngramLM(config, spec, NgramHasher(spec, vocab))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", type=Path, default=Path("bench/results/train_throughput.json"))
    args = ap.parse_args()

    # The demo's tokenizer (a 4096-id BPE of the stdlib corpus, cached after the first run), so
    # the LM head weighs what it weighs in the demo.
    tok = get_tokenizer("bpe:4096", "default")
    vocab = compress(tok)
    arms, plan = demo_arms(model_preset("demo"), 0.8)
    without = build(arms["moe"].with_(moe=arms["engram"].moe), tok, vocab)
    models = {
        "without": without,
        "with": share_backbone(build(arms["engram"], tok, vocab), without),
    }
    opts = {k: Optimizers(m, OptimConfig()) for k, m in models.items()}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tok.vocab_size, (args.batch, args.seq), generator=gen)
    rows = models["with"].hash(ids)

    def step(name: str) -> float:
        t0 = time.perf_counter()
        _, loss = models[name](ids, rows=rows if name == "with" else None, targets=ids)
        loss.backward()
        opts[name].step()
        models[name].update_route_biases()
        return time.perf_counter() - t0

    for name in models:  # warm-up
        step(name)
        step(name)
    times = {name: [] for name in models}
    for r in range(args.repeats):
        for name in list(models) if r % 2 == 0 else list(reversed(models)):
            times[name].append(step(name))
    hash_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        models["with"].hash(ids)
        hash_times.append(time.perf_counter() - t0)

    tokens = args.batch * args.seq
    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: tokens / v for k, v in med.items()}
    ratio = tps["with"] / tps["without"]
    hash_ms = statistics.median(hash_times) * 1e3
    print(f"train step, {args.batch} x {args.seq} tokens, median of {args.repeats}:")
    for k in models:
        print(f"  {k:<8} Engram: {med[k] * 1e3:8.1f} ms  {tps[k]:9,.0f} tokens/s")
    print(f"  ratio with/without: {ratio:.3f}   (hashing in the loader: {hash_ms:.1f} ms/batch)")
    record = {
        "benchmark": "train_throughput",
        "machine": machine_info(),
        "config": {
            "batch": args.batch,
            "seq": args.seq,
            "repeats": args.repeats,
            "preset": "demo",
            "rho": plan.rho,
            "table_rows": plan.table_rows,
            "tokenizer": "bpe:4096",
            "backbone": "shared",
        },
        "results": {
            "tokens_per_s_without": tps["without"],
            "tokens_per_s_with": tps["with"],
            "ratio": ratio,
            "hash_ms_per_batch": hash_ms,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    sys.exit(main())
