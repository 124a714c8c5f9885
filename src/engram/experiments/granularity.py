"""`engram study granularity`: the MoE baseline's expert granularity, and a learning-rate check.

Engram should beat the strongest MoE we can build, not merely the demo's. DeepSeekMoE
(arXiv 2401.06066) finds finer experts better at equal parameters, so this study cuts the demo
preset's routed experts g times finer (`granular`: g x the experts, g x top_k, 1/g the width),
which keeps the routed experts' total and active widths and the shared expert's width; only
the router (d x E per MoE layer) grows with E, so P_tot and P_act move by the router alone, and
the report lists both per arm. Every granularity trains on the same tokens for every seed; the
lowest mean validation loss names the baseline, and `best_baseline(report)` hands it to other
studies. The learning-rate check then trains that MoE and its iso-parameter Engram arm
(`plan_from_moe` at rho, as `engram demo` plans it) at each lr, so neither side wins by tuning.

A difference counts as resolved only when its mean exceeds twice the larger seed spread
(max - min) of the two arms (docs/findings.md); one seed resolves nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from engram.assembly import get_tokenizer
from engram.config import from_dict, parse_assignments, to_dict
from engram.experiments.arms import (
    STUDY_TRAIN,
    Study,
    add_recipe_argument,
    add_set_argument,
    aggregate,
    study_from_args,
    tokens_per_arm,
    train_arm,
    train_runs,
)
from engram.experiments.report import machine_info, markdown_table, pyplot, write_json
from engram.model import ModelConfig, MoEConfig, granular, model_preset
from engram.model.accounting import count_params_from_config
from engram.model.planner import AllocationPlan, plan_from_moe

REFERENCE = 1.0  # the preset's own MoE (the demo's baseline): every granularity's comparison


@dataclass(frozen=True)
class GranularityConfig(Study):
    """The sweep (granularities x seeds) and the lr check (lrs x lr_seeds x {MoE, Engram})."""

    granularities: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    seeds: tuple[int, ...] = (0, 1)
    lrs: tuple[float, ...] = (1.5e-3, 3e-3, 6e-3)  # around STUDY_TRAIN's 3e-3; () skips the check
    lr_seeds: tuple[int, ...] = (0,)
    rho: float = 0.8  # the lr check's Engram arm: routed experts' share of P_sparse, as the demo
    out_dir: str = "runs/granularity"

    def validate(self) -> None:
        if self.baseline:  # a recipe may set any study's field; this study makes the baseline
            raise ValueError(
                f"baseline={self.baseline!r}: the granularity study chooses the baseline, it "
                "does not take one"
            )
        gs = self.granularities
        if len(gs) < 2 or REFERENCE not in gs or len(set(gs)) != len(gs):
            raise ValueError(
                f"granularities={list(gs)} must hold 1 (the preset's baseline, which the others "
                "are compared with) and at least one other, without repeats"
            )
        if any(not (math.isfinite(lr) and lr > 0) for lr in self.lrs):
            raise ValueError(f"lrs={list(self.lrs)} must be positive")
        if self.lrs and not self.lr_seeds:
            raise ValueError("lr_seeds must not be empty when lrs are given")
        if not 0.0 < self.rho < 1.0:
            raise ValueError(f"rho={self.rho} must be in (0, 1): the Engram arm needs a table")
        if self.lrs and "optim.lr" in parse_assignments(list(self.overrides)):
            raise ValueError(
                "--set optim.lr would replace every arm's lr, the lr check's too: "
                "use --lrs (or --lrs none and --set optim.lr)"
            )
        self.validate_training()
        granularity_arms(model_preset(self.preset), gs)  # an uneven g fails before training


QUICK = GranularityConfig(
    granularities=(0.5, 1.0, 2.0),
    seeds=(0,),
    lrs=(1.5e-3, 3e-3),
    train=replace(STUDY_TRAIN, steps=20, seq_len=64, batch_size=8, eval_tokens=8192),
    out_dir="runs/granularity-quick",
)

HELP = "the MoE baseline's expert granularity at fixed widths, and an lr check with Engram"
LISTS = {"granularities": float, "lrs": float, "lr_seeds": int}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="3 granularities, 20 tiny steps")
    add_recipe_argument(p)
    p.add_argument("--granularities", help="comma-separated g, must hold 1 (default 0.5,1,2,4)")
    p.add_argument("--seeds", help="comma-separated seeds of the sweep (default 0,1)")
    p.add_argument("--lrs", help="comma-separated lrs of the lr check, or none to skip it")
    p.add_argument("--lr-seeds", help="comma-separated seeds of the lr check (default 0)")
    p.add_argument("--rho", type=float, help="the lr check's Engram allocation (default 0.8)")
    p.add_argument("--steps", type=int, help="training steps per arm (default 300)")
    p.add_argument("--data", help="text source (default: the stdlib corpus)")
    p.add_argument("--out", help="report folder (default runs/granularity[-quick])")
    add_set_argument(p)


def run_cli(args: argparse.Namespace) -> None:
    changes: dict[str, Any] = {}
    if (args.lrs or "").strip().lower() == "none":
        changes["lrs"] = ()
        args = argparse.Namespace(**{**vars(args), "lrs": None})
    if args.rho is not None:
        changes["rho"] = args.rho
    run_granularity(study_from_args(args, GranularityConfig(), QUICK, LISTS, **changes))


def arm_name(g: float) -> str:
    return f"g-{g:g}"


def granularity_arms(base: ModelConfig, granularities: tuple[float, ...]) -> dict[str, ModelConfig]:
    """Arm name -> the preset's MoE baseline (no Engram) with its experts cut g times finer."""
    if base.moe is None:
        raise ValueError("the granularity study needs an MoE preset: its moe is None")
    return {arm_name(g): base.with_(engram=None, moe=granular(base.moe, g)) for g in granularities}


