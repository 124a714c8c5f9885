"""`engram study cka`: which baseline layer each Engram layer resembles (linear CKA).

Centered kernel alignment (Kornblith et al., 2019) compares two representations of the same inputs
through their Gram matrices; linear CKA is invariant to orthogonal transforms and isotropic scaling
of either, so layers of different models compare. The paper's mechanism analysis computes it between
every layer of Engram-27B and of MoE-27B with the unbiased minibatch HSIC estimator, and summarises
each Engram layer by a soft alignment index: the similarity-weighted mean index of its top-5 most
similar MoE layers. Engram layer 5 aligns with MoE layer 12, so the Engram model's layers act as
deeper ones.

The estimator (Song et al., 2012; Nguyen, Raghu and Kornblith, 2021): for a minibatch of n rows
with linear kernels K = X X^T, L = Y Y^T and K~, L~ their copies with zeroed diagonals,

    HSIC_1(K, L) = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)),

an unbiased estimate of HSIC; summed over k minibatches,
CKA = sum HSIC_1(K, L) / sqrt(sum HSIC_1(K, K) sum HSIC_1(L, L)). Unlike the plain (biased) CKA,
it is not pulled towards 1 by the dimension/sample-size ratio: independent features give about 0.
We evaluate it in feature space (no n x n matrices): tr(K~L~) = |X^T Y|_F^2 - sum_i |x_i|^2 |y_i|^2,
K~1 = X (X^T 1) - (|x_i|^2)_i. HSIC_1 is exactly invariant to translating the features, so each
minibatch is centred first (in float64) to spare the subtractions from cancelling.

`--tokens entity-final` also estimates CKA on the paper's positions alone (the last piece of each
identifier and string literal), from the same forward passes; `--preset P --seeds ...` trains the
pairs first and reports the mean CKA over seeds (see `layerwise`).

Legend: n minibatch rows (token positions), p features, R representations (both models' layers).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from engram.experiments.layerwise import (
    Pair,
    add_pair_arguments,
    combined,
    forward_with_streams,
    max_tokens_from_args,
    mean_over_pairs,
    pairs_from_args,
    selected_batches,
    selections_of,
)
from engram.experiments.report import machine_info, markdown_table, pyplot, save_report

FULL_TOKENS = 65536  # the demo pair: 64 minibatches of 1,024 tokens, under a minute on 2 cores
MINIBATCH = 1024
QUICK_MINIBATCH = 256
TOP_K = 5  # the paper's soft alignment index: the top-5 most similar baseline layers
PAPER_CLAIM = (
    "by CKA, Engram-27B's layer 5 is most similar to MoE-27B's layer 12 (soft alignment index "
    "over the top-5 layers, unbiased minibatch HSIC, on entity-final tokens)"
)


# ---- the estimator -------------------------------------------------------------------------------
def _kernel_terms(features: Sequence[torch.Tensor], n: int) -> tuple[torch.Tensor, ...]:
    """Centred float64 features [n, sum p], block sizes, diag(K) [R, n] and K~1 [R, n]."""
    if n < 4 or any(f.ndim != 2 or f.shape[0] != n for f in features):
        raise ValueError(
            f"need representations [n, p] with the same n >= 4 rows, got "
            f"{[list(f.shape) for f in features]}"
        )
    xs = [f.double() - f.double().mean(dim=0) for f in features]  # exact: HSIC_1 is shift-free
    sq = torch.stack([x.pow(2).sum(dim=1) for x in xs])  # [R, n] diag of each K
    ones = torch.stack([x @ x.sum(dim=0) for x in xs]) - sq  # [R, n] K~ 1
    return torch.cat(xs, dim=1), [x.shape[1] for x in xs], sq, ones


def hsic1_matrix(
    features: Sequence[torch.Tensor], others: Sequence[torch.Tensor] | None = None
) -> torch.Tensor:
    """HSIC_1 [R, S] (float64) of every pair of representations [n, p] of the same n rows:
    `features` (R of them) against `others` (S; default: `features` itself)."""
    n = features[0].shape[0]
    zx, px, sqx, onesx = _kernel_terms(features, n)
    zy, py, sqy, onesy = (zx, px, sqx, onesx) if others is None else _kernel_terms(others, n)
    gram = (zx.T @ zy).split(px, dim=0)  # blocks X_r^T Y_s
    cross = torch.stack([torch.stack([g.pow(2).sum() for g in b.split(py, 1)]) for b in gram])
    trace = cross - sqx @ sqy.T  # tr(K~ L~)
    totals = torch.outer(onesx.sum(dim=1), onesy.sum(dim=1))  # 1'K~1 1'L~1
    return (trace + totals / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * onesx @ onesy.T) / (n * (n - 3))


class HsicAccumulator:
    """Sums HSIC_1 of every pair of R representations over minibatches; `cka()` normalises."""

    def __init__(self, num: int) -> None:
        self.total = torch.zeros(num, num, dtype=torch.float64)
        self.count = 0

    def update(self, features: Sequence[torch.Tensor]) -> None:
        if len(features) != self.total.shape[0]:
            raise RuntimeError(
                f"expected {self.total.shape[0]} representations, got {len(features)}"
            )
        self.total += hsic1_matrix(features).cpu()
        self.count += 1

    def hsic(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no minibatch accumulated: nothing to estimate")
        return self.total / self.count

    def cka(self) -> torch.Tensor:
        """CKA [R, R]; NaN where a representation's HSIC_1 with itself is not positive."""
        h = self.hsic()
        norm = h.diagonal().clamp(min=0).sqrt()
        scale = torch.outer(norm, norm)
        return torch.where(scale > 0, h / scale, torch.full_like(h, float("nan")))


