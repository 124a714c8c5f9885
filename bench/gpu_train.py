"""Training tokens/s on one GPU: a preset with and without Engram, bf16 autocast (issue 16).

Both models are the `gpu` preset (105M active parameters, Engram at blocks 1 and 5) and its
backbone without Engram, built as the trainer builds them, each with the trainer's optimisers
(AdamW for the backbone, `--fused` for its fused kernel; sparse Adam for the table at 5x lr).
A step is the trainer's: forward under bf16 autocast, backward, optimiser step (with gradient
clipping), MoE route-bias update, the loss read back; on the same random token ids for both.
Rows come precomputed, as the data loader hands them over from its background thread; hashing
a batch on the CPU is timed apart. Steps of the two models alternate and each waits for the
device, so drift hits both; medians are reported. MFU = tokens/s x
`training_flops_per_token` / `peak_flops` (the device's dense bf16 peak; none on a CPU).

The last line of output is one JSON record (also written to --out).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from gpu_models import ARMS, interleaved, model_pair, record, timed, write

from engram.assembly import autocast_for, peak_flops, pick_device
from engram.config import OptimConfig
from engram.model import EngramLM, ModelConfig
from engram.model.accounting import count_params_from_config, training_flops_per_token
from engram.optim import Optimizers
from engram.tokenizer import Tokenizer


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpu")
    ap.add_argument("--tokenizer", default="", help="default: the preset's spec tokenizer")
    ap.add_argument("--device", default="auto", help="auto, cuda, cpu...")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per model")
    ap.add_argument("--fused", action="store_true", help="AdamW's fused kernel")
    ap.add_argument("--out", type=Path, default=Path("bench/results/gpu_train.json"))
    args = ap.parse_args()
    if min(args.batch, args.seq, args.steps) < 1 or args.warmup < 0:
        raise SystemExit(
            f"--batch {args.batch}, --seq {args.seq} and --steps {args.steps} must be >= 1, "
            f"--warmup {args.warmup} >= 0"
        )
    return args


def arm_results(
    config: ModelConfig, seconds: list[float], tokens: int, seq: int, peak: float | None
) -> dict[str, float | int | None]:
    """One model's numbers from its step times."""
    median = statistics.median(seconds)
    tokens_per_s = tokens / median
    flops = training_flops_per_token(config, seq)
    counts = count_params_from_config(config)
    return {
        "ms_per_step": median * 1e3,
        "ms_per_step_min": min(seconds) * 1e3,
        "ms_per_step_max": max(seconds) * 1e3,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops,
        "model_tflops_per_s": tokens_per_s * flops / 1e12,
        "mfu": tokens_per_s * flops / peak if peak else None,
        "p_act": counts.p_act,
        "p_tot": counts.p_tot,
    }


def step_times(
    models: dict[str, EngramLM], tok: Tokenizer, device: torch.device, args: argparse.Namespace
) -> tuple[dict[str, list[float]], dict[str, float], list[float]]:
    """Seconds per training step of each model (alternating), each one's last loss, and the
    seconds to hash one batch on the CPU."""
    optims = {arm: Optimizers(m, OptimConfig(fused=args.fused)) for arm, m in models.items()}
    gen = torch.Generator().manual_seed(0)
    cpu_ids = torch.randint(0, tok.vocab_size, (args.batch, args.seq), generator=gen)
    ids = cpu_ids.to(device)
    rows = {k: v.to(device) for k, v in models["with"].hash(cpu_ids).items()}
    losses: dict[str, float] = {}

    def step(arm: str) -> None:
        model = models[arm]
        with autocast_for(device, args.precision):
            _, loss = model(ids, rows=rows if arm == "with" else None, targets=ids)
        loss.backward()
        optims[arm].step()
        model.update_route_biases()
        losses[arm] = float(loss.detach())  # the trainer reads every step's loss back too

    times = interleaved(lambda arm: timed(lambda: step(arm), device), args.warmup, args.steps)
    hash_times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        models["with"].hash(cpu_ids)
        hash_times.append(time.perf_counter() - start)
    return times, losses, hash_times


def show(results: dict, args: argparse.Namespace) -> None:
    print(f"train step, {args.batch} x {args.seq} tokens, {args.precision}, median of {args.steps}")
    for arm in ARMS:
        r = results[arm]
        mfu = f"  MFU {r['mfu']:.3f}" if r["mfu"] is not None else ""
        print(
            f"  {arm:<8} Engram: {r['ms_per_step']:8.1f} ms  {r['tokens_per_s']:11,.0f} tokens/s"
            f"  {r['model_tflops_per_s']:7.2f} TFLOP/s{mfu}"
        )
    print(
        f"  ratio with/without: {results['ratio']:.3f}   (hashing a batch on the CPU: "
        f"{results['hash_ms_per_batch']:.1f} ms)"
    )


def main() -> None:
    args = parse_args()
    device = pick_device(args.device)
    models, tok = model_pair(args.preset, args.tokenizer, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses, hash_times = step_times(models, tok, device, args)
    tokens, peak = args.batch * args.seq, peak_flops(device)
    results: dict = {
        arm: arm_results(models[arm].config, times[arm], tokens, args.seq, peak) for arm in ARMS
    }
    for arm in ARMS:
        results[arm]["last_loss"] = losses[arm]
    results["ratio"] = results["with"]["tokens_per_s"] / results["without"]["tokens_per_s"]
    results["hash_ms_per_batch"] = statistics.median(hash_times) * 1e3
    results["peak_flops"] = peak
    if device.type == "cuda":
        results["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    show(results, args)
    spec = models["with"].spec
    config = {
        "preset": args.preset,
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "device": str(device),
        "precision": args.precision,
        "batch": args.batch,
        "seq": args.seq,
        "warmup": args.warmup,
        "steps": args.steps,
        "fused": args.fused,
        "table_rows": {str(i): spec.layer_rows(i) for i in spec.layer_ids},
    }
    write(record("gpu_train", device, config, results), args.out)


if __name__ == "__main__":
    sys.exit(main())
