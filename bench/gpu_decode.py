"""Cached decoding tokens/s on one GPU: a preset with and without Engram (issue 16).

The `gpu` preset (Engram at blocks 1 and 5) and its backbone without Engram, in eval mode with
fp32 weights as `engram generate` runs them (one backbone's weights in both), decode with the
cache (K/V, N-gram history, conv windows) after the same random prompt, each fed the same fixed
token stream (the argmax a generator takes is computed, then the stream's token fed, so that
both run the same tokens through the same router): `--steps` tokens per measurement, the two
models alternating over `--repeats` rounds after one warm-up round, each waiting for the
device; medians are reported. At batch 1 a step is a chain of small kernels, so this measures
per-step overhead more than arithmetic. Then, on one cached sequence of the Engram model,
steps with Engram on and switched off alternate: the difference is Engram's share of a step
(bench/decode.py does the same on a CPU for the `demo` preset over contexts). A third arm is the
Engram model with its decode steps AOT-compiled (`engram.inference.compiled`). With
`--captured`, two more: both models with each whole step captured (`engram.inference.captured`),
on CUDA replayed as CUDA graphs, checked against the eager models' logits before they are timed.

The last line of output is one JSON record (also written to --out).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
from gpu_models import ARMS, Captured, interleaved, model_pair, record, timed, write

from engram.assembly import pick_device
from engram.inference.compiled import compile_decoding
from engram.model import EngramLM


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpu")
    ap.add_argument("--tokenizer", default="", help="default: the preset's spec tokenizer")
    ap.add_argument("--device", default="auto", help="auto, cuda, cpu...")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens before decoding")
    ap.add_argument("--steps", type=int, default=64, help="decode steps per measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--captured", action="store_true", help="add the captured pair")
    ap.add_argument("--out", type=Path, default=Path("bench/results/gpu_decode.json"))
    args = ap.parse_args()
    if min(args.batch, args.prompt, args.steps, args.repeats) < 1:
        raise SystemExit(
            f"--batch {args.batch}, --prompt {args.prompt}, --steps {args.steps} and "
            f"--repeats {args.repeats} must be >= 1"
        )
    return args


@torch.no_grad()
def decode_seconds(model: EngramLM, prompt: torch.Tensor, stream: torch.Tensor) -> float:
    """Prefill `prompt` into a fresh cache (untimed), then time decoding `stream` [steps, B, 1]."""
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + stream.shape[0])
    model(prompt, cache=cache)

    def loop() -> None:
        for token in stream:
            model(token, cache=cache)[:, -1].argmax(-1, keepdim=True)

    return timed(loop, prompt.device)


@torch.no_grad()
def captured_error(
    model: EngramLM, captured: Captured, prompt: torch.Tensor, stream: torch.Tensor
) -> float:
    """The largest logit difference between the model's cached decoding and its captured
    steps over `stream`, fed alike."""
    caches = [model.new_cache(prompt.shape[0], prompt.shape[1] + stream.shape[0]) for _ in "ab"]
    model(prompt, cache=caches[0])
    captured(prompt, caches[1])
    return max(
        float((model(t, cache=caches[0]) - captured(t, caches[1])).abs().max()) for t in stream
    )


@torch.no_grad()
def engram_share(model: EngramLM, prompt: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median step time with Engram on and off, alternating on one cached sequence."""
    device = prompt.device
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + 2 * repeats + 4)
    model(prompt, cache=cache)
    token = prompt[:, -1:]
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(2 * repeats + 2):  # the first two steps warm up
        off = r % 2 == 1
        seconds = timed(lambda off=off: model(token, cache=cache, engram_off=off), device)
        if r >= 2:
            times[off].append(seconds)
    on, off = statistics.median(times[False]), statistics.median(times[True])
    return {"step_ms": on * 1e3, "engram_off_ms": off * 1e3, "engram_share": (on - off) / on}


