"""`engram study long-context`: multi-query needle retrieval, Engram vs its MoE vs a dense control.

The paper reports multi-query needle-in-a-haystack (RULER) at 32k tokens rising from 84.2
(MoE-27B) to 97.0 (Engram-27B): with local N-gram patterns looked up, attention is freer for
global context. This study asks the same question at the lengths a CPU model trains at. Key-value
needles (`KEY_4821 = "7392"`, see `needles`) sit in a block at a chosen depth of real corpus
text, every needle is queried at the end (`KEY_4821 == "`), and a query counts only when
every value token is the model's top-1 (teacher-forced: exactly whether greedy decoding would
emit the value). Accuracy is reported by context length and depth, as a heat map.

A model retrieves only what its training asked of it, so the arms train on the base corpus
with needles mixed in: each document is cut into pieces of the probe's lengths and a share of
the pieces carries needles at a uniform depth with their queries, written as a JSONL corpus
under the study's folder (the library's data loader is untouched). Every key-value pair is
drawn afresh, so nothing can be memorised: only retrieval from the context scores. The probe's
contexts are built from the base corpus's validation split, which training never saw, with
needles of their own, identical for every arm and seed.

Arms (`demo_arms`, the demo's three, on the same tokens): the MoE baseline (the preset's, or a
granularity report's best with `--baseline`), its iso-parameter Engram arm (`plan_from_moe` at
rho), and the attention-only control, read as a model whose only token mixing and only
capacity beyond attention is one dense SwiGLU as wide as the MoE's active experts: equal P_act,
no routed experts and no memory. Retrieval is attention's work; if the control matches both,
neither sparse capacity matters to it at this scale.

A difference is resolved only when it exceeds twice the larger seed spread of the two arms
(`granularity.verdict`, docs/findings.md); one seed resolves nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from engram.assembly import get_tokenizer
from engram.config import TrainConfig, parse_assignments
from engram.data import VAL_FRACTION, canonical_source, documents, source_fingerprint
from engram.experiments.arms import (
    STUDY_TRAIN,
    Study,
    add_baseline_argument,
    add_recipe_argument,
    add_set_argument,
    study_from_args,
    tokens_per_arm,
    train_runs,
)
from engram.experiments.demo import demo_arms
from engram.experiments.granularity import verdict
from engram.experiments.long_context_report import write_report
from engram.experiments.needles import (
    Filler,
    NeedleMix,
    Probe,
    probe_set,
    run_probes,
    write_training_corpus,
)
from engram.experiments.report import machine_info
from engram.inference.load import load_trained
from engram.tokenizer import Tokenizer, load_tokenizer

ARMS = ("moe", "engram", "dense")
PAIRS = (("engram", "moe"), ("engram", "dense"), ("moe", "dense"))  # a - b, each compared
PROBE_SEED = 0  # the probe's contexts: the same for every arm, seed and run of the study
FILLER_LINES = 200_000  # validation lines the probe's haystacks are drawn from, at most
CORPUS_VERSION = 2  # bump when the training corpus's generation changes: old corpora are stale
EVAL_BATCH = 8  # contexts per forward when scoring

# 300 x 16 x 512 = 2.5M tokens per arm: the stdlib's training split (3.5M) once, no repeats.
LONG_TRAIN = replace(STUDY_TRAIN, seq_len=512, batch_size=16, steps=300, eval_tokens=65536)


@dataclass(frozen=True)
class LongContextConfig(Study):
    """The probe (lengths x depths x samples contexts of `needles` needles), the training
    corpus's needle share, the arms' rho, seeds."""

    train: TrainConfig = LONG_TRAIN
    seeds: tuple[int, ...] = (0, 1)
    lengths: tuple[int, ...] = (128, 256, 512)  # context tokens; the longest <= seq_len
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    needles: int = 3  # key-value pairs per context, each queried
    samples: int = 16  # contexts per (length, depth) cell
    needle_share: float = 0.5  # of the training corpus's pieces that carry needles
    rho: float = 0.8  # the Engram arm's allocation, as the demo plans it
    out_dir: str = "runs/long-context"

    def validate(self) -> None:
        lengths, depths = self.lengths, self.depths
        if not lengths or any(n < 2 for n in lengths) or len(set(lengths)) != len(lengths):
            raise ValueError(f"lengths={list(lengths)} must be distinct and >= 2")
        if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
            raise ValueError(f"depths={list(depths)} must be non-empty and in [0, 1]")
        if len(set(depths)) != len(depths):
            raise ValueError(f"depths={list(depths)} must be distinct")
        if self.needles < 1 or self.samples < 1:
            raise ValueError(f"needles={self.needles} and samples={self.samples} must be >= 1")
        if not 0.0 < self.needle_share <= 1.0:
            raise ValueError(f"needle_share={self.needle_share} must be in (0, 1]")
        if not 0.0 < self.rho < 1.0:
            raise ValueError(f"rho={self.rho} must be in (0, 1): the Engram arm needs a table")
        if "data" in parse_assignments(list(self.overrides)):
            raise ValueError("--set data=... would replace the needle corpus: use --data")
        self.validate_training()
        arm = self.arm(self.base_model(), self.seeds[0], self.out_dir)
        limit = min(arm.seq_len, arm.model.max_seq_len)
        if max(lengths) > limit:
            raise ValueError(
                f"lengths={list(lengths)}: the longest exceeds the arms' context of {limit} "
                "tokens (seq_len, model.max_seq_len), which the probe must stay within"
            )


QUICK = LongContextConfig(
    train=replace(LONG_TRAIN, steps=8, seq_len=128, batch_size=4, eval_tokens=4096),
    seeds=(0,),
    lengths=(64, 128),
    depths=(0.25, 0.75),
    needles=2,
    samples=2,
    out_dir="runs/long-context-quick",
)

HELP = "multi-query needle retrieval by context length and depth: Engram vs MoE vs dense"
LISTS = {"lengths": int, "depths": float}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few steps (seconds)")
    add_recipe_argument(p)
    p.add_argument("--lengths", help="comma-separated context lengths (default 128,256,512)")
    p.add_argument("--depths", help="comma-separated needle depths (default 0.1,0.3,...,0.9)")
    p.add_argument("--needles", type=int, help="key-value needles per context (default 3)")
    p.add_argument("--samples", type=int, help="contexts per length and depth (default 16)")
    p.add_argument("--seeds", help="comma-separated seeds (default 0,1)")
    p.add_argument("--steps", type=int, help="training steps per arm (default 300)")
    p.add_argument("--data", help="base text source the needles go into (default: stdlib)")
    p.add_argument("--out", help="report folder (default runs/long-context[-quick])")
    add_baseline_argument(p)
    add_set_argument(p)


def run_cli(args: argparse.Namespace) -> None:
    changes = {k: getattr(args, k) for k in ("needles", "samples") if getattr(args, k) is not None}
    run_long_context(study_from_args(args, LongContextConfig(), QUICK, LISTS, **changes))


# ---- data: the arms' tokenizer, the needle corpus, the probe ---------------------------------
def arms_tokenizer(cfg: LongContextConfig, out: Path) -> tuple[str, Tokenizer]:
    """The template's tokenizer on the base corpus; a trained `bpe:N` is saved into `out` and
    named by path, so that the arms, which train on the needle corpus, do not train a BPE of
    their own on it (whose merges the needles would shape)."""
    name = cfg.train.tokenizer
    tok = get_tokenizer(name, cfg.train.data)
    if not name.startswith("bpe:"):
        return name, tok
    path = out / "tokenizer.json"
    if not path.is_file() or load_tokenizer(path).fingerprint != tok.fingerprint:
        tok.save(path)
    return str(path), load_tokenizer(path)


def needle_corpus(cfg: LongContextConfig, tok: Tokenizer, tokens: int, out: Path) -> dict:
    """The training corpus (written once per settings; its name is their digest): the base
    corpus's training split, a share of its pieces with needles, about `tokens` tokens."""
    mix = NeedleMix(cfg.needles, cfg.lengths, cfg.needle_share)
    data = cfg.train.data
    source = (canonical_source(data), source_fingerprint(data), tok.fingerprint)
    key = json.dumps([CORPUS_VERSION, *source, mix.count, list(mix.lengths), mix.share, tokens])
    path = out / f"corpus-{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl"
    stats_path = path.with_suffix(".json")
    if path.is_file() and stats_path.is_file():
        return {"path": str(path), **json.loads(stats_path.read_text())}
    print(f"writing the needle corpus {path}", flush=True)
    stats = write_training_corpus(path, tok, documents(data, "train"), mix, tokens, seed=0)
    stats_path.write_text(json.dumps(stats, indent=2) + "\n")
    return {"path": str(path), **stats}


