"""What one call of a tiny compiled function costs: eager, `torch.compile`, AOTInductor.

Why `engram.inference.compiled` uses AOTInductor for decode steps: the same small function,
`sigmoid(x * y).sum(-1) + 1` on [1, 64] tensors (a few hundred FLOPs, as each piece of a decode
step is), called eagerly, through `torch.compile` (default and C++ wrapper) and through an
AOTInductor package (its runner called with a flat list, as `AotFunction` does). Calls of the
variants are interleaved; the median of many single calls is reported, under inference mode.

A runner's call also costs something per input tensor, used or not, which matters to a captured
decode step (`engram.inference.captured`) that takes hundreds of weights: the same function
with 62 and 510 more inputs it does not read, and the cost per input from the three runners.

The last line of output is one JSON record (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from engram.experiments.report import machine_info


def tiny(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x * y).sum(-1) + 1


class Tiny(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor, *unread: torch.Tensor) -> torch.Tensor:
        return tiny(x, y)


def aoti_runner(x: torch.Tensor, y: torch.Tensor, directory: str, inputs: int = 2):
    """The runner of `tiny` compiled with `inputs` inputs in all (those past x and y unread)."""
    unread = [torch.zeros(4) for _ in range(inputs - 2)]
    program = torch.export.export(Tiny(), (x, y, *unread))
    path = torch._inductor.aoti_compile_and_package(
        program,
        package_path=f"{directory}/tiny-{inputs}.pt2",
        inductor_configs={"cpp.threads": 1},
    )
    run = torch._inductor.aoti_load_package(path).loader.run
    return lambda a, b: run([a, b, *unread])


WIDE = (64, 512)  # inputs in all of the wider runners


def per_input(results: dict) -> float:
    """The least-squares slope of a runner call's median time over its number of inputs."""
    points = [(2, results["AOTInductor runner"]["median_us"])]
    points += [(n, results[f"AOTInductor runner, {n} inputs"]["median_us"]) for n in WIDE]
    mean_n = statistics.mean(n for n, _ in points)
    mean_t = statistics.mean(t for _, t in points)
    num = sum((n - mean_n) * (t - mean_t) for n, t in points)
    return num / sum((n - mean_n) ** 2 for n, _ in points)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000, help="timed calls per variant")
    ap.add_argument("--out", type=Path, default=Path("bench/results/call_overhead.json"))
    args = ap.parse_args()
    x, y = torch.randn(1, 64), torch.randn(1, 64)
    with tempfile.TemporaryDirectory() as tmp:
        variants = {
            "eager": tiny,
            "torch.compile": torch.compile(tiny, dynamic=False, fullgraph=True),
            "torch.compile, C++ wrapper": torch.compile(
                tiny, dynamic=False, fullgraph=True, options={"cpp_wrapper": True}
            ),
            "AOTInductor runner": aoti_runner(x, y, tmp),
            **{f"AOTInductor runner, {n} inputs": aoti_runner(x, y, tmp, n) for n in WIDE},
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        with torch.inference_mode():
            want = tiny(x, y)
            for fn in variants.values():  # compile, warm up, check
                for _ in range(100):
                    got = fn(x, y)
                got = got[0] if isinstance(got, list) else got
                torch.testing.assert_close(got, want)
            for _ in range(args.calls):
                for name, fn in variants.items():
                    t0 = time.perf_counter()
                    fn(x, y)
                    times[name].append(time.perf_counter() - t0)
    results = {name: {"median_us": statistics.median(t) * 1e6} for name, t in times.items()}
    for name, r in results.items():
        print(f"{name:<34} {r['median_us']:7.2f} us a call")
    results["AOTInductor runner, per input"] = {"us": per_input(results)}
    print(f"an AOTInductor runner's cost per input: {per_input(results):.3f} us")
    record = {
        "benchmark": "call_overhead",
        "machine": machine_info(),
        "config": {
            "function": "sigmoid(x * y).sum(-1) + 1",
            "shape": [1, 64],
            "calls": args.calls,
            "runner_inputs": [2, *WIDE],
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    sys.exit(main())
