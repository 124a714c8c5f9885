"""`engram study logit-lens`: how early each layer's prediction settles, Engram vs its baseline.

LogitLens (nostalgebraist, 2020) reads a layer's residual stream out through the model's own final
norm and head, as if the remaining blocks were skipped. The paper's mechanism analysis
averages KL(p_final || p_layer) over tokens and finds it lower in the early layers of the Engram
model than of the MoE baseline: with static N-gram patterns looked up rather than recomputed, the
early layers reach a near-final prediction sooner, so the network behaves as a deeper one.

This study measures, for every layer of both models on the same validation tokens, the mean
KL(final || early exit), the early exit's cross-entropy against the next token, and how often its
top-1 token is the final top-1. Layer 0 is the embedding, layer i the stream after i blocks; the
last layer's early exit is the model's own prediction, so its KL is 0 by construction (a check).
With `--tokens entity-final` the same means are also taken over the last piece of each identifier
and string literal alone; with `--preset P --seeds ...` the pairs are trained first and the
report gives the mean over seeds (see `layerwise`).

Legend: N tokens of a slice, V vocabulary, M residual branches, d width.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engram.experiments.layerwise import (
    Pair,
    add_pair_arguments,
    forward_with_streams,
    max_tokens_from_args,
    mean_over_pairs,
    pairs_from_args,
    readout,
    selected_batches,
    selections_of,
)
from engram.experiments.report import machine_info, markdown_table, pyplot, save_report
from engram.model import EngramLM

FULL_TOKENS = 32768  # the demo pair: about a minute on 2 idle CPU cores
CHUNK = 512  # tokens read out at once: bounds the [N, V] log-probability temporaries
ARMS = ("engram", "baseline")
PAPER_CLAIM = (
    "LogitLens KL(final || layer) is lower in the early layers of Engram-27B than of MoE-27B: "
    "the early layers settle on the final prediction sooner."
)

HELP = "per-layer early-exit KL to the final prediction, Engram vs baseline"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_pair_arguments(p, "logit-lens", FULL_TOKENS)


def run_cli(args: argparse.Namespace) -> None:
    out = Path(args.out or ("runs/logit-lens-quick" if args.quick else "runs/logit-lens"))
    max_tokens = max_tokens_from_args(args, FULL_TOKENS)
    selections_of(args.tokens)  # a bad selection fails before any training
    run_logit_lens(pairs_from_args(args, out), max_tokens, out, args.tokens)


# ---- measuring -----------------------------------------------------------------------------------
@torch.no_grad()
def lens_values(
    model: EngramLM, logits: torch.Tensor, streams: list[torch.Tensor], targets: torch.Tensor
) -> torch.Tensor:
    """Per layer and token [L+1, 3, N] float64: KL(final || exit), exit cross-entropy, and
    whether the exit's top-1 is the final top-1 (so that any selection of tokens sums them).

    `logits` [B, T, V] are the model's, `streams` its captured [B, T, M, d] streams.
    """
    final = logits.flatten(0, 1).float()  # [N, V]
    flat = [s.flatten(0, 1) for s in streams]  # [N, M, d] each
    targets = targets.flatten().to(final.device)
    values = torch.zeros(len(streams), 3, final.shape[0], dtype=torch.float64)
    for begin in range(0, final.shape[0], CHUNK):
        part = slice(begin, begin + CHUNK)
        logp_final = F.log_softmax(final[part], dim=-1)
        p_final, top_final = logp_final.exp(), logp_final.argmax(dim=-1)
        for i, stream in enumerate(flat):
            logp = F.log_softmax(readout(model, stream[part]).float(), dim=-1)  # [N, V]
            kl = (p_final * (logp_final - logp)).sum(dim=-1)
            ce = F.cross_entropy(logp, targets[part], reduction="none")
            agree = (logp.argmax(dim=-1) == top_final).float()
            values[i, :, part] = torch.stack([kl, ce, agree]).double().cpu()
    return values


def lens_sums(
    model: EngramLM,
    logits: torch.Tensor,
    streams: list[torch.Tensor],
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per layer [L+1, 3] float64: summed KL(final || exit), exit cross-entropy, top-1 agreement,
    over every token or those where `mask` [B, T] is true."""
    values = lens_values(model, logits, streams, targets)
    return (values if mask is None else values[:, :, mask.flatten().cpu()]).sum(dim=-1)


def _means(sums: dict[str, torch.Tensor], tokens: int) -> dict[str, Any]:
    """The result of one token selection: its count and per arm the mean of each measure."""
    result: dict[str, Any] = {"tokens": tokens}
    for arm, s in sums.items():
        mean = (s / tokens).tolist()
        result[arm] = {
            "layers": list(range(len(mean))),
            "kl": [row[0] for row in mean],
            "ce": [row[1] for row in mean],
            "top1_agreement": [row[2] for row in mean],
        }
    return result


