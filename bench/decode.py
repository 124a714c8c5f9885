"""Cached decoding speed: the Engram model vs the same backbone without Engram, in one run.

Two measurements, both with the decoding cache (K/V, N-gram history, conv windows):

1. Decode tokens/s at batch 1 and batch 8 after a 128-token prompt, Engram vs no Engram (the
   `demo` preset's backbone; Engram at block 1 with the preset's table). Every model has the
   same backbone weights and decodes the same fixed token stream (each step's argmax is taken
   as in generation, then the stream's next token is fed): two models decoding their own
   greedy tokens through their own random routers would differ in how many experts a step
   runs, which is not Engram's cost. The distinct experts per MoE layer and step are recorded
   as the check (`routing`), beside those of an Engram model with its own backbone. Steps of
   the models are interleaved so that machine noise hits all alike. A third model,
   the Engram one with its decode step and one-token hash AOT-compiled
   (`engram.inference.compiled`: one call of a compiled library each instead of some 70 eager
   ops), tests how much of the gap that op dispatch leaves compiling closes. A fourth, the
   compiled model with every Python layer between the model and the compiled code stripped
   (bare calls of the compiled libraries: no id validation, no layout keys, no checks; unsafe,
   here only), is the floor that any wrapper could reach. Last, both models with each whole
   step captured (`engram.inference.captured`: backbone, Engram and head one compiled call),
   compared with each other in rounds of their own: what Engram costs once neither side pays
   for op dispatch. Their steps are short, so they get many more rounds.
2. Time per decode step as the context grows from 128 to 4096 tokens, with Engram on and
   switched off on the same cached sequence: (on - off) is the Engram work of a step (hashing
   one token against the N-gram history, one row per head, projections, gate, conv over its
   window). It should stay flat while attention over the growing cache gets dearer.

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
from gpu_models import Captured, share_backbone

from engram.assembly import get_tokenizer
from engram.experiments.report import machine_info
from engram.hashing import HashState, NgramHasher
from engram.inference.compiled import compile_decoding
from engram.model import EngramLM, model_preset
from engram.spec import resolve
from engram.vocab import compress


def build(engram: bool, tok, vocab, max_len: int) -> EngramLM:
    config = model_preset("demo").with_(vocab_size=tok.vocab_size, max_seq_len=max_len)
    torch.manual_seed(0)
    if not engram:
        return EngramLM(config.with_(engram=None)).eval()
    spec = resolve(config.engram.spec, tokenizer=tok, vocab=vocab, pad_id=tok.pad_id)
    return EngramLM(config, spec, NgramHasher(spec, vocab)).eval()


def strip_wrappers(model: EngramLM) -> EngramLM:
    """The compiled model with its hasher's decode step and every Engram layer's replaced by
    bare calls of the compiled libraries: what is left is the compiled code itself, the
    model's own bookkeeping and the cost of crossing into Python at all."""
    hasher, direct = model.hasher, {}  # batch size -> (hash runner, {layer: step runner})
    pad, layers = hasher.spec.canonical_pad_id, hasher.spec.layer_ids
    constants = list(hasher._constants(torch.device("cpu")))
    general_step, engrams = hasher.step, {b.layer: b.engram for b in model.blocks if b.engram}
    general_forward = {layer: e.forward for layer, e in engrams.items()}

    def runners(B: int) -> tuple:
        if B not in direct:  # the first step of this batch size compiles, the safe way

            def only(fn, batch_of):  # the one runner compiled for this batch size
                (run,) = [r for key, r in fn._runners.items() if batch_of(key) == B]
                return run

            direct[B] = (  # keys: the ids' layout first; the step's inputs', h first
                only(hasher.fast_hash_one.function, lambda key: key[0][0][0]),
                {
                    layer: only(e.fast_step._functions[True], lambda key: key[1][0][0][0])
                    for layer, e in engrams.items()
                },
            )
        return direct[B]

    def step(ids, state, doc_starts=None, pads=None):
        if ids.shape[1] != 1 or ids.shape[0] not in direct:
            return general_step(ids, state, doc_starts, pads)
        rows, history = runners(ids.shape[0])[0]([ids, state.history, *constants])
        return dict(zip(layers, rows.unbind(0), strict=True)), HashState(history, pad)

    def forward_of(layer: int, engram):
        state = engram.fast_step._state()

        def forward(hidden, rows, starts=None, pads=None, window=None):
            B = hidden.shape[0]
            if hidden.shape[1] != 1 or window is None or pads is not None or B not in direct:
                y = general_forward[layer](hidden, rows, starts, pads, window)
                if hidden.shape[1] == 1 and window is not None and pads is None:
                    runners(B)  # compiled by now: go direct from the next step on
                return y
            return runners(B)[1][layer]([*state, hidden, rows, window, starts])[0]

        return forward

    for layer, engram in engrams.items():
        engram.forward = forward_of(layer, engram)
    hasher.step = step
    return model


