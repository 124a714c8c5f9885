"""`engram study memory`: memory scaling on a fixed backbone, Engram against OverEncoding.

The paper's memory-scaling study (arXiv 2601.07372): on a fixed 3B-total / 568M-active backbone
trained on 100B tokens, validation loss falls log-linearly in the number of Engram memory slots,
from 2.58e5 to 1e7 slots (about 13B parameters), and Engram stays below OverEncoding (Huang et al.
2025: hashed N-gram embeddings added to the input embedding) with the same memory.

Slots, as the paper counts them: one slot is one memory vector e_t of width d_mem, so
slots = table parameters / d_mem (1e7 slots x d_mem 1280 = 12.8B, the paper's "about 13B").
Each of the H heads of a layer holds its own rows, so slots = table rows / H: the rows per head,
summed over the Engram layers. A requested size S asks every head for S / (Engram layers) rows;
primes are searched upward from that base size (unique across heads, orders and layers), so the
achieved slots are slightly above S and the report gives them, with the table rows behind them.

Arms, every one on the same tokens, schedule and seeds:
- `backbone`: the preset's MoE model without memory (all 64 routed experts of `demo` kept);
- `engram-S`: the same backbone plus Engram with S slots at the preset's layers. Memory is
  added on top, so P_tot grows with S: this is a scaling study, not an iso-parameter one;
- `overencoding-S`: the same tables and addresses (same spec), projected and added to the input
  embedding instead (`EngramOptions.site = "input"`), for a subset of the sizes.
For each family, a least-squares fit of loss = a + b log2(slots) gives the slope b (loss per
doubling of memory) and R^2.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from engram.assembly import get_tokenizer
from engram.config import TrainConfig
from engram.experiments.arms import (
    STUDY_TRAIN,
    Study,
    add_baseline_argument,
    add_set_argument,
    study_from_args,
    tokens_per_arm,
    train_arms,
)
from engram.experiments.report import (
    machine_info,
    markdown_table,
    pyplot,
    write_json,
)
from engram.model import ModelConfig, model_preset
from engram.spec import derive_primes

FAMILIES = ("engram", "overencoding")
_SITE = {"engram": "block", "overencoding": "input"}


MEMORY_TRAIN = replace(STUDY_TRAIN, steps=150)  # 614k tokens, ~2.5 minutes per arm on 2 cores


@dataclass(frozen=True)
class MemoryConfig(Study):
    train: TrainConfig = MEMORY_TRAIN
    slots: tuple[int, ...] = (2**11, 2**12, 2**13, 2**14, 2**15, 2**16)  # requested, per family
    overencoding_slots: tuple[int, ...] = (2**12, 2**14, 2**16)  # a subset of `slots`
    out_dir: str = "runs/memory"

    def validate(self) -> None:
        engram = model_preset(self.preset).engram
        if engram is None:
            raise ValueError(f"preset {self.preset!r} has no Engram layout to scale")
        layers = len(engram.spec.layer_ids)
        if not self.slots or len(set(self.slots)) != len(self.slots):
            raise ValueError(f"slots={list(self.slots)} must be non-empty and unique")
        if any(s < 2 * layers for s in self.slots):
            raise ValueError(
                f"slots={list(self.slots)}: every size must be >= {2 * layers} "
                f"(2 rows per head in each of the {layers} Engram layers)"
            )
        extra = sorted(set(self.overencoding_slots) - set(self.slots))
        if extra:
            raise ValueError(
                f"overencoding_slots {extra} are not among slots={list(self.slots)}: the "
                "baseline is compared at the same memory"
            )
        self.validate_training()


# A smoke test of the whole pipeline: the `tiny` model (the demo's 64 experts per layer cost a
# loaded 2-core CPU most of a minute even for a few steps), two table sizes.
QUICK = MemoryConfig(
    slots=(256, 1024),
    overencoding_slots=(256, 1024),
    train=replace(STUDY_TRAIN, steps=12, seq_len=64, batch_size=8, eval_tokens=8192),
    preset="tiny",
    out_dir="runs/memory-quick",
)


HELP = "loss against Engram table slots on a fixed backbone, vs OverEncoding"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny model, 2 sizes, 12 steps (seconds)")
    p.add_argument("--slots", help="comma-separated requested slots, e.g. 2048,8192,32768")
    p.add_argument(
        "--overencoding-slots", help="comma-separated subset of --slots for the baseline"
    )
    p.add_argument("--steps", type=int, help="training steps per arm (default 150)")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1 (mean and spread)")
    p.add_argument("--data", help="text source (default: the stdlib corpus)")
    p.add_argument("--out", help="report folder (default runs/memory[-quick])")
    add_baseline_argument(p)
    add_set_argument(p)


def run_cli(args: argparse.Namespace) -> None:
    lists = {"slots": int, "overencoding_slots": int}
    run_memory(study_from_args(args, MemoryConfig(), QUICK, lists))


# ---- arms ----------------------------------------------------------------------------------------
def with_slots(base: ModelConfig, slots: int, site: str = "block") -> ModelConfig:
    """`base` with its Engram layout resized to about `slots` slots (see the module docstring)."""
    engram = base.engram
    per_layer = max(2, round(slots / len(engram.spec.layer_ids)))
    spec = replace(engram.spec, base_sizes=(per_layer,) * len(engram.spec.orders))
    return base.with_(engram=replace(engram, spec=spec, site=site))


def slots_of(config: ModelConfig) -> tuple[float, int]:
    """(slots, table rows) a config's Engram tables hold: rows / heads per layer, and rows."""
    spec = config.engram.spec
    primes = derive_primes(spec.layer_ids, spec.orders, spec.heads_per_order, spec.base_sizes)
    rows = sum(map(sum, primes))
    return rows / (spec.heads_per_order * len(spec.orders)), rows