def probes_for(cfg: LongContextConfig, tok: Tokenizer) -> list[Probe]:
    """The probe's contexts, from the base corpus's validation split."""
    filler = Filler.from_texts(documents(cfg.train.data, "val"), tok, FILLER_LINES)
    return probe_set(tok, filler, cfg.lengths, cfg.depths, cfg.needles, cfg.samples, PROBE_SEED)


# ---- scoring -------------------------------------------------------------------------------------
def cell_table(records: list[dict], cfg: LongContextConfig, key: str) -> list[list[float]]:
    """[length][depth] mean of `key` (exact, tokens, depth) over the records of each cell."""
    table = []
    for length in cfg.lengths:
        row = []
        for depth in cfg.depths:
            cell = [r[key] for r in records if r["length"] == length and r["target_depth"] == depth]
            row.append(sum(cell) / len(cell))
        table.append(row)
    return table


@torch.no_grad()
def score_run(
    folder: Path, cfg: LongContextConfig, cache: dict[str, list[Probe]], device: str = "auto"
) -> dict:
    """Exact retrieval of the finished run in `folder` on the probe (built once per tokenizer
    in `cache`): per cell, per length and overall."""
    trained = load_trained(folder, device=device)
    tok = trained.tokenizer
    if tok.fingerprint not in cache:
        cache[tok.fingerprint] = probes_for(cfg, tok)
    on = next(trained.model.parameters()).device
    records = run_probes(trained.model, cache[tok.fingerprint], EVAL_BATCH, on)
    exact = cell_table(records, cfg, "exact")
    return {
        "exact": exact,
        "tokens": cell_table(records, cfg, "tokens"),
        "depth": cell_table(records, cfg, "depth"),
        "by_length": [sum(row) / len(row) for row in exact],
        "overall": sum(r["exact"] for r in records) / len(records),
        "overall_tokens": sum(r["tokens"] for r in records) / len(records),
        "queries": len(records),
    }