def token_stream(batch: int, prompt: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt [B, prompt] and the tokens fed at each decode step [steps, B, 1]."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4000, (batch, prompt), generator=gen)
    return ids, torch.randint(0, 4000, (steps, batch, 1), generator=gen)


@torch.inference_mode()  # as engram.inference.generate decodes
def decode_rate(
    models: dict, batch: int, prompt: int, steps: int, repeats: int
) -> dict[str, list[float]]:
    """Decode tokens/s of each model in each round, interleaved, on the same token stream."""
    ids, stream = token_stream(batch, prompt, steps)
    rates: dict[str, list[float]] = {name: [] for name in models}
    for r in range(repeats + 1):  # the first round warms up
        for name in list(models) if r % 2 == 0 else list(reversed(models)):
            model = models[name]
            cache = model.new_cache(batch, prompt + steps)
            model(ids, cache=cache)
            t0 = time.perf_counter()
            for token in stream:  # the argmax a generator takes, then the stream's token
                model(token, cache=cache)[:, -1].argmax(-1, keepdim=True)
            if r > 0:
                rates[name].append(batch * steps / (time.perf_counter() - t0))
    return rates


def paired(rates: dict[str, list[float]], name: str, baseline: str = "without") -> dict:
    """Median and quartiles of `name`'s rate over the baseline's in the same round: a slow
    stretch of this shared machine slows both models of a round, so their ratio keeps."""
    ratios = [a / b for a, b in zip(rates[name], rates[baseline], strict=True)]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3}


@torch.inference_mode()
def distinct_experts(model: EngramLM, batch: int, prompt: int, steps: int) -> float:
    """Mean distinct routed experts per MoE layer and decode step on decode_rate's stream:
    what a step's MoE runs, so what must match between the models compared."""
    counts: list[int] = []

    def count(moe, inputs, output) -> None:
        idx, _ = moe.route(inputs[0].reshape(-1, inputs[0].shape[-1]))
        counts.append(len(set(idx.flatten().tolist())))

    ids, stream = token_stream(batch, prompt, steps)
    cache = model.new_cache(batch, prompt + steps)
    model(ids, cache=cache)
    hooks = [moe.register_forward_hook(count) for moe in model.moe_layers]
    try:
        for token in stream:
            model(token, cache=cache)
    finally:
        for hook in hooks:
            hook.remove()
    return statistics.mean(counts)


@torch.inference_mode()  # as engram.inference.generate decodes
def step_times(model: EngramLM, contexts: list[int], repeats: int) -> list[dict]:
    """Per-step time at each context length, Engram on vs off on the same cache."""
    gen = torch.Generator().manual_seed(1)
    rows = []
    for ctx in contexts:
        ids = torch.randint(0, 4000, (1, ctx), generator=gen)
        cache = model.new_cache(1, ctx + 2 * repeats + 4)
        model(ids, cache=cache)
        token = torch.tensor([[7]])
        times: dict[bool, list[float]] = {True: [], False: []}
        for r in range(2 * repeats + 2):
            off = r % 2 == 1
            t0 = time.perf_counter()
            model(token, cache=cache, engram_off=off)
            if r >= 2:
                times[off].append(time.perf_counter() - t0)
        on, off = statistics.median(times[False]), statistics.median(times[True])
        rows.append(
            {
                "context": ctx,
                "step_ms": on * 1e3,
                "engram_off_ms": off * 1e3,
                "engram_ms": (on - off) * 1e3,
                "engram_share": (on - off) / on,
            }
        )
    return rows