def memory_arms(cfg: MemoryConfig) -> dict[str, ModelConfig]:
    """Arm name -> config: the backbone (with `baseline`, a granularity study's MoE), then
    Engram and OverEncoding at their sizes."""
    base = cfg.base_model()
    arms = {"backbone": base.with_(engram=None)}
    for family, sizes in (("engram", cfg.slots), ("overencoding", cfg.overencoding_slots)):
        for s in sorted(sizes):
            arms[f"{family}-{s}"] = with_slots(base, s, _SITE[family])
    return arms


# ---- fit -----------------------------------------------------------------------------------------
def fit_log_linear(slots: Sequence[float], losses: Sequence[float]) -> dict[str, Any]:
    """Least squares loss = a + b log2(slots): intercept a, slope b (per doubling), R^2, n.

    R^2 is None when every loss is equal (no variance to explain). Two points fit exactly.
    """
    if len(slots) != len(losses):
        raise ValueError(f"{len(slots)} slot counts but {len(losses)} losses")
    if len(set(slots)) < 2 or any(s <= 0 for s in slots):
        raise ValueError(f"slots={list(slots)}: a fit needs >= 2 distinct positive sizes")
    xs = [math.log2(s) for s in slots]
    n, mx, my = len(xs), sum(xs) / len(xs), sum(losses) / len(losses)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, losses, strict=True)) / sxx
    intercept = my - slope * mx
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, losses, strict=True))
    ss_tot = sum((y - my) ** 2 for y in losses)
    return {
        "intercept": intercept,
        "slope": slope,
        "r2": 1 - ss_res / ss_tot if ss_tot > 0 else None,
        "n": n,
    }


# ---- run -----------------------------------------------------------------------------------------
def _points(
    family: str, arms: dict[str, ModelConfig], results: dict[str, dict]
) -> list[dict[str, Any]]:
    points = []
    for name, model in arms.items():
        if not name.startswith(family + "-"):
            continue
        slots, rows = slots_of(model)
        result = {k: v for k, v in results[name].items() if k not in ("curve", "band")}
        requested = int(name.removeprefix(family + "-"))
        points.append({"slots_requested": requested, "slots": slots, "rows": rows, **result})
    return points


def run_memory(cfg: MemoryConfig = MemoryConfig()) -> dict[str, Any]:
    """Train every arm; write report.json, report.md and memory.png under `cfg.out_dir`."""
    cfg.validate()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # Once, before the arms (cached by data fingerprint).
    get_tokenizer(cfg.train.tokenizer, cfg.train.data)
    arms = memory_arms(cfg)
    results = train_arms(cfg, arms, out / f"steps-{cfg.train.steps}")
    families = {family: _points(family, arms, results) for family in FAMILIES}
    backbone = {k: v for k, v in results["backbone"].items() if k not in ("curve", "band")}
    report = {
        "families": families,
        "fits": {
            family: fit_log_linear([p["slots"] for p in pts], [p["val_loss"] for p in pts])
            if len({p["slots"] for p in pts}) >= 2
            else None
            for family, pts in families.items()
        },
        "backbone": backbone,
        "tokens": tokens_per_arm(cfg.train),
        "config": cfg.report_config("steps"),
        "machine": machine_info(),
        "seconds": time.perf_counter() - start,
    }
    write_json(out / "report.json", report)
    plot_memory(report, out / "memory.png")
    (out / "report.md").write_text(_markdown(report))
    print(_markdown(report))
    return report


