"""`engram study allocation`: the sparsity-allocation sweep at fixed P_tot and P_act.

Paper section 3.1: with total and activated parameters fixed, move a share 1 - rho of the
sparse budget (the routed experts' inactive parameters) into Engram tables and train each
allocation with the same tokens. The paper finds a U-shaped validation loss with its optimum
near rho = 0.75-0.8 (1.7109 near rho = 0.8 vs 1.7248 at rho = 1.0 at 6e20 FLOPs), and pure MoE
matched already at rho = 0.4. Each compute budget (training steps) is a separate sweep.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from engram.assembly import get_tokenizer
from engram.experiments.arms import (
    STUDY_TRAIN,
    Study,
    add_baseline_argument,
    add_recipe_argument,
    add_set_argument,
    study_from_args,
    tokens_per_arm,
    train_arms,
)
from engram.experiments.report import (
    machine_info,
    markdown_table,
    plot_curves,
    write_json,
)
from engram.model import ModelConfig
from engram.model.accounting import training_flops_per_token
from engram.model.planner import plan_from_moe


@dataclass(frozen=True)
class AllocationConfig(Study):
    """The sweep: each budget (the template's steps replaced) trains every rho."""

    rhos: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.4, 0.2)
    budgets: tuple[int, ...] = (150, 300)  # training steps of 16 x 256 tokens
    out_dir: str = "runs/allocation"

    def validate(self) -> None:
        if not self.rhos or any(not 0.0 <= r <= 1.0 for r in self.rhos):
            raise ValueError(f"rhos={list(self.rhos)} must be non-empty and in [0, 1]")
        if not self.budgets or any(b < 1 for b in self.budgets):
            raise ValueError(f"budgets={list(self.budgets)} must be non-empty and >= 1 step")
        self.validate_training()


QUICK = AllocationConfig(
    rhos=(1.0, 0.8, 0.4),
    budgets=(10, 20),
    train=replace(STUDY_TRAIN, seq_len=64, batch_size=8, eval_tokens=8192),
    out_dir="runs/allocation-quick",
)


HELP = "loss against rho at fixed P_tot and P_act"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="3 rhos, 2 tiny budgets (a minute)")
    add_recipe_argument(p)  # e.g. recipes/gpu-allocation.toml: the sweep sized for one GPU
    p.add_argument("--rhos", help="comma-separated, e.g. 1.0,0.8,0.6")
    p.add_argument("--budgets", help="comma-separated training steps, e.g. 150,300")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1 (mean and spread)")
    p.add_argument("--data", help="text source (default: the stdlib corpus)")
    p.add_argument("--out", help="report folder (default runs/allocation[-quick])")
    add_baseline_argument(p)
    add_set_argument(p)


def run_cli(args: argparse.Namespace) -> None:
    lists = {"rhos": float, "budgets": int}
    run_allocation(study_from_args(args, AllocationConfig(), QUICK, lists))


def allocation_arms(base: ModelConfig, rhos: tuple[float, ...]) -> dict[float, Any]:
    """rho -> allocation plan, all at the P_tot and P_act of the preset's MoE baseline."""
    moe = base.with_(engram=None)
    return {rho: plan_from_moe(moe, rho, engram=base.engram) for rho in rhos}


def sweep_flops(cfg: AllocationConfig, plans: dict[float, Any] | None = None) -> float:
    """Model FLOPs of training every arm, seed and budget (`training_flops_per_token`, the
    arms' own steps, batch and seq_len after `--set`): what sizes a sweep for a machine."""
    plans = plans or allocation_arms(cfg.base_model(), cfg.rhos)
    total = 0.0
    for steps in cfg.budgets:
        for plan in plans.values():
            arm = cfg.arm(plan.config, cfg.seeds[0], cfg.out_dir, steps=steps)
            per_token = training_flops_per_token(arm.model, arm.seq_len)
            total += per_token * tokens_per_arm(arm) * len(cfg.seeds)
    return total