def _mean(rows: list[Any]) -> Any:
    """The elementwise mean of equal-shaped numbers, lists or lists of lists."""
    if isinstance(rows[0], list):
        return [_mean(list(column)) for column in zip(*rows, strict=True)]
    return sum(rows) / len(rows)


def aggregate_arm(runs: list[dict], scores: list[dict]) -> dict[str, Any]:
    """One arm over its seeds: accounting, per-seed losses and accuracies, means, spreads."""
    overall = [s["overall"] for s in scores]
    by_length = [s["by_length"] for s in scores]
    return {
        **{k: runs[0][k] for k in ("p_tot", "p_act", "table_params", "routed_experts", "tokens")},
        "seeds": [r["seed"] for r in runs],
        "val_loss_per_seed": [r["val_loss"] for r in runs],
        "accuracy_per_seed": overall,
        "accuracy": _mean(overall),
        "accuracy_spread": max(overall) - min(overall),
        "by_length_per_seed": by_length,
        "by_length": _mean(by_length),
        "by_length_spread": [max(c) - min(c) for c in zip(*by_length, strict=True)],
        "token_accuracy": _mean([s["overall_tokens"] for s in scores]),
        "exact": _mean([s["exact"] for s in scores]),  # [length][depth], mean over seeds
        "exact_per_seed": [s["exact"] for s in scores],
        "measured_depth": _mean([s["depth"] for s in scores]),
        "queries_per_seed": scores[0]["queries"],
    }


