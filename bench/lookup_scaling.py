"""O(1) lookup: forward+backward time per token of one Engram layer as its table grows.

One Engram layer (d=256, M=1, orders 2-3, 8 heads of 16 dims) with tables of about 1e5, 1e6,
1e7 and 1e8 rows (8 prime-sized heads each), sparse table gradients as in training. The same
hidden states and token ids go through every size; sizes are interleaved over the repeats.
Flat is the goal: the cost of a lookup should not depend on how many rows the table holds.
Reports the median time per token and the ratio largest/smallest.

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

from engram.experiments.report import machine_info
from engram.hashing import NgramHasher
from engram.module import Engram, EngramConfig
from engram.spec import SpecConfig, resolve
from engram.tokenizer import load_tokenizer
from engram.vocab import compress


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1e5,1e6,1e7,1e8", help="approximate table rows")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path("bench/results/lookup_scaling.json"))
    args = ap.parse_args()
    device = torch.device(args.device)

    tok = load_tokenizer("deepseek")
    vocab = compress(tok)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tok.vocab_size, (args.batch, args.seq), generator=gen)
    hidden = torch.randn(args.batch, args.seq, args.d, generator=gen).to(device)
    layers = {}
    for target in (int(float(r)) for r in args.rows.split(",")):
        base = max(2, target // 8)
        spec = resolve(
            SpecConfig(
                tokenizer="deepseek",
                layer_ids=(0,),
                orders=(2, 3),
                heads_per_order=4,
                base_sizes=(base, base),
                row_dim=16,
            ),
            tokenizer=tok,
            vocab=vocab,
        )
        torch.manual_seed(0)
        module = Engram(spec, 0, EngramConfig(hidden_size=args.d)).to(device)
        module.table.sparse = True  # as the trainer sets it: gradients only for read rows
        rows = NgramHasher(spec, vocab)(ids)[0].to(device)
        layers[spec.layer_rows(0)] = (module, rows)
        print(f"built table of {spec.layer_rows(0):,} rows", file=sys.stderr, flush=True)

    def run(module, rows) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        module(hidden, rows).float().square().mean().backward()
        module.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for module, rows in layers.values():
        run(module, rows)
        run(module, rows)
    times: dict[int, list[float]] = {n: [] for n in layers}
    for r in range(args.repeats):
        order = list(layers) if r % 2 == 0 else list(reversed(layers))
        for n in order:
            times[n].append(run(*layers[n]))
    tokens = args.batch * args.seq
    per_token = {n: statistics.median(t) / tokens * 1e6 for n, t in times.items()}
    sizes = sorted(per_token)
    ratio = per_token[sizes[-1]] / per_token[sizes[0]]
    print(
        f"Engram layer forward+backward, {args.batch} x {args.seq} tokens, d={args.d}, "
        f"{device.type}:"
    )
    for n in sizes:
        print(f"  {n:>13,} rows  {per_token[n]:8.3f} us/token")
    print(f"  ratio largest/smallest: {ratio:.3f}")
    record = {
        "benchmark": "lookup_scaling",
        "machine": machine_info(),
        "config": {
            "batch": args.batch,
            "seq": args.seq,
            "d": args.d,
            "heads": 8,
            "row_dim": 16,
            "repeats": args.repeats,
            "device": device.type,
        },
        "results": {
            "us_per_token": {str(n): per_token[n] for n in sizes},
            "ratio_largest_smallest": ratio,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    sys.exit(main())