def summarise(seconds: dict[str, list[float]], tokens: int, steps: int) -> dict:
    """Tokens/s and ms per step of each arm (median of its rounds), and the ratios."""
    results: dict = {}
    for arm, times in seconds.items():
        loop = statistics.median(times)
        results[arm] = {
            "tokens_per_s": tokens / loop,
            "ms_per_step": loop / steps * 1e3,
            "ms_per_step_min": min(times) / steps * 1e3,
            "ms_per_step_max": max(times) / steps * 1e3,
        }

    def ratio(a: str, b: str) -> float:
        return results[a]["tokens_per_s"] / results[b]["tokens_per_s"]

    results["ratio"] = ratio("with", "without")
    results["ratio_compiled"] = ratio("with_compiled", "without")
    if "captured_with" in seconds:
        results["ratio_captured"] = ratio("captured_with", "captured_without")
    return results


def show(results: dict, arms: tuple[str, ...], args: argparse.Namespace) -> None:
    print(f"decode, batch {args.batch}, {args.prompt}-token prompt, {args.steps} steps:")
    for arm in arms:
        r = results[arm]
        print(f"  {arm:<16} {r['tokens_per_s']:9.1f} tokens/s  {r['ms_per_step']:7.2f} ms/step")
    if "ratio_captured" in results:
        print(
            f"  captured with/without: {results['ratio_captured']:.3f}; largest logit "
            f"difference from the eager models: {results['captured_max_logit_error']}"
        )
    e = results["engram_step"]
    print(
        f"  ratio with/without: {results['ratio']:.3f} (compiled {results['ratio_compiled']:.3f});"
        f" Engram's part of an eager step "
        f"{e['step_ms'] - e['engram_off_ms']:.3f} of {e['step_ms']:.3f} ms"
    )


def main() -> None:
    args = parse_args()
    device = pick_device(args.device)
    models, tok = model_pair(args.preset, args.tokenizer, device)
    for model in models.values():
        model.eval()
    share_repeats = 3 * args.repeats  # one-step timings are noisier than whole decodes
    capacity = args.prompt + max(args.steps, 2 * share_repeats + 4)
    if capacity > models["with"].config.max_seq_len:
        raise SystemExit(
            f"--prompt {args.prompt} plus the decode steps exceed the preset's max_seq_len "
            f"{models['with'].config.max_seq_len}"
        )
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, tok.vocab_size, (args.batch, args.prompt), generator=gen)
    stream = torch.randint(0, tok.vocab_size, (args.steps, args.batch, 1), generator=gen)
    prompt, stream = prompt.to(device), stream.to(device)
    # A third arm: the Engram model with its decode steps AOT-compiled (compiled here,
    # before the clock, or loaded from the cache of an earlier run).
    models["with_compiled"] = compile_decoding(copy.deepcopy(models["with"]), args.batch)
    arms = (*ARMS, "with_compiled")
    errors = {}
    if args.captured:  # compiled here (minutes the first time), then checked
        for arm in ARMS:
            models[f"captured_{arm}"] = Captured(models[arm], cuda_graph=device.type == "cuda")
            errors[arm] = captured_error(models[arm], models[f"captured_{arm}"], prompt, stream)
        arms = (*arms, "captured_without", "captured_with")
    seconds = interleaved(
        lambda arm: decode_seconds(models[arm], prompt, stream), 1, args.repeats, arms
    )
    results = summarise(seconds, args.batch * args.steps, args.steps)
    if args.captured:
        results["captured_max_logit_error"] = errors
    results["engram_step"] = engram_share(models["with"], prompt, share_repeats)
    show(results, arms, args)
    config = {
        "preset": args.preset,
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "device": str(device),
        "weights": "fp32",
        "batch": args.batch,
        "prompt": args.prompt,
        "steps": args.steps,
        "repeats": args.repeats,
        "captured": args.captured,
        "cuda_graph": args.captured and device.type == "cuda",
    }
    write(record("gpu_decode", device, config, results), args.out)


if __name__ == "__main__":
    sys.exit(main())
