"""The MoE's cost in a training step: each way of running the routed experts vs no MoE.

Trains the `demo` recipe's model (Engram included) for `--steps` steps in four arms, interleaved
over `--rounds` rounds in one process: its MoE with the routed experts run one contiguous slice
of expert-sorted tokens each (`MoE.dispatch = "sorted"`, the default on CPUs), as grouped GEMMs
(`"grouped"`, the default on GPUs), as the per-expert loop (`"loop"`, the readable reference),
and `model.moe=none` (the dense FFN of the preset). Reports the median step time of each arm (the
first `--warmup` steps of every run dropped) and the ratios MoE step / dense step. The last line
of output is one JSON record (also written to --out).

The dense arm is the preset's own dense FFN (`ffn_hidden` 384), which has the MoE's activated
width: 1 shared + top-2 routed experts of 128. So the ratio compares equal activated parameters
(the MoE adds only its router).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from engram.cli import train_config
from engram.experiments.report import machine_info, write_json
from engram.model.moe import MoE
from engram.train import Run

ROOT = Path(__file__).resolve().parent.parent


def step_times(overrides: list[str], steps: int, warmup: int, dispatch: str) -> list[float]:
    """Seconds of each training step of a fresh run (loader and tables as `engram train`)."""
    MoE.dispatch = dispatch
    with tempfile.TemporaryDirectory() as out:
        config = train_config(str(ROOT / "recipes" / "demo.toml"), [*overrides, f"out_dir={out}"])
        run = Run(config)
        try:
            batches, times = iter(run.loader), []
            for _ in range(steps):
                batch, pins = run.tables.pin_ahead(next(batches)).result()
                t0 = time.perf_counter()
                run.train_step(batch)
                times.append(time.perf_counter() - t0)
                run.tables.release(pins)
        finally:
            run.close()
            MoE.dispatch = None
    return times[warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench/results/moe_step.json")
    args = parser.parse_args()
    base = ["progress=false", f"steps={args.steps}", "eval_every=1000000"]
    arms = {
        "moe_sorted": (base, "sorted"),
        "moe_grouped": (base, "grouped"),
        "moe_loop": (base, "loop"),
        "dense": ([*base, "model.moe=none"], "sorted"),
    }
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for _ in range(args.rounds):
        for arm, (overrides, dispatch) in arms.items():
            times[arm] += step_times(overrides, args.steps, args.warmup, dispatch)
    ms = {arm: statistics.median(t) * 1e3 for arm, t in times.items()}
    record = {"bench": "moe_step", "machine": machine_info(), "config": vars(args)}
    record["torch_threads"] = torch.get_num_threads()
    record["step_ms_median"] = ms
    record["ratios"] = {
        "moe_sorted_over_dense": ms["moe_sorted"] / ms["dense"],
        "moe_grouped_over_dense": ms["moe_grouped"] / ms["dense"],
        "moe_loop_over_dense": ms["moe_loop"] / ms["dense"],
        "grouped_over_loop": ms["moe_grouped"] / ms["moe_loop"],
        "sorted_over_loop": ms["moe_sorted"] / ms["moe_loop"],
    }
    for arm, value in ms.items():
        print(f"{arm:12s} {value:8.1f} ms per step")
    print(json.dumps(record["ratios"]))
    write_json(Path(args.out), record)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