def difference(a: list[float], b: list[float], spread_a: float, spread_b: float) -> dict:
    """a - b per seed (same seeds, in order), its mean and the project's verdict."""
    per_seed = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(per_seed) / len(per_seed)
    return {
        "diff_per_seed": per_seed,
        "diff_mean": mean,
        "threshold": 2 * max(spread_a, spread_b),
        "verdict": verdict(mean, spread_a, spread_b, len(per_seed)),
    }


def compare_arms(arms: dict[str, dict], lengths: tuple[int, ...]) -> list[dict[str, Any]]:
    """Every pair of `PAIRS`, overall and at each length."""
    rows = []
    for a, b in PAIRS:
        x, y = arms[a], arms[b]
        scopes = [("all", x["accuracy_per_seed"], y["accuracy_per_seed"], None)]
        scopes += [
            (
                f"{n}",
                [s[i] for s in x["by_length_per_seed"]],
                [s[i] for s in y["by_length_per_seed"]],
                i,
            )
            for i, n in enumerate(lengths)
        ]
        for scope, xs, ys, i in scopes:
            sx = x["accuracy_spread"] if i is None else x["by_length_spread"][i]
            sy = y["accuracy_spread"] if i is None else y["by_length_spread"][i]
            rows.append({"pair": f"{a} - {b}", "length": scope, **difference(xs, ys, sx, sy)})
    return rows


# ---- the study -------------------------------------------------------------------------------
def run_long_context(cfg: LongContextConfig = LongContextConfig()) -> dict[str, Any]:
    """Write the needle corpus, train the three arms for every seed on it, score each on the
    probe; write report.json, report.md and long_context.png."""
    cfg.validate()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    models, plan = demo_arms(cfg.base_model(), cfg.rho)
    tok_name, tok = arms_tokenizer(cfg, out)
    first = cfg.arm(models["moe"], cfg.seeds[0], out)
    # Enough distinct tokens that no needle document repeats within a run, and a validation
    # split (VAL_FRACTION of the documents) that holds the arms' validation tokens.
    need = max(tokens_per_arm(first) / (1 - VAL_FRACTION), 1.5 * first.eval_tokens / VAL_FRACTION)
    corpus = needle_corpus(cfg, tok, math.ceil(need), out)
    changes = {"data": corpus["path"], "tokenizer": tok_name}
    runs = train_runs(cfg, models, lambda seed: out / f"seed-{seed}", **changes)
    cache: dict[str, list[Probe]] = {}
    arms = {}
    for name in ARMS:
        print(f"\n== scoring {name} on the probe ==", flush=True)
        folders = [out / f"seed-{s}" / name for s in cfg.seeds]
        scores = [score_run(f, cfg, cache, first.device) for f in folders]
        arms[name] = aggregate_arm(runs[name], scores)
    report = {
        "arms": arms,
        "comparisons": compare_arms(arms, cfg.lengths),
        "plan": {"rho": plan.rho, "num_routed": plan.num_routed, "warnings": plan.warnings},
        "corpus": corpus,
        "probe": {
            "lengths": list(cfg.lengths),
            "depths": list(cfg.depths),
            "needles": cfg.needles,
            "samples": cfg.samples,
            "seed": PROBE_SEED,
            "scoring": "teacher-forced argmax over the value tokens (= greedy decoding)",
        },
        "tokens_per_arm": tokens_per_arm(first),
        "config": cfg.report_config("steps"),
        "machine": machine_info(),
        "seconds": time.perf_counter() - start,
    }
    write_report(out, report)
    return report


__all__ = [
    "ARMS",
    "QUICK",
    "LongContextConfig",
    "aggregate_arm",
    "compare_arms",
    "needle_corpus",
    "probes_for",
    "run_long_context",
    "score_run",
]