def measure(pair: Pair, max_tokens: int, tokens: str = "all") -> dict[str, Any]:
    """Mean KL, cross-entropy and top-1 agreement per layer of both models, and the token count,
    over every position; with `tokens="entity-final"`, the same over those under `entity_final`."""
    selections = selections_of(tokens)
    layers = {arm: getattr(pair, arm).config.model.n_layers + 1 for arm in ARMS}
    sums = {
        name: {arm: torch.zeros(layers[arm], 3, dtype=torch.float64) for arm in ARMS}
        for name in selections
    }
    counts = dict.fromkeys(selections, 0)
    for ids, targets, masks in selected_batches(pair, max_tokens, selections):
        for arm in ARMS:
            model = getattr(pair, arm).model
            values = lens_values(model, *forward_with_streams(model, ids), targets)
            for name, mask in masks.items():
                sums[name][arm] += values[:, :, mask.flatten()].sum(dim=-1)
        for name, mask in masks.items():
            counts[name] += int(mask.sum())
    result = _means(sums["all"], counts["all"])
    if tokens != "all":
        if counts[tokens] == 0:
            raise ValueError(
                f"no {tokens} tokens in the first {max_tokens:,} validation tokens of "
                f"{pair.data!r}: --tokens {tokens} reads Python source (identifiers, strings)"
            )
        result["entity_final"] = _means(sums[tokens], counts[tokens])
    return result


