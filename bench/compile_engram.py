"""torch.compile of the Engram layer and the hasher against eager, in one interleaved run.

Both compile with `fullgraph=True` (no graph breaks; tests/test_compile.py counts them), so what
inductor makes of them is what a compiled training step gets for its Engram part. Measured:

- the `demo` preset's Engram layer (d = 128, M = 1, 8 heads of 16), forward + backward on
  B x T tokens with about 1% EOS (document starts inside windows), its table an embedding;
- the hasher on B x T ids for the `demo` spec (1 layer) and for `demo-v1` (2 layers x 16 heads,
  the hashing benchmark's spec), whose rows are checked bit-equal to eager first.

Variants are interleaved (each repeat runs every case), one torch thread by default; the median
is reported. The last line of output is one JSON record (also written to --out).
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
from engram.hashing import NgramHasher
from engram.model import model_preset
from engram.model.decode_cache import document_starts
from engram.module import Engram
from engram.spec import resolve
from engram.tokenizer import load_tokenizer
from engram.vocab import compress


def engram_case(B: int, T: int, gen: torch.Generator, tok, vocab) -> dict[str, Callable]:
    """Forward + backward of the demo's Engram layer, eager and compiled."""
    config = model_preset("demo")
    spec = resolve(config.engram.spec, tokenizer=tok, vocab=vocab)
    ids = torch.randint(0, spec.vocab_size, (B, T), generator=gen)
    ids[ids % 97 == 0] = spec.eos_id
    rows = NgramHasher(spec, vocab)(ids)[spec.layer_ids[0]]
    starts = document_starts(ids, spec.eos_id)
    torch.manual_seed(0)
    layer = spec.layer_ids[0]
    module = Engram(spec, layer, config.engram.module_config(config.d_model, 1))
    hidden = torch.randn(B, T, 1, config.d_model, generator=gen).requires_grad_()
    compiled = torch.compile(module, fullgraph=True)

    def step(fn) -> Callable[[], None]:
        def run() -> None:
            module.zero_grad(set_to_none=True)
            hidden.grad = None
            fn(hidden, rows, starts).sum().backward()

        return run

    return {"engram eager": step(module), "engram compiled": step(compiled)}


def hasher_cases(label: str, spec_config, B: int, T: int, gen, tok, vocab) -> dict[str, Callable]:
    spec = resolve(spec_config, tokenizer=tok, vocab=vocab)
    hasher = NgramHasher(spec, vocab)
    compiled = torch.compile(hasher, fullgraph=True)
    ids = torch.randint(0, spec.vocab_size, (B, T), generator=gen)
    want, got = hasher(ids), compiled(ids)
    if not all(torch.equal(want[k], got[k]) for k in want):
        raise AssertionError(f"compiled hasher rows differ from eager ({label})")
    return {
        f"hasher {label} eager": lambda: hasher(ids),
        f"hasher {label} compiled": lambda: compiled(ids),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16, help="Engram layer batch")
    ap.add_argument("--seq", type=int, default=256, help="Engram layer sequence length")
    ap.add_argument("--hash-batch", type=int, default=8)
    ap.add_argument("--hash-seq", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/results/compile_engram.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = load_tokenizer("deepseek")
    vocab = compress(tok)
    gen = torch.Generator().manual_seed(0)
    cases = engram_case(args.batch, args.seq, gen, tok, vocab)
    for label, spec_config in (("demo", model_preset("demo").engram.spec), ("demo-v1", "demo-v1")):
        cases |= hasher_cases(label, spec_config, args.hash_batch, args.hash_seq, gen, tok, vocab)
    first = {}
    for name, fn in cases.items():  # compiles (cold) and warms up
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    ms = {name: statistics.median(v) for name, v in times.items()}
    speedups = {
        name.removesuffix(" eager"): ms[name] / ms[name.replace("eager", "compiled")]
        for name in ms
        if name.endswith(" eager")
    }
    for name, value in ms.items():
        print(f"{name:28s} {value:8.2f} ms   (first call {first[name]:.1f} s)")
    for name, value in speedups.items():
        print(f"{name}: compiled is {value:.2f}x eager")
    record = {
        "benchmark": "compile_engram",
        "machine": machine_info(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": {"median_ms": ms, "first_call_s": first, "speedup": speedups},
    }
    write_json(args.out, record)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
