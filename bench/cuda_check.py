"""CUDA checks and numbers for the core, meant for one short run on a lent GPU machine.

1. The hasher on CUDA is bit-exact with the hasher on CPU (demo-v1, B=8, T=4096) and how fast it
   is there (CUDA events), beside the CPU torch hasher in the same run.
2. The Engram module (demo-v1 layer 1, d=2560, M=4, as the 27B backbone's width): forward and
   forward+backward tokens/s in fp32 and under bf16 autocast, and CUDA vs CPU agreement on a small
   input.

Prints a table; the last line is one JSON record (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from engram import Engram, EngramConfig, NgramHasher, compress, load_tokenizer, resolve


def cuda_time(fn, warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds of `fn()` measured with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def cpu_time(fn, warmup: int = 2, repeats: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def check_hashing(spec, vocab, batch: int, seq: int) -> dict:
    hasher = NgramHasher(spec, vocab)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (batch, seq), generator=gen)
    cpu_rows, _ = hasher.hash_stacked(ids)
    gpu_ids = ids.cuda()
    gpu_rows, _ = hasher.hash_stacked(gpu_ids)
    exact = bool(torch.equal(gpu_rows.cpu(), cpu_rows))
    gpu_ms = cuda_time(lambda: hasher.hash_stacked(gpu_ids))
    cpu_ms = cpu_time(lambda: hasher.hash_stacked(ids))
    tokens = batch * seq
    return {
        "batch": batch,
        "seq": seq,
        "bit_exact": exact,
        "cuda_ms": gpu_ms,
        "cpu_ms": cpu_ms,
        "cuda_tokens_per_s": tokens / gpu_ms * 1e3,
        "cpu_tokens_per_s": tokens / cpu_ms * 1e3,
    }


def check_module(spec, vocab, d: int, branches: int, batch: int, seq: int) -> dict:
    torch.manual_seed(0)
    layer = spec.layer_ids[0]
    module = Engram(spec, layer, EngramConfig(hidden_size=d, num_branches=branches)).cuda()
    with torch.no_grad():  # a non-zero conv so the check covers the whole forward
        module.conv.conv.weight.normal_(std=0.1)
    hasher = NgramHasher(spec, vocab)
    ids = torch.randint(0, spec.vocab_size, (batch, seq), device="cuda")
    rows = hasher(ids)[layer]
    hidden = torch.randn(batch, seq, branches, d, device="cuda", requires_grad=True)

    def fwd():
        with torch.no_grad():
            module(hidden, rows)

    def fwd_bwd(dtype=None):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype is not None):
            y = module(hidden, rows)
        y.float().square().mean().backward()

    tokens = batch * seq
    out = {
        "d": d,
        "branches": branches,
        "batch": batch,
        "seq": seq,
        "table_rows": module.table.num_embeddings,
        "table_params": module.table_params,
    }
    for name, fn in (
        ("fwd_fp32", fwd),
        ("fwd_bwd_fp32", fwd_bwd),
        ("fwd_bwd_bf16_autocast", lambda: fwd_bwd(torch.bfloat16)),
    ):
        ms = cuda_time(fn)
        out[name] = {"ms": ms, "tokens_per_s": tokens / ms * 1e3}

    # Agreement with CPU on a slice (fp32; TF32 off by default for matmuls).
    small_h, small_r = hidden[:1, :256].detach(), rows[:1, :256]
    gpu_y = module(small_h, small_r).detach().cpu()
    cpu_y = module.cpu()(small_h.cpu(), small_r.cpu()).detach()
    diff = (gpu_y - cpu_y).abs()
    out["cpu_vs_cuda_max_abs"] = float(diff.max())
    out["cpu_vs_cuda_mean_abs"] = float(diff.mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/cuda_check.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script is for a GPU machine")
    tok = load_tokenizer("deepseek")
    vocab = compress(tok)
    spec = resolve("demo-v1", tokenizer=tok, vocab=vocab)

    record = {
        "benchmark": "cuda_check",
        "device": torch.cuda.get_device_name(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        },
    }
    try:
        record["commit"] = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        record["commit"] = "unknown"
    record["hashing"] = [check_hashing(spec, vocab, 8, 4096), check_hashing(spec, vocab, 64, 4096)]
    record["module"] = check_module(spec, vocab, d=2560, branches=4, batch=4, seq=4096)

    print(f"device {record['device']}, torch {torch.__version__}")
    for h in record["hashing"]:
        print(
            f"hash  B={h['batch']:<3} T={h['seq']}: exact={h['bit_exact']}  cuda "
            f"{h['cuda_tokens_per_s'] / 1e6:8.1f} Mtok/s  cpu {h['cpu_tokens_per_s'] / 1e6:6.1f}"
            f" Mtok/s  ratio {h['cpu_ms'] / h['cuda_ms']:.1f}x"
        )
    m = record["module"]
    for key in ("fwd_fp32", "fwd_bwd_fp32", "fwd_bwd_bf16_autocast"):
        print(
            f"engram d={m['d']} M={m['branches']} {key:<22} {m[key]['ms']:8.2f} ms "
            f"{m[key]['tokens_per_s'] / 1e6:8.2f} Mtok/s"
        )
    print(f"cpu vs cuda max |diff| {m['cpu_vs_cuda_max_abs']:.2e}")
    line = json.dumps(record)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(line)


if __name__ == "__main__":
    main()
