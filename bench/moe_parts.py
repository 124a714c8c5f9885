"""Where a training step's extra cost goes, part by part, each variant against the others.

`bench/moe_step.py` times whole steps; this times the four parts issue 16 changed, in one
process, variants interleaved, median of `--repeats`:

1. AdamW over the `demo` MoE model's parameters (418 tensors, 64 experts per layer): torch's
   CPU default (a per-tensor loop), `foreach=True`, `fused=True`;
2. top-k routing indices over [4096, 64] scores: `torch.topk` against `engram.model.moe._top_k`
   (k passes of argmax for k <= 4), for k = 1, 2, 4, 8;
3. one MoE layer of the demo's shape, forward + backward on 4,096 tokens: the per-expert loop,
   the sorted dispatch, grouped GEMMs, and a dense SwiGLU of the same activated width (384);
4. the Engram table's optimiser step on one batch's sparse gradient (the `demo` spec's table,
   8 heads x 14,759 rows x 16, 16 x 256 tokens): torch's SparseAdam against
   `engram.optim.IndexedSparseAdam` (the same results bit for bit, checked first).

The last line of output is one JSON record (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engram.experiments.report import machine_info, write_json
from engram.model import EngramLM, model_preset
from engram.model.layers import SwiGLU
from engram.model.moe import MoE, _top_k
from engram.optim import IndexedSparseAdam


def interleaved(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms of each case, the cases run in turn every repeat (after one warm-up each)."""
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def adamw_cases() -> tuple[dict[str, Callable], int]:
    torch.manual_seed(0)
    params = list(EngramLM(model_preset("demo").with_(engram=None)).parameters())
    cases = {}
    for name, kwargs in (
        ("default", {}),
        ("foreach", {"foreach": True}),
        ("fused", {"fused": True}),
    ):
        copies = [p.detach().clone().requires_grad_() for p in params]
        for p in copies:
            p.grad = torch.randn_like(p) * 1e-3
        cases[f"adamw {name}"] = torch.optim.AdamW(copies, lr=1e-3, **kwargs).step
    return cases, len(params)


def topk_cases() -> dict[str, Callable]:
    scores = torch.rand(4096, 64, generator=torch.Generator().manual_seed(0))
    cases = {}
    for k in (1, 2, 4, 8):
        if not torch.equal(_top_k(scores, k), torch.topk(scores, k, dim=-1).indices):
            raise AssertionError(f"_top_k differs from torch.topk at k = {k}")
        cases[f"topk k={k}"] = lambda k=k: torch.topk(scores, k, dim=-1)
        cases[f"argmax passes k={k}"] = lambda k=k: _top_k(scores, k)
    return cases


def moe_layer_cases() -> dict[str, Callable]:
    torch.manual_seed(0)
    moe = MoE(128, model_preset("demo").moe).train()
    dense = SwiGLU(128, 384)
    x = torch.randn(4096, 128, requires_grad=True)

    def step(module: torch.nn.Module, dispatch: str | None = None) -> Callable[[], None]:
        def run() -> None:
            module.dispatch = dispatch
            module.zero_grad(set_to_none=True)
            x.grad = None
            module(x).square().mean().backward()

        return run

    cases = {f"moe layer {d}": step(moe, d) for d in ("loop", "sorted", "grouped")}
    return cases | {"dense layer (384)": step(dense)}


def table_step_cases() -> dict[str, Callable]:
    heads, rows_per_head, dim = 8, 14759, 16  # the demo spec's table (primes near 14,759)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, rows_per_head, (16, 256, heads), generator=gen)
    rows += torch.arange(heads) * rows_per_head  # each head's rows start at its offset
    init = torch.randn(heads * rows_per_head, dim, generator=gen) * 0.02
    cases, weights = {}, []
    for cls in (torch.optim.SparseAdam, IndexedSparseAdam):
        emb = torch.nn.Embedding(len(init), dim, sparse=True, _weight=init.clone())
        emb(rows).square().sum().backward()  # one batch's gradient, kept for every step
        opt = cls(emb.parameters(), lr=1e-3, betas=(0.9, 0.95))
        for _ in range(2):
            opt.step()
        weights.append(emb.weight.detach())
        cases[f"table step {cls.__name__}"] = opt.step
    if not torch.equal(*weights):
        raise AssertionError("IndexedSparseAdam differs from SparseAdam")
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/moe_parts.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    adamw, tensors = adamw_cases()
    ms = interleaved(adamw, args.repeats)
    ms |= interleaved(topk_cases(), args.repeats)
    ms |= interleaved(moe_layer_cases(), args.repeats)
    ms |= interleaved(table_step_cases(), args.repeats)
    for name, value in ms.items():
        print(f"{name:24s} {value:8.2f} ms")
    record = {
        "benchmark": "moe_parts",
        "machine": machine_info(),
        "config": {"repeats": args.repeats, "adamw_tensors": tensors, "tokens": 4096},
        "results": {"median_ms": ms},
    }
    write_json(args.out, record)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