@torch.inference_mode()
def op_counts(model: EngramLM, batch: int = 1) -> dict[str, int]:
    """Top-level torch ops of one decode step, Engram on and switched off (the profiler's
    count, exact and machine-independent): what a step's Engram adds is mostly op dispatch."""
    from torch.profiler import ProfilerActivity, profile

    cache = model.new_cache(batch, 200)
    token = model(torch.randint(0, 4000, (batch, 64)), cache=cache)[:, -1:].argmax(-1)
    counts = {}
    for name, off in (("on", False), ("off", True)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(token, cache=cache, engram_off=off)
        counts[name] = sum(1 for e in prof.events() if e.cpu_parent is None)
    return {**counts, "engram": counts["on"] - counts["off"]}


def summarise(rounds: dict[str, list[float]], routing: dict[str, float]) -> dict:
    """One batch size's record: median tokens/s of each model, the ratios to the model
    without Engram (of medians, and paired by round), and the routing check."""
    rate = {name: statistics.median(v) for name, v in rounds.items()}
    pairs = {name: paired(rounds, name) for name in ("with", "with_aot", "with_floor")}
    pairs["captured"] = paired(rounds, "captured_with", "captured_without")
    return {
        **rate,
        "ratio": rate["with"] / rate["without"],
        "ratio_aot": rate["with_aot"] / rate["without"],
        "ratio_floor": rate["with_floor"] / rate["without"],
        "ratio_captured": rate["captured_with"] / rate["captured_without"],
        "speedup_captured_without": rate["captured_without"] / rate["without"],
        "paired_ratios": pairs,
        "routing": {"distinct_experts_per_layer_step": routing},
    }


def show(batch: int, r: dict) -> None:
    print(
        f"batch {batch}: with Engram {r['with']:8.1f} tok/s, without {r['without']:8.1f} tok/s, "
        f"ratio {r['ratio']:.3f} (its steps AOT-compiled: {r['ratio_aot']:.3f}; bare compiled "
        f"calls, the floor: {r['ratio_floor']:.3f})"
    )
    print(
        f"  captured: with Engram {r['captured_with']:8.1f} tok/s, without "
        f"{r['captured_without']:8.1f} tok/s"
    )
    print(
        "  paired by round, median [quartiles]: "
        + ", ".join(
            f"{name} {p['median']:.3f} [{p['q1']:.3f}, {p['q3']:.3f}]"
            for name, p in r["paired_ratios"].items()
        )
    )
    routing = r["routing"]["distinct_experts_per_layer_step"]
    print(
        "  distinct experts per MoE layer and step: "
        + ", ".join(f"{name} {n:.2f}" for name, n in routing.items())
    )


def show_step_times(rows: list[dict]) -> None:
    print(f"\n{'context':>8}{'step ms':>10}{'off ms':>10}{'Engram ms':>11}{'share':>8}")
    for r in rows:
        print(
            f"{r['context']:>8}{r['step_ms']:>10.2f}{r['engram_off_ms']:>10.2f}"
            f"{r['engram_ms']:>11.3f}{r['engram_share']:>8.3f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=64, help="decode steps per measurement")
    ap.add_argument("--repeats", type=int, default=30)  # four models: noise needs many rounds
    ap.add_argument("--captured-repeats", type=int, default=200)  # rounds of the captured pair
    ap.add_argument("--contexts", default="128,512,1024,2048,4096")
    ap.add_argument("--out", type=Path, default=Path("bench/results/decode.json"))
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]

    tok = get_tokenizer("bpe:4096", "default")
    vocab = compress(tok)
    max_len = max(contexts) + 6 * args.repeats + 8  # room for step_times()
    without = build(False, tok, vocab, max_len)

    def with_engram() -> EngramLM:
        return share_backbone(build(True, tok, vocab, max_len), without)

    models = {
        "with": with_engram(),
        "without": without,
        # Compiled (or loaded from the cache) in decode_rate's warm-up round.
        "with_aot": compile_decoding(with_engram()),
        "with_floor": strip_wrappers(compile_decoding(with_engram())),
    }
    captured = {"captured_with": Captured(with_engram()), "captured_without": Captured(without)}
    own_backbone = build(True, tok, vocab, max_len)  # the control's counterpart, not timed

    results: dict = {"decode": {}}
    for batch in (1, 8):
        rounds = decode_rate(models, batch, 128, args.steps, args.repeats)
        rounds |= decode_rate(captured, batch, 128, args.steps, args.captured_repeats)
        routed = {"with": models["with"], "without": without, "with_own_backbone": own_backbone}
        routing = {
            name: distinct_experts(model, batch, 128, args.steps) for name, model in routed.items()
        }
        results["decode"][f"batch_{batch}"] = summary = summarise(rounds, routing)
        show(batch, summary)
    results["ops_per_step"] = op_counts(models["with"])
    results["ops_per_step_aot"] = op_counts(models["with_aot"])  # compiled calls are not ops
    print(f"ops per decode step: {results['ops_per_step']}, AOT: {results['ops_per_step_aot']}")
    results["step_times"] = step_times(models["with"], contexts, 3 * args.repeats)
    show_step_times(results["step_times"])
    record = {
        "benchmark": "decode",
        "machine": machine_info(),
        "config": {
            "preset": "demo",
            "prompt": 128,
            "steps": args.steps,
            "repeats": args.repeats,
            "captured_repeats": args.captured_repeats,
            "contexts": contexts,
            "tokenizer": "bpe:4096",
            "backbone": "shared",
            "tokens": "fixed stream, argmax taken each step",
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    sys.exit(main())