def linear_cka(x: torch.Tensor, y: torch.Tensor, minibatch: int | None = None) -> float:
    """Unbiased linear CKA of x [n, p] and y [n, q], over consecutive minibatches of the rows."""
    size = minibatch or x.shape[0]
    acc = HsicAccumulator(2)
    for begin in range(0, x.shape[0] - size + 1, size):
        acc.update([x[begin : begin + size], y[begin : begin + size]])
    return float(acc.cka()[0, 1])


class Minibatcher:
    """Cuts aligned [N_b, p_r] representation lists, pushed batch by batch, into minibatches of
    `size` rows: rows are shuffled within what is pending (the same permutation for every
    representation, so row j is one token everywhere) and leftovers carry into the next push.
    Shuffling mixes positions of several windows in a minibatch."""

    def __init__(self, size: int, seed: int = 0) -> None:
        if size < 4:
            raise ValueError(f"minibatch size {size} must be >= 4 (HSIC_1 divides by n - 3)")
        self.size = size
        self.gen = torch.Generator().manual_seed(seed)
        self.pending: list[torch.Tensor] | None = None

    def push(self, feats: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        """The full minibatches the rows pending with `feats` make; the rest stays pending."""
        if self.pending is None:
            pending = list(feats)
        else:
            pending = [torch.cat(p) for p in zip(self.pending, feats, strict=True)]
        rows = pending[0].shape[0]
        order = torch.randperm(rows, generator=self.gen).to(pending[0].device)
        pending = [p[order] for p in pending]
        full = rows - rows % self.size
        self.pending = [p[full:] for p in pending]
        return [[p[b : b + self.size] for p in pending] for b in range(0, full, self.size)]


def shuffled_minibatches(
    batches_: Iterable[Sequence[torch.Tensor]], size: int, seed: int = 0
) -> Iterator[list[torch.Tensor]]:
    """Minibatches of `size` rows from a stream of aligned [N_b, p_r] representation lists (see
    `Minibatcher`); a final remainder shorter than `size` is dropped."""
    batcher = Minibatcher(size, seed)
    for feats in batches_:
        yield from batcher.push(feats)


def soft_alignment(cka: torch.Tensor, top_k: int = TOP_K) -> list[dict[str, Any]]:
    """Per row of `cka` [A, B]: the argmax column and the soft index sum_j w_j j / sum_j w_j over
    the top_k most similar columns (all if fewer), with weights w_j = max(CKA_j, 0)."""
    if top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    k = min(top_k, cka.shape[1])
    rows = []
    for i, row in enumerate(cka.tolist()):
        top = sorted(range(len(row)), key=lambda j: row[j], reverse=True)[:k]
        weights = [max(row[j], 0.0) for j in top]
        total = sum(weights)
        soft = sum(w * j for w, j in zip(weights, top, strict=True)) / total if total else None
        rows.append(
            {
                "layer": i,
                "argmax": top[0],
                "top": top,
                "soft_index": soft,
                "shift": None if soft is None else soft - i,
            }
        )
    return rows


# ---- the study -----------------------------------------------------------------------------------
HELP = "layer-to-layer linear CKA (unbiased HSIC), Engram vs baseline, and alignment"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_pair_arguments(p, "cka", FULL_TOKENS)
    p.add_argument(
        "--minibatch",
        type=int,
        help=f"token positions per HSIC minibatch (default {MINIBATCH}; --quick {QUICK_MINIBATCH})",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=TOP_K,
        help=f"baseline layers in the soft alignment index (default {TOP_K}, as the paper)",
    )


def run_cli(args: argparse.Namespace) -> None:
    out = Path(args.out or ("runs/cka-quick" if args.quick else "runs/cka"))
    max_tokens = max_tokens_from_args(args, FULL_TOKENS)
    minibatch = args.minibatch
    if minibatch is None:
        minibatch = QUICK_MINIBATCH if args.quick else MINIBATCH
    if minibatch < 4:
        raise ValueError(f"--minibatch {minibatch} must be >= 4")
    if args.top_k < 1:
        raise ValueError(f"--top-k {args.top_k} must be >= 1")
    selections_of(args.tokens)  # a bad selection fails before any training
    run_cka(pairs_from_args(args, out), max_tokens, out, minibatch, args.top_k, args.tokens)


class _Estimate:
    """One token selection's CKA: its minibatches, the HSIC sums, and the rolled-rows null."""

    def __init__(self, num_a: int, num_b: int, minibatch: int, seed: int) -> None:
        self.num_a = num_a
        self.batcher = Minibatcher(minibatch, seed)
        self.acc = HsicAccumulator(num_a + num_b)
        self.null = torch.zeros(num_a, num_b, dtype=torch.float64)

    def push(self, feats: list[torch.Tensor]) -> None:
        a = self.num_a
        for chunk in self.batcher.push(feats):
            self.acc.update(chunk)
            self.null += hsic1_matrix(chunk[:a], [f.roll(1, dims=0) for f in chunk[a:]]).cpu()

    def result(self) -> dict[str, Any]:
        acc, a = self.acc, self.num_a
        cka = acc.cka()
        # HSIC_1(L, L) is invariant to permuting rows, so the diagonal normalises the null too.
        norm = acc.hsic().diagonal().clamp(min=0).sqrt()
        null_cka = self.null / acc.count / torch.outer(norm[:a], norm[a:])
        return {
            "minibatches": acc.count,
            "tokens": acc.count * self.batcher.size,
            "cka": cka[:a, a:].tolist(),  # [A layers, B layers]
            "self_cka_engram": cka[:a, :a].tolist(),
            "self_cka_baseline": cka[a:, a:].tolist(),
            "null_cka": null_cka.tolist(),
            "null_cka_max_abs": float(null_cka.abs().max()),
            "hsic_diagonal": acc.hsic().diagonal().tolist(),
        }


def measure(
    pair: Pair, max_tokens: int, minibatch: int, seed: int = 0, tokens: str = "all"
) -> dict[str, Any]:
    """CKA between all n_A + 1 + n_B + 1 representations, accumulated over minibatches, and a
    null: A against B with B's rows rolled by one (each A token paired with another token).
    Over every position; with `tokens="entity-final"`, the same over those under `entity_final`."""
    selections = selections_of(tokens)
    num_a = pair.engram.config.model.n_layers + 1
    num_b = pair.baseline.config.model.n_layers + 1
    estimates = {name: _Estimate(num_a, num_b, minibatch, seed) for name in selections}
    for ids, _, masks in selected_batches(pair, max_tokens, selections):
        feats = []  # A's then B's n_layers + 1 streams as [B*T, d] (branches combined)
        for trained in (pair.engram, pair.baseline):
            _, streams = forward_with_streams(trained.model, ids)
            feats += [combined(s).flatten(0, 1).float() for s in streams]
        for name, mask in masks.items():
            rows = mask.flatten().to(feats[0].device)
            estimates[name].push(feats if name == "all" else [f[rows] for f in feats])
    for name, estimate in estimates.items():
        if estimate.acc.count == 0:
            which = "positions" if name == "all" else f"{name} positions"
            raise ValueError(
                f"--max-tokens {max_tokens} gave no full minibatch of {minibatch} {which}: "
                "raise --max-tokens or lower --minibatch"
            )
    result = estimates["all"].result()
    if tokens != "all":
        result["entity_final"] = estimates[tokens].result()
    return result


def _summarised(result: dict[str, Any], top_k: int) -> dict[str, Any]:
    """`result` with its alignment and the self-CKA check (and those of its entity-final part)."""
    diagonals = [
        torch.tensor(result[key]).diagonal() for key in ("self_cka_engram", "self_cka_baseline")
    ]
    summary = {
        **result,
        "alignment": soft_alignment(torch.tensor(result["cka"]), top_k),
        "self_cka_diagonal_max_error": float(max((d - 1).abs().max() for d in diagonals)),
    }
    if "entity_final" in result:
        summary["entity_final"] = _summarised(result["entity_final"], top_k)
    return summary


def run_cka(
    pairs: Pair | Sequence[Pair],
    max_tokens: int,
    out_dir: str | Path,
    minibatch: int = MINIBATCH,
    top_k: int = TOP_K,
    tokens: str = "all",
) -> dict[str, Any]:
    """CKA heat map, alignment and self-CKA of each pair on `max_tokens` validation tokens (with
    several pairs, e.g. seeds, of the mean CKA, and every pair's results under `per_seed`)."""
    start = time.perf_counter()
    pairs = [pairs] if isinstance(pairs, Pair) else list(pairs)
    raw = [measure(pair, max_tokens, minibatch, tokens=tokens) for pair in pairs]
    mean = mean_over_pairs(raw)
    # The noise floor of several pairs: the largest of any.
    mean["null_cka_max_abs"] = max(r["null_cka_max_abs"] for r in raw)
    if "entity_final" in mean:
        floors = [r["entity_final"]["null_cka_max_abs"] for r in raw]
        mean["entity_final"]["null_cka_max_abs"] = max(floors)
    first = pairs[0]
    report = {
        "config": {
            "data": first.data,
            "max_tokens": max_tokens,
            "minibatch": minibatch,
            "seq_len": first.seq_len,
            "top_k": top_k,
            "tokens": tokens,
            "seeds": [p.seed for p in pairs],
        },
        "models": {arm: first.describe(arm) for arm in ("engram", "baseline")},
        **_summarised(mean, top_k),
        "paper_claim": PAPER_CLAIM,
        "machine": machine_info(),
    }
    if len(pairs) > 1:
        report["per_seed"] = [
            {"seed": p.seed, "paths": list(p.paths), **_summarised(r, top_k)}
            for p, r in zip(pairs, raw, strict=True)
        ]
    report["seconds"] = time.perf_counter() - start
    save_report(out_dir, report, "cka.png", _plot, _markdown)
    return report


def _matrix(matrix: list[list[float]], row_name: str, col_name: str) -> str:
    headers = [f"{row_name} \\ {col_name}"] + [str(j) for j in range(len(matrix[0]))]
    rows = [[i] + [f"{v:.3f}" for v in row] for i, row in enumerate(matrix)]
    return markdown_table(headers, rows)


def _models(report: dict) -> str:
    return "\n".join(
        f"- {arm}: `{d['path']}` (step {d['step']}, {d['n_layers']} layers, M = "
        f"{d['hc_branches']}, Engram layers {d['engram_layers'] or 'none'})"
        for arm, d in report["models"].items()
    )


def _alignment(result: dict, k: int) -> str:
    rows = [
        [
            a["layer"],
            a["argmax"],
            ", ".join(map(str, a["top"])),
            "-" if a["soft_index"] is None else f"{a['soft_index']:.2f}",
            "-" if a["shift"] is None else f"{a['shift']:+.2f}",
        ]
        for a in result["alignment"]
    ]
    return markdown_table(
        ["A layer", "most similar B layer", f"top-{k}", "soft index", "shift"], rows
    )


def _entity_section(report: dict, k: int) -> str:
    """The entity-final positions' alignment and CKA (`--tokens entity-final`), or nothing."""
    entity = report.get("entity_final")
    if entity is None:
        return ""
    return f"""
## Entity-final tokens

{entity["tokens"]:,} positions ({entity["minibatches"]} minibatches): the last piece of each
identifier and string literal, as the paper reads CKA. Noise floor (rows rolled by one):
{entity["null_cka_max_abs"]:.4f}.

{_alignment(entity, k)}

{_matrix(entity["cka"], "A", "B")}
"""


def _scope(report: dict) -> str:
    c = report["config"]
    seeds = (
        f" Means over the pairs of seeds {c['seeds']} (each seed's results in report.json)."
        if "per_seed" in report
        else ""
    )
    if c.get("tokens", "all") == "all":
        return "every position, not only entity-final tokens as in the paper)." + seeds
    return "every position; entity-final tokens, as in the paper, further down)." + seeds


def _markdown(report: dict, plot: Path | None) -> str:
    c, m = report["config"], report["machine"]
    k = min(c["top_k"], len(report["cka"][0]))
    shallow = (
        f" With all {k} B layers weighted and similar CKA values, the index is pulled towards "
        "B's middle layer: read the most similar layer too, or pass a smaller --top-k."
        if k == len(report["cka"][0]) and k > 1
        else ""
    )
    models = _models(report)
    return f"""# Linear CKA between the Engram model (A) and its baseline (B)

{report["tokens"]:,} validation token positions of `{c["data"]}` ({report["minibatches"]}
minibatches of {c["minibatch"]}, positions shuffled across windows of {c["seq_len"]};
{_scope(report)} Machine: {m["processor"]}, {m["cpu_count"]} CPUs, torch {m["torch"]}, commit
{m["commit"]}; {report["seconds"]:.1f} s.

{models}

Representation 0 is the embedding, i the residual stream after i blocks (branches combined as the
head reads them). CKA uses the unbiased minibatch HSIC estimator, so values near 0 mean
unrelated and small negative values are noise. Soft alignment index of A layer i:
sum_j w_j j / sum_j w_j over its top-{k} most similar B layers j, weights w_j = max(CKA(i, j), 0)
(the paper uses top-5; all layers when B has fewer). Shift = index - i: positive means A's layer
looks like a deeper B layer.{shallow}

- Paper: {report["paper_claim"]}.
- Self-CKA sanity check: the diagonals of A-vs-A and B-vs-B are 1 within
  {report["self_cka_diagonal_max_error"]:.1e} (every representation has a positive HSIC_1 with
  itself; the within-model tables are at the end).
- Noise floor: with B's positions mismatched to A's (rows rolled by one), the largest |CKA| over
  all layer pairs is {report["null_cka_max_abs"]:.4f}: the estimator's noise scale at this
  sample size (not a confidence interval for the differences between layer pairs).

{f"![CKA heat map]({plot.name})" if plot else "(no plot: matplotlib is missing)"}

## Alignment of A's layers

{_alignment(report, k)}

## CKA, A layers (rows) vs B layers (columns)

{_matrix(report["cka"], "A", "B")}
{_entity_section(report, k)}
## Self-CKA within A

{_matrix(report["self_cka_engram"], "A", "A")}

## Self-CKA within B

{_matrix(report["self_cka_baseline"], "B", "B")}
"""


def _plot(report: dict, path: Path) -> Path | None:
    """Heat map (A layers on y, B layers on x) with the soft alignment index drawn over it."""
    plt = pyplot()
    if plt is None:
        return None
    cka = torch.tensor(report["cka"])
    fig, ax = plt.subplots(figsize=(6.5, 5.5), dpi=120)
    image = ax.imshow(cka.numpy(), origin="lower", cmap="viridis", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="linear CKA (unbiased)")
    if cka.numel() <= 400:  # numbers stay legible up to ~20 x 20
        for (i, j), v in zip(
            torch.cartesian_prod(*map(torch.arange, cka.shape)).tolist(),
            cka.flatten().tolist(),
            strict=True,
        ):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
    soft = [(a["soft_index"], a["layer"]) for a in report["alignment"]]
    soft = [point for point in soft if point[0] is not None]
    if soft:
        label = f"soft index (top-{min(report['config']['top_k'], cka.shape[1])})"
        ax.plot(*zip(*soft, strict=True), "r.-", label=label)
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xticks(range(cka.shape[1]))
    ax.set_yticks(range(cka.shape[0]))
    ax.set_xlabel("baseline layer (0 = embedding)")
    ax.set_ylabel("Engram layer (0 = embedding)")
    ax.set_title("Linear CKA, Engram (A) vs baseline (B)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = [
    "FULL_TOKENS",
    "MINIBATCH",
    "PAPER_CLAIM",
    "HsicAccumulator",
    "Minibatcher",
    "hsic1_matrix",
    "linear_cka",
    "measure",
    "run_cka",
    "shuffled_minibatches",
    "soft_alignment",
]