def verdict(diff: float, spread_a: float, spread_b: float, seeds: int) -> str:
    """A difference is resolved when |mean difference| exceeds twice the larger seed spread of
    the two arms (docs/findings.md); one seed measures no spread, so it resolves nothing."""
    if seeds < 2:
        return "unresolved"
    return "resolved" if abs(diff) > 2 * max(spread_a, spread_b) else "unresolved"


def compare(arm: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """`arm` - `ref` (aggregates over the same seeds, in order): per seed, mean, verdict."""
    per_seed = [
        a - r for a, r in zip(arm["val_loss_per_seed"], ref["val_loss_per_seed"], strict=True)
    ]
    mean = sum(per_seed) / len(per_seed)
    noise = max(arm["val_loss_spread"], ref["val_loss_spread"])
    return {
        "diff_per_seed": per_seed,
        "diff_mean": mean,
        "threshold": 2 * noise,
        "verdict": verdict(mean, arm["val_loss_spread"], ref["val_loss_spread"], len(per_seed)),
    }


def _arm_record(g: float, model: ModelConfig, agg: dict[str, Any]) -> dict[str, Any]:
    """One granularity's layout, accounting (the router apart) and losses over seeds."""
    counts = count_params_from_config(model)
    moe = model.moe
    return {
        "g": g,
        "name": arm_name(g),
        "num_routed": moe.num_routed,
        "top_k": moe.top_k,
        "expert_hidden": moe.expert_hidden,
        "shared_hidden": moe.shared_width,
        "p_tot": counts.p_tot,
        "p_act": counts.p_act,
        "router": counts.router,
        **{k: v for k, v in agg.items() if k not in ("curve", "band", "p_tot", "p_act")},
    }


def run_sweep(
    cfg: GranularityConfig, arms: dict[str, ModelConfig], out: Path
) -> list[dict[str, Any]]:
    """Train every granularity for every seed into out/seed-N/g-G; records with comparisons."""
    runs = train_runs(cfg, arms, lambda seed: out / f"seed-{seed}")
    records = [
        _arm_record(g, arms[arm_name(g)], aggregate(runs[arm_name(g)])) for g in cfg.granularities
    ]
    ref = next(r for r in records if r["g"] == REFERENCE)
    for r in records:
        r["vs_reference"] = compare(r, ref) if r is not ref else None
    return records


def choose_best(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The lowest mean loss, and whether that choice is resolved against the reference: for
    another g its own comparison; for the reference itself, its runner-up's."""
    ranked = sorted(records, key=lambda r: r["val_loss"])
    best = ranked[0]
    against = ranked[1]["vs_reference"] if best["g"] == REFERENCE else best["vs_reference"]
    return {"name": best["name"], "g": best["g"], "val_loss": best["val_loss"], **against}


def plan_engram(moe_model: ModelConfig, base: ModelConfig, rho: float) -> AllocationPlan:
    """The iso-parameter Engram arm of `moe_model`, with the preset's Engram layout."""
    return plan_from_moe(moe_model, rho, engram=base.engram)


def _lr_runs(
    cfg: GranularityConfig, models: dict[str, ModelConfig], lr: float, folders: dict
) -> dict[str, list[dict[str, Any]]]:
    """Both sides of the lr check at one lr, every lr seed; `folders[(side, seed, lr)]` says
    where a run lives when not under out/lr-X (the sweep's own run at the template lr: reused)."""
    runs: dict[str, list[dict]] = {side: [] for side in models}
    for seed in cfg.lr_seeds:
        for side, model in models.items():
            folder = folders.get((side, seed, lr))
            folder = folder or Path(cfg.out_dir) / f"lr-{lr:g}" / f"seed-{seed}" / side
            print(f"\n== lr {lr:g}: {side} (seed {seed}) ==", flush=True)
            optim = replace(cfg.train.optim, lr=lr)
            runs[side].append(train_arm(cfg.arm(model, seed, folder, optim=optim), cfg.reuse))
    return runs


def run_lr_check(
    cfg: GranularityConfig, best: str, moe_model: ModelConfig, plan: AllocationPlan, sweep: Path
) -> dict[str, Any]:
    """Train the chosen MoE and its Engram arm at every lr; the table and the gap's sign."""
    models = {"moe": moe_model, "engram": plan.config}
    # At the template's own lr the MoE run is the sweep's: identical config, read back.
    base_lr = cfg.train.optim.lr
    folders = {("moe", s, base_lr): sweep / f"seed-{s}" / best for s in cfg.seeds}
    points = []
    for lr in cfg.lrs:
        agg = {side: aggregate(r) for side, r in _lr_runs(cfg, models, lr, folders).items()}
        moe, engram = agg["moe"], agg["engram"]
        gap = compare(moe, engram)  # MoE - Engram: positive is Engram better
        keep = ("val_loss", "val_loss_spread", "val_loss_per_seed", "p_tot", "p_act")
        points.append(
            {
                "lr": lr,
                **{side: {k: a[k] for k in keep} for side, a in agg.items()},
                "gap": gap["diff_mean"],
                "gap_per_seed": gap["diff_per_seed"],
                "verdict": gap["verdict"],
            }
        )
    return {
        "lrs": list(cfg.lrs),
        "seeds": list(cfg.lr_seeds),
        "moe": best,
        "engram_plan": {
            "rho": plan.rho,
            "num_routed": plan.num_routed,
            "table_params": plan.counts.engram_tables,
            "p_tot": plan.counts.p_tot,
            "p_act": plan.counts.p_act,
            "warnings": plan.warnings,
        },
        "points": points,
        **lr_summary(points),
    }


def lr_summary(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether Engram-vs-MoE keeps its sign at every lr (every seed too), each side's best lr,
    and the gap between the two sides each at its own best lr."""
    gaps = [g for p in points for g in p["gap_per_seed"]]
    best = {
        side: min(points, key=lambda p, side=side: p[side]["val_loss"])
        for side in ("moe", "engram")
    }
    lrs = [p["lr"] for p in points]
    return {
        "sign_holds": all(g > 0 for g in gaps) or all(g < 0 for g in gaps),
        "engram_better_everywhere": all(g > 0 for g in gaps),
        "best_lr": {side: p["lr"] for side, p in best.items()},
        # A best lr at an end of the sweep may not be that side's optimum.
        "best_lr_at_edge": {
            side: len(lrs) > 1 and p["lr"] in (min(lrs), max(lrs)) for side, p in best.items()
        },
        "tuned_gap": best["moe"]["moe"]["val_loss"] - best["engram"]["engram"]["val_loss"],
    }


def best_baseline(report_path: str | Path, preset: str | None = None) -> MoEConfig:
    """The MoE config a granularity study chose (`best_moe` of its report.json, or a folder
    holding one): the baseline other studies compare Engram with. With `preset`, the report
    must have swept that preset: its experts' widths are absolute, so another preset's model
    would get experts of the wrong width (ValueError)."""
    path = Path(report_path)
    path = path / "report.json" if path.is_dir() else path
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read a granularity report at {path}: {e}") from None
    if not isinstance(report, dict) or "best_moe" not in report:
        raise ValueError(f"{path} has no best_moe: not a granularity study's report")
    swept = report.get("config", {}).get("preset")
    if preset is not None and swept != preset:
        raise ValueError(
            f"{path} chose among {swept!r}'s MoEs, not {preset!r}'s: run `engram study "
            f"granularity --preset {preset}` for this preset's baseline"
        )
    moe = from_dict(MoEConfig, report["best_moe"], prefix="best_moe.")
    moe.validate()
    return moe


def run_granularity(cfg: GranularityConfig = GranularityConfig()) -> dict[str, Any]:
    """Train the sweep, then the lr check; write report.json, report.md and granularity.png."""
    cfg.validate()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = model_preset(cfg.preset)
    arms = granularity_arms(base, cfg.granularities)
    first = cfg.arm(arms[arm_name(REFERENCE)], cfg.seeds[0], out)
    get_tokenizer(first.tokenizer, first.data)  # built once, before the arms' clocks start
    records = run_sweep(cfg, arms, out / "sweep")
    best = choose_best(records)
    best_model = arms[best["name"]]
    lr_check = None
    if cfg.lrs:
        plan = plan_engram(best_model, base, cfg.rho)
        lr_check = run_lr_check(cfg, best["name"], best_model, plan, out / "sweep")
    report = {
        "arms": records,
        "reference": arm_name(REFERENCE),
        "best": best,
        "best_moe": to_dict(best_model.moe),
        "lr_check": lr_check,
        "tokens_per_arm": tokens_per_arm(first),
        # As every arm trains, `--set` overrides included (the lr check replaces only the lr).
        "train": {
            k: getattr(first, k) for k in ("steps", "batch_size", "seq_len", "eval_tokens", "data")
        }
        | {"lr": first.optim.lr},
        "config": cfg.report_config("steps"),
        "machine": machine_info(),
        "seconds": time.perf_counter() - start,
    }
    write_json(out / "report.json", report)
    png = _plot(report, out / "granularity.png")
    text = _markdown(report, png)
    (out / "report.md").write_text(text)
    print(text)
    return report


def _plot(report: dict[str, Any], path: Path) -> Path | None:
    """Loss against g (every seed and the mean) and, with an lr check, loss against lr."""
    plt = pyplot()
    if plt is None:
        return None
    lr = report["lr_check"]
    fig, axes = plt.subplots(1, 2 if lr else 1, figsize=(11 if lr else 6, 4.5), dpi=120)
    ax = axes[0] if lr else axes
    gs = [a["g"] for a in report["arms"]]
    for i in range(len(report["arms"][0]["val_loss_per_seed"])):
        seed = report["arms"][0]["seeds"][i]
        ys = [a["val_loss_per_seed"][i] for a in report["arms"]]
        ax.plot(gs, ys, marker="o", linestyle=":", alpha=0.6, label=f"seed {seed}")
    ax.plot(gs, [a["val_loss"] for a in report["arms"]], marker="s", color="black", label="mean")
    ax.set_xscale("log", base=2)
    ax.set_xticks(gs, [f"{g:g}" for g in gs])
    ax.set(xlabel="granularity g (experts x g, top_k x g, width / g)", ylabel="validation loss")
    ax.set_title("MoE baseline: validation loss against granularity")
    if lr:
        lrs = [p["lr"] for p in lr["points"]]
        for side in ("moe", "engram"):
            axes[1].plot(lrs, [p[side]["val_loss"] for p in lr["points"]], marker="o", label=side)
        axes[1].set_xscale("log")
        axes[1].set_xticks(lrs, [f"{x:g}" for x in lrs])
        axes[1].minorticks_off()
        axes[1].set(xlabel="learning rate", ylabel="validation loss")
        axes[1].set_title(f"lr check: {lr['moe']} vs its Engram arm")
    for a in axes if lr else [axes]:
        a.grid(True, alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _losses(values: list[float]) -> str:
    return ", ".join(f"{v:.4f}" for v in values)


def _sweep_markdown(report: dict[str, Any]) -> list[str]:
    rows = [
        [
            f"{a['g']:g}",
            f"{a['num_routed']} x {a['expert_hidden']} top-{a['top_k']}",
            a["shared_hidden"],
            f"{a['p_tot']:,}",
            f"{a['p_act']:,}",
            f"{a['router']:,}",
            _losses(a["val_loss_per_seed"]),
            f"{a['val_loss']:.4f}",
            f"{a['val_loss_spread']:.4f}",
            "reference"
            if a["vs_reference"] is None
            else _losses(a["vs_reference"]["diff_per_seed"]),
            "" if a["vs_reference"] is None else f"{a['vs_reference']['diff_mean']:+.4f}",
            "" if a["vs_reference"] is None else a["vs_reference"]["verdict"],
        ]
        for a in report["arms"]
    ]
    headers = [
        "g",
        "routed (E x width, top-k)",
        "shared",
        "P_tot",
        "P_act",
        "router",
        "val loss per seed",
        "mean",
    ]
    headers += ["spread", "diff vs g=1 per seed", "mean diff", "verdict"]
    best, ref = report["best"], report["reference"]
    against = "its runner-up" if best["name"] == ref else ref
    return [
        markdown_table(headers, rows),
        "\nP_tot and P_act include the routers (d x E per MoE layer, the `router` column): the "
        "only parameters granularity changes. A diff is the arm's loss minus g=1's on the same "
        "seed (negative: better than the demo's baseline); resolved means |mean diff| > twice "
        "the larger seed spread (max - min) of the two arms.\n",
        f"**Chosen baseline: {best['name']}** (lowest mean validation loss, "
        f"{best['val_loss']:.4f}); against {against} the choice is **{best['verdict']}** "
        f"(mean diff {best['diff_mean']:+.4f}, threshold {best['threshold']:.4f}).\n",
    ]


def _lr_markdown(lr: dict[str, Any]) -> list[str]:
    rows = [
        [
            f"{p['lr']:g}",
            f"{p['moe']['val_loss']:.4f} ({_losses(p['moe']['val_loss_per_seed'])})",
            f"{p['engram']['val_loss']:.4f} ({_losses(p['engram']['val_loss_per_seed'])})",
            f"{p['gap']:+.4f}",
            p["verdict"],
        ]
        for p in lr["points"]
    ]
    plan, moe = lr["engram_plan"], lr["points"][0]["moe"]
    edge = [{"moe": "MoE", "engram": "Engram"}[s] for s, at in lr["best_lr_at_edge"].items() if at]
    sign = "holds" if lr["sign_holds"] else "does not hold"
    who = "Engram" if lr["engram_better_everywhere"] else "not always Engram"
    one_seed = (
        " (one seed: no spread measured, so no gap is resolved)" if len(lr["seeds"]) < 2 else ""
    )
    return [
        f"## Learning-rate check: {lr['moe']} vs its Engram arm, seeds {lr['seeds']}\n",
        f"MoE {lr['moe']}: P_tot {moe['p_tot']:,}, P_act {moe['p_act']:,}. Engram arm: "
        f"`plan_from_moe` at rho {plan['rho']:.3f}, {plan['num_routed']} routed experts, a "
        f"{plan['table_params']:,}-parameter table; P_tot {plan['p_tot']:,}, P_act "
        f"{plan['p_act']:,}; planner warnings: {plan['warnings'] or 'none'}. Engram's tables "
        "train at their lr multiplier times each lr.\n",
        markdown_table(
            ["lr", "MoE val loss (per seed)", "Engram val loss (per seed)", "gap", "verdict"], rows
        ),
        f"\ngap = MoE - Engram, positive when Engram is better{one_seed}. "
        f"The sign {sign} at every lr and seed "
        f"(better: {who}). Best lr: MoE {lr['best_lr']['moe']:g}, Engram "
        f"{lr['best_lr']['engram']:g}; each at its own best lr, the gap is "
        f"{lr['tuned_gap']:+.4f}."
        + (
            f" The best lr of {' and '.join(edge)} lies at an end of the sweep: its optimum may "
            "lie beyond."
            if edge
            else ""
        )
        + "\n",
    ]


def _markdown(report: dict[str, Any], png: Path | None) -> str:
    c, t, m = report["config"], report["train"], report["machine"]
    threads = sorted({n for a in report["arms"] for n in a["torch_threads_per_seed"]}, key=str)
    parts = [
        "# MoE expert granularity at fixed routed widths (issue 17)\n",
        f"Preset `{c['preset']}` MoE (no Engram), seeds {c['seeds']}, "
        f"{report['tokens_per_arm']:,} tokens per arm ({t['steps']} steps of {t['batch_size']} "
        f"x {t['seq_len']}), lr {t['lr']:g}, data `{t['data']}`, validation on the same "
        f"{t['eval_tokens']:,} tokens. Machine {m['processor']}, {m['cpu_count']} CPUs, "
        f"torch {m['torch']}, torch threads {m['torch_threads']} (per run: {threads}), commit "
        f"{m['commit']}{' (dirty)' if m['commit_dirty'] else ''}; {report['seconds']:.0f} s.\n",
        *_sweep_markdown(report),
    ]
    if report["lr_check"] is not None:
        parts += _lr_markdown(report["lr_check"])
    if png is not None:
        parts.append(f"![loss against granularity and lr]({png.name})\n")
    return "\n".join(parts)


__all__ = [
    "QUICK",
    "GranularityConfig",
    "best_baseline",
    "choose_best",
    "compare",
    "granularity_arms",
    "lr_summary",
    "run_granularity",
    "verdict",
]