def run_allocation(cfg: AllocationConfig = AllocationConfig()) -> dict[str, Any]:
    """Train every (budget, rho) point; write report.json, report.md and allocation.png."""
    cfg.validate()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    plans = allocation_arms(cfg.base_model(), cfg.rhos)
    # Trained (or loaded) once before the arms, as they will use it: `--set` overrides included.
    first = cfg.arm(plans[cfg.rhos[0]].config, cfg.seeds[0], out, steps=cfg.budgets[0])
    get_tokenizer(first.tokenizer, first.data)
    by_tokens: dict[int, list[dict]] = {}
    for steps in cfg.budgets:
        arms = {f"rho-{rho}": plan.config for rho, plan in plans.items()}
        results = train_arms(cfg, arms, out / f"steps-{steps}", steps=steps)
        by_tokens[tokens_per_arm(replace(cfg.train, steps=steps))] = [
            {
                "rho": rho,
                "rho_achieved": plan.rho,
                **{k: v for k, v in results[f"rho-{rho}"].items() if k not in ("curve", "band")},
            }
            for rho, plan in plans.items()
        ]
    sweeps = {f"{tokens:,} tokens": points for tokens, points in by_tokens.items()}
    report = {
        "sweeps": sweeps,
        "config": cfg.report_config(),
        "training_flops": sweep_flops(cfg, plans),
        "machine": machine_info(),
        "seconds": time.perf_counter() - start,
    }
    report["u_shape"] = {label: u_shape(points) for label, points in sweeps.items()}
    report["trend"] = token_trend(by_tokens)
    report["trend_change"] = trend_change(report["trend"])
    write_json(out / "report.json", report)
    if report["trend"]:
        plot_trend(report["trend"], out / "gap_vs_tokens.png")
    plot_curves(
        {label: [[p["rho_achieved"], p["val_loss"]] for p in pts] for label, pts in sweeps.items()},
        out / "allocation.png",
        "Validation loss against allocation ratio rho (fixed P_tot, P_act)",
        xlabel="rho (share of the sparse budget in routed experts)",
        bands={
            label: [
                [p["rho_achieved"], min(p["val_loss_per_seed"]), max(p["val_loss_per_seed"])]
                for p in pts
            ]
            for label, pts in sweeps.items()
        }
        if len(cfg.seeds) > 1
        else None,
    )
    (out / "report.md").write_text(_markdown(report))
    print(_markdown(report))
    return report