def compare(result: dict[str, Any]) -> dict[str, Any]:
    """Where A's KL is below B's over the inner layers 1..L-1: layer 0 is the embedding (no
    block has run yet), and the last layer's KL is 0 in both by construction."""
    a, b = result["engram"]["kl"], result["baseline"]["kl"]
    inner = range(1, min(len(a), len(b)) - 1)
    lower = [i for i in inner if a[i] < b[i]]
    half = [i for i in inner if i <= (min(len(a), len(b)) - 1) // 2]
    return {
        "inner_layers": list(inner),
        "layers_engram_lower": lower,
        "early_layers": half,
        "early_layers_engram_lower": [i for i in half if i in lower],
        "mean_inner_kl": {
            arm: sum(kl[i] for i in inner) / max(len(inner), 1)
            for arm, kl in (("engram", a), ("baseline", b))
        },
    }


def _with_comparisons(result: dict[str, Any]) -> dict[str, Any]:
    """`result` with the comparison of every selection in it (the entity-final one inside)."""
    result = {**result, "comparison": compare(result)}
    if "entity_final" in result:
        entity = result["entity_final"]
        result["entity_final"] = {**entity, "comparison": compare(entity)}
    return result


def _spreads(mean: dict[str, Any], per_pair: list[dict[str, Any]]) -> None:
    """Adds each arm's per-layer KL spread over the pairs (max - min) to `mean`, in place."""
    for part in ([], ["entity_final"]) if "entity_final" in mean else ([],):
        for arm in ARMS:
            kls = [_at(r, part)[arm]["kl"] for r in per_pair]
            _at(mean, part)[arm]["kl_spread"] = [max(v) - min(v) for v in zip(*kls, strict=True)]


def _at(result: dict[str, Any], part: list[str]) -> dict[str, Any]:
    return result[part[0]] if part else result


# ---- the study -----------------------------------------------------------------------------------
def run_logit_lens(
    pairs: Pair | Sequence[Pair], max_tokens: int, out_dir: str | Path, tokens: str = "all"
) -> dict[str, Any]:
    """Measure each pair on the first `max_tokens` validation tokens; write the report (with
    several pairs, e.g. seeds, the mean per layer, and every pair's results under `per_seed`)."""
    start = time.perf_counter()
    pairs = [pairs] if isinstance(pairs, Pair) else list(pairs)
    raw = [measure(pair, max_tokens, tokens) for pair in pairs]
    result = _with_comparisons(mean_over_pairs(raw))
    per_pair = [_with_comparisons(r) for r in raw]
    first = pairs[0]
    report = {
        "config": {
            "data": first.data,
            "max_tokens": max_tokens,
            "seq_len": first.seq_len,
            "batch_size": first.batch_size,
            "tokens": tokens,
            "seeds": [p.seed for p in pairs],
        },
        "models": {arm: first.describe(arm) for arm in ARMS},
        **result,
        "paper_claim": PAPER_CLAIM,
        "machine": machine_info(),
    }
    if len(pairs) > 1:
        _spreads(report, per_pair)
        report["per_seed"] = [
            {"seed": p.seed, "paths": list(p.paths), **r}
            for p, r in zip(pairs, per_pair, strict=True)
        ]
    report["seconds"] = time.perf_counter() - start
    save_report(out_dir, report, "logit_lens.png", _plot, _markdown)
    return report


def _cell(values: list[float], i: int, fmt: str = ".4f") -> str:
    return format(values[i], fmt) if i < len(values) else "-"


def _table(report: dict) -> str:
    a, b = report["engram"], report["baseline"]
    rows = []
    for i in range(max(len(a["kl"]), len(b["kl"]))):
        diff = b["kl"][i] - a["kl"][i] if i < min(len(a["kl"]), len(b["kl"])) else None
        rows.append(
            [
                "0 (embedding)" if i == 0 else i,
                _cell(a["kl"], i),
                _cell(b["kl"], i),
                "-" if diff is None else f"{diff:+.4f}",
                _cell(a["ce"], i),
                _cell(b["ce"], i),
                _cell(a["top1_agreement"], i, ".3f"),
                _cell(b["top1_agreement"], i, ".3f"),
            ]
        )
    headers = ["layer", "KL Engram", "KL baseline", "baseline - Engram"]
    headers += ["CE Engram", "CE baseline", "top-1 = final, Engram", "top-1 = final, baseline"]
    return markdown_table(headers, rows)


def _ours(result: dict, what: str) -> str:
    cmp_ = result["comparison"]
    mean = cmp_["mean_inner_kl"]
    return (
        f"Ours{what}: the Engram model's KL is lower at layers "
        f"{cmp_['layers_engram_lower'] or 'none'} of the inner layers {cmp_['inner_layers']} "
        f"(early half {cmp_['early_layers']}: lower at "
        f"{cmp_['early_layers_engram_lower'] or 'none'}); mean inner-layer KL "
        f"{mean['engram']:.4f} (Engram) vs {mean['baseline']:.4f} (baseline) nats/token."
    )


def _seeds_line(report: dict) -> str:
    """With several pairs: what the tables average, and each seed's early layers."""
    if "per_seed" not in report:
        return ""
    lower = "; ".join(
        f"seed {r['seed']}: {r['comparison']['layers_engram_lower'] or 'none'}"
        for r in report["per_seed"]
    )
    return (
        f"\nMeans over the pairs of seeds {report['config']['seeds']} (each seed's results, and "
        f"per-layer KL spreads, in report.json). Layers where Engram's KL is lower, per seed: "
        f"{lower}.\n"
    )


def _markdown(report: dict, plot: Path | None) -> str:
    c, m = report["config"], report["machine"]
    models = "\n".join(
        f"- {arm}: `{d['path']}` (step {d['step']}, {d['n_layers']} layers, M = "
        f"{d['hc_branches']}, Engram layers {d['engram_layers'] or 'none'}, "
        f"{d['routed_experts']} routed experts, P_tot {d['p_tot']:,}, P_act {d['p_act']:,})"
        for arm, d in report["models"].items()
    )
    entity = report.get("entity_final")
    ours = f"- {_ours(report, '')}"
    tables = _table(report)
    if entity is not None:
        ours += f"\n- {_ours(entity, ' (entity-final tokens)')}"
        tables = (
            f"### All tokens\n\n{tables}\n\n### Entity-final tokens ({entity['tokens']:,}: the "
            f"last piece of each identifier and string literal)\n\n{_table(entity)}"
        )
    return f"""# LogitLens: early-exit KL to the final prediction, per layer

{report["tokens"]:,} validation tokens of `{c["data"]}` (windows of {c["seq_len"]}, every position
scored, the same tokens for both models). Machine: {m["processor"]}, {m["cpu_count"]} CPUs, torch
{m["torch"]}, commit {m["commit"]}; {report["seconds"]:.1f} s.

{models}
{_seeds_line(report)}
Each layer's stream is read out as the model reads its last one (mean of the residual branches,
final RMSNorm, LM head). KL(final || layer i) in nats/token, averaged over tokens; CE is the early
exit's next-token cross-entropy (at the last layer: the model's validation loss on these tokens);
top-1 = final is the share of tokens whose early-exit argmax is the final argmax. Layer 0 is the
embedding, layer i the stream after i blocks; the last layer's KL is 0 by construction.

- Paper: {report["paper_claim"]}
{ours}

{f"![KL per layer]({plot.name})" if plot else "(no plot: matplotlib is missing)"}

{tables}
"""


def _plot(report: dict, path: Path) -> Path | None:
    """KL per layer (log scale: the embedding's KL dwarfs the rest) and CE per layer."""
    plt = pyplot()
    if plt is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    parts = [(report, "", "-")]
    if "entity_final" in report:
        parts.append((report["entity_final"], ", entity-final", "--"))
    for part, which, style in parts:
        for arm, label in (("engram", "Engram (A)"), ("baseline", "baseline (B)")):
            r, label = part[arm], label + which
            # The last layer's KL is 0 (or float noise): off a log axis, so only in the table.
            kl = [(i, v) for i, v in zip(r["layers"][:-1], r["kl"][:-1], strict=True)]
            left.plot(*zip(*kl, strict=True), style, marker="o", label=label)
            right.plot(r["layers"], r["ce"], style, marker="o", label=label)
    left.set_yscale("log")
    left.set_ylabel("KL(final || early exit) (nats/token)")
    left.set_title("LogitLens KL to the final prediction")
    right.set_ylabel("early-exit cross-entropy (nats/token)")
    right.set_title("Early-exit loss")
    for ax in (left, right):
        ax.set_xlabel("layer (0 = embedding, i = after i blocks)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = [
    "FULL_TOKENS",
    "PAPER_CLAIM",
    "compare",
    "lens_sums",
    "lens_values",
    "measure",
    "run_logit_lens",
]