def plot_memory(report: dict[str, Any], path: Path) -> Path | None:
    """Loss against slots (log2 axis): points, seed range, fitted lines, the backbone's loss."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for family, points in report["families"].items():
        if not points:
            continue
        xs = [p["slots"] for p in points]
        ys = [p["val_loss"] for p in points]
        low = [y - min(p["val_loss_per_seed"]) for y, p in zip(ys, points, strict=True)]
        high = [max(p["val_loss_per_seed"]) - y for y, p in zip(ys, points, strict=True)]
        bars = ax.errorbar(xs, ys, yerr=[low, high], fmt="o", capsize=3, label=family)
        fit = report["fits"][family]
        if fit is not None:
            grid = [min(xs), max(xs)]
            ax.plot(
                grid,
                [fit["intercept"] + fit["slope"] * math.log2(x) for x in grid],
                color=bars[0].get_color(),
                label=f"{family} fit: {fit['slope']:+.4f} per doubling",
            )
    ax.axhline(report["backbone"]["val_loss"], color="gray", linestyle="--", label="backbone")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("memory slots (table parameters / d_mem)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"Memory scaling on a fixed backbone ({report['tokens']:,} tokens per arm)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _family_table(points: list[dict], backbone_loss: float) -> str:
    rows = [
        [
            f"{p['slots_requested']:,}",
            f"{p['slots']:,.1f}",
            f"{p['rows']:,}",
            f"{p['table_params']:,}",
            f"{p['p_tot']:,}",
            f"{p['val_loss']:.4f}",
            f"{p['val_loss'] - backbone_loss:+.4f}",
            f"{p['val_loss_spread']:.4f}",
            ", ".join(f"{v:.4f}" for v in p["val_loss_per_seed"]),
        ]
        for p in points
    ]
    headers = ["requested", "slots", "table rows", "table params", "P_tot", "val loss (mean)"]
    return markdown_table([*headers, "vs backbone", "spread", "per seed"], rows)


def _fit_line(name: str, fit: dict | None) -> str:
    if fit is None:
        return f"{name}: fewer than 2 sizes, no fit.\n"
    r2 = f"{fit['r2']:.3f}" if fit["r2"] is not None else "undefined (equal losses)"
    return (
        f"{name}: loss = {fit['intercept']:.4f} {fit['slope']:+.4f} x log2(slots), "
        f"R^2 = {r2} over {fit['n']} sizes ({fit['slope']:+.4f} per doubling).\n"
    )


def _paired(report: dict) -> list[str]:
    """Engram against OverEncoding at each size both were trained with."""
    engram = {p["slots_requested"]: p for p in report["families"]["engram"]}
    pairs = [(p, engram[p["slots_requested"]]) for p in report["families"]["overencoding"]]
    if not pairs:
        return []
    rows = [
        [
            f"{e['slots']:,.1f}",
            f"{e['val_loss']:.4f}",
            f"{o['val_loss']:.4f}",
            f"{e['val_loss'] - o['val_loss']:+.4f}",
        ]
        for o, e in pairs
    ]
    wins = sum(e["val_loss"] < o["val_loss"] for o, e in pairs)
    return [
        "## Same memory: Engram against OverEncoding\n",
        markdown_table(["slots", "Engram", "OverEncoding", "Engram - OverEncoding"], rows),
        f"\nEngram has the lower loss at {wins} of {len(pairs)} sizes.\n",
    ]


def _markdown(report: dict) -> str:
    c, m, backbone = report["config"], report["machine"], report["backbone"]
    seeds = len(c["seeds"])
    noise = max(
        [backbone["val_loss_spread"]]
        + [p["val_loss_spread"] for pts in report["families"].values() for p in pts]
    )
    parts = [
        "# Memory scaling on a fixed backbone\n",
        f"Preset `{c['preset']}` backbone (not iso-parameter: memory is added on top), data "
        f"`{c['data']}`, {report['tokens']:,} tokens per arm, seeds {c['seeds']}; machine "
        f"{m['processor']}, commit {m['commit']}; {report['seconds']:.0f} s.\n",
        "Slots as the paper counts them: table parameters / d_mem, i.e. table rows / heads "
        "(rows per head, summed over Engram layers). Primes are searched upward from the "
        "requested size, so achieved slots are slightly larger.\n",
        f"Backbone without memory: val loss {backbone['val_loss']:.4f} "
        f"(P_tot {backbone['p_tot']:,}).\n",
    ]
    for family, title in (("engram", "Engram"), ("overencoding", "OverEncoding (input)")):
        if report["families"][family]:
            parts.append(f"## {title}\n")
            parts.append(_family_table(report["families"][family], backbone["val_loss"]))
            parts.append("\n" + _fit_line(title, report["fits"][family]))
    parts += _paired(report)
    parts.append(
        f"{seeds} seeds per arm; the largest seed spread (max - min) is {noise:.4f}.\n"
        if seeds > 1
        else "One seed per arm: the seed noise is not measured here.\n"
    )
    parts.append("![validation loss against memory slots](memory.png)\n")
    return "\n".join(parts)