def u_shape(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Is the loss U-shaped in rho at one budget (paper: optimum near 0.75-0.8, both ends worse)?
    The best rho by mean loss; each end's loss minus the best's, paired by seed, with the
    studies' verdict rule; the rhos within noise of the best (not resolved from it). Resolved
    when the best rho is interior and both ends are resolved worse. None below three rhos."""
    from engram.experiments.granularity import compare  # one verdict rule for every study

    if len(points) < 3:
        return None
    by_rho = sorted(points, key=lambda p: p["rho"])
    best = min(points, key=lambda p: p["val_loss"])
    ends = {"lowest_rho": by_rho[0], "highest_rho": by_rho[-1]}
    result: dict[str, Any] = {
        "best_rho": best["rho"],
        "interior": best not in ends.values(),
        "within_noise_of_best": [
            p["rho"] for p in by_rho if p is best or compare(p, best)["verdict"] == "unresolved"
        ],
    }
    for name, p in ends.items():
        result[name] = None if p is best else {"rho": p["rho"], **compare(p, best)}
    both_worse = all(r is not None and r["verdict"] == "resolved" for r in map(result.get, ends))
    result["verdict"] = "resolved" if result["interior"] and both_worse else "unresolved"
    return result


def _u_markdown(u: dict[str, Any] | None) -> str:
    if u is None:
        return ""
    ends = []
    for name in ("highest_rho", "lowest_rho"):
        end = u[name]
        if end is not None:
            per_seed = ", ".join(f"{d:+.4f}" for d in end["diff_per_seed"])
            ends.append(
                f"rho = {end['rho']} is {end['diff_mean']:+.4f} (per seed {per_seed}; "
                f"{end['verdict']}, threshold {end['threshold']:.4f})"
            )
    where = "an interior rho" if u["interior"] else "an end of the sweep"
    return (
        f"U-shape: the best mean loss is at rho = {u['best_rho']} ({where}); against it "
        f"{'; '.join(ends)}. Within noise of the best: rho in {u['within_noise_of_best']}. "
        f"U **{u['verdict']}** (an interior best with both ends resolved worse).\n"
    )


def token_trend(sweeps: dict[int, list[dict]]) -> list[dict[str, Any]]:
    """Does Engram's gain over the pure MoE hold as the budget grows? For every Engram rho, at
    every budget: MoE - Engram per seed (positive: Engram better), its mean and verdict (paired
    seeds; resolved above twice the larger seed spread). Empty without rho 1.0 or a second
    budget."""
    from engram.experiments.granularity import compare  # one verdict rule for every study

    if len(sweeps) < 2:
        return []
    trend = []
    for tokens, points in sweeps.items():
        moe = next((p for p in points if p["rho"] == 1.0), None)
        if moe is None:
            return []
        for p in points:
            if p is not moe:
                gap = compare(moe, p)  # MoE - Engram
                trend.append({"tokens": tokens, "rho": p["rho"], **gap})
    return trend


def trend_change(trend: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per Engram rho: its gain at the largest budget minus at the smallest, paired by seed, with
    the studies' verdict rule (resolved when |mean| exceeds twice the larger seed spread of the
    two gains): does the gap shrink with tokens, as critics of the paper report, or not?"""
    from engram.experiments.granularity import verdict

    def spread(t: dict[str, Any]) -> float:
        return max(t["diff_per_seed"]) - min(t["diff_per_seed"])

    changes = []
    for rho in sorted({t["rho"] for t in trend}, reverse=True):
        pts = sorted((t for t in trend if t["rho"] == rho), key=lambda t: t["tokens"])
        first, last = pts[0], pts[-1]
        per_seed = [
            b - a for a, b in zip(first["diff_per_seed"], last["diff_per_seed"], strict=True)
        ]
        mean = sum(per_seed) / len(per_seed)
        changes.append(
            {
                "rho": rho,
                "from_tokens": first["tokens"],
                "to_tokens": last["tokens"],
                "gains": [t["diff_mean"] for t in pts],
                "change_per_seed": per_seed,
                "change_mean": mean,
                "threshold": 2 * max(spread(first), spread(last)),
                "verdict": verdict(mean, spread(first), spread(last), len(per_seed)),
            }
        )
    return changes


def plot_trend(trend: list[dict[str, Any]], path: Path) -> None:
    rhos = sorted({t["rho"] for t in trend}, reverse=True)
    plot_curves(
        {f"rho {r}": [[t["tokens"], t["diff_mean"]] for t in trend if t["rho"] == r] for r in rhos},
        path,
        "Engram's gain over the pure MoE against training tokens",
        xlabel="training tokens per arm (log scale)",
        ylabel="val loss, MoE - Engram (nats; > 0: Engram better)",
        log2_x=True,
        zero_line=True,
        bands={
            f"rho {r}": [
                [t["tokens"], min(t["diff_per_seed"]), max(t["diff_per_seed"])]
                for t in trend
                if t["rho"] == r
            ]
            for r in rhos
        },
    )


def _trend_markdown(trend: list[dict[str, Any]], changes: list[dict[str, Any]]) -> list[str]:
    if not trend:
        return []
    rows = [
        [
            f"{t['tokens']:,}",
            t["rho"],
            f"{t['diff_mean']:+.4f}",
            ", ".join(f"{d:+.4f}" for d in t["diff_per_seed"]),
            f"{t['threshold']:.4f}",
            t["verdict"],
        ]
        for t in trend
    ]
    header = ["tokens", "rho", "MoE - Engram", "per seed", "2 x spread", "verdict"]
    lines = ["## Engram's gain against training tokens\n", markdown_table(header, rows)]
    for c in changes:
        lines.append(
            f"\nrho {c['rho']}: the gain {'grows' if c['change_mean'] > 0 else 'shrinks'} from "
            f"{c['gains'][0]:+.4f} at {c['from_tokens']:,} tokens to {c['gains'][-1]:+.4f} at "
            f"{c['to_tokens']:,} (by budget: {', '.join(f'{g:+.4f}' for g in c['gains'])}); "
            f"the change, {c['change_mean']:+.4f} (per seed "
            f"{', '.join(f'{d:+.4f}' for d in c['change_per_seed'])}), is **{c['verdict']}** "
            f"(threshold {c['threshold']:.4f}: twice the larger seed spread of the two gains)."
        )
    lines.append("\n![gain against tokens](gap_vs_tokens.png)\n")
    return lines


def _markdown(report: dict) -> str:
    parts = [
        "# Sparsity allocation sweep (paper section 3.1)\n",
        f"Preset `{report['config']['preset']}`, data `{report['config']['data']}`, seeds "
        f"{report['config']['seeds']}; machine {report['machine']['processor']}, commit "
        f"{report['machine']['commit']}; {report['seconds']:.0f} s.\n",
    ]
    for label, points in report["sweeps"].items():
        best = min(points, key=lambda p: p["val_loss"])
        moe = next((p for p in points if p["rho"] == 1.0), None)
        rows = [
            [
                p["rho"],
                f"{p['rho_achieved']:.3f}",
                p["routed_experts"],
                f"{p['table_params']:,}",
                f"{p['p_tot']:,}",
                f"{p['p_act']:,}",
                f"{p['val_loss']:.4f}",
                f"{p['val_loss_spread']:.4f}",
                ", ".join(f"{v:.4f}" for v in p["val_loss_per_seed"]),
            ]
            for p in points
        ]
        parts.append(f"## Budget: {label}\n")
        parts.append(
            markdown_table(
                [
                    "rho",
                    "achieved",
                    "routed experts",
                    "table params",
                    "P_tot",
                    "P_act",
                    "val loss (mean)",
                    "spread",
                    "per seed",
                ],
                rows,
            )
        )
        line = f"\nLowest loss at rho = {best['rho']} ({best['val_loss']:.4f})"
        if moe is not None:
            line += f"; pure MoE (rho = 1.0): {moe['val_loss']:.4f}"
        seeds = len(report["config"]["seeds"])
        noise = max(p["val_loss_spread"] for p in points)
        parts.append(
            line
            + (
                f". {seeds} seeds per point; the largest seed spread (max - min) is {noise:.4f}.\n"
                if seeds > 1
                else ". One seed per point: the seed noise is not measured here.\n"
            )
        )
        parts.append(_u_markdown(report.get("u_shape", {}).get(label)))
    parts.append("![validation loss against rho](allocation.png)\n")
    parts += _trend_markdown(report.get("trend", []), report.get("trend_change", []))
    return "\n".join(parts)
