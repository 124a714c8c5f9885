"""`engram demo`: MoE vs Engram at equal parameters vs dense, trained side by side on one CPU.

Three arms see the same tokens in the same order with the same seed (paper section 3.1):
1. `moe`: the DeepSeekMoE baseline (the `demo` preset without Engram);
2. `engram`: the same backbone with part of the routed experts' inactive budget moved into an
   Engram table, planned so that P_tot and P_act stay equal (rho = 0.8 by default);
3. `dense`: no experts, a SwiGLU as wide as the MoE's active experts: the same P_act.
Each arm is evaluated on the same validation tokens. The report (markdown, JSON, PNG) states
the exact accounting and the measured losses, whatever they show.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from engram.assembly import get_tokenizer
from engram.config import TrainConfig, to_dict
from engram.experiments.arms import STUDY_TRAIN, Study, aggregate, train_runs
from engram.experiments.report import machine_info, markdown_table, plot_curves, write_json
from engram.model import ModelConfig
from engram.model.planner import format_plan, plan_from_moe

ARMS = ("moe", "engram", "dense")


# 300 x 16 x 256 = 1.2M tokens per arm, ~5 minutes each on 2 cores
DEMO_TRAIN = replace(STUDY_TRAIN, steps=300, eval_every=60)


@dataclass(frozen=True)
class DemoConfig(Study):
    """The arms' template, the Engram share rho, the seeds; every run is retrained afresh."""

    train: TrainConfig = DEMO_TRAIN
    reuse: bool = False  # always a fresh, comparable run
    rho: float = 0.8
    out_dir: str = "runs/demo"

    def report_config(self, *train_keys: str) -> dict[str, Any]:
        t = self.train
        return {
            "steps": t.steps,
            "seq_len": t.seq_len,
            "batch_size": t.batch_size,
            "eval_every": t.eval_every,
            "eval_tokens": t.eval_tokens,
            "rho": self.rho,
            "lr": t.optim.lr,
            "tokenizer": t.tokenizer,
            "data": t.data,
            "seeds": list(self.seeds),
            "out_dir": self.out_dir,
            **({"overrides": list(self.overrides)} if self.overrides else {}),
        }


QUICK = DemoConfig(
    train=replace(
        STUDY_TRAIN, steps=40, seq_len=128, batch_size=8, eval_every=20, eval_tokens=16384
    ),
    out_dir="runs/demo-quick",
)
# What the report keeps of each run and of each arm's aggregate.
RUN_KEYS = (
    "p_tot",
    "p_act",
    "table_params",
    "routed_experts",
    "tokens",
    "val_loss",
    "val_ppl",
    "tokens_per_s",
    "curve",
)
PER_SEED_ONLY = ("seeds", "torch_threads_per_seed")


def demo_arms(base: ModelConfig, rho: float) -> tuple[dict[str, ModelConfig], Any]:
    """The three iso-compute arms built from a MoE preset, and the allocation plan."""
    moe = base.with_(engram=None)
    plan = plan_from_moe(moe, rho, engram=base.engram)
    active = moe.moe.top_k * moe.moe.expert_hidden + moe.moe.shared_width
    dense = moe.with_(moe=None, ffn_hidden=active)
    return {"moe": moe, "engram": plan.config, "dense": dense}, plan


def train_demo_arms(
    demo: DemoConfig, arms: dict[str, ModelConfig]
) -> tuple[dict[str, dict], list[dict[str, dict]]]:
    """Every arm for every seed (one seed: directly under out_dir); aggregated, and per seed."""
    out = Path(demo.out_dir)
    runs = train_runs(demo, arms, lambda seed: out / f"seed-{seed}" if len(demo.seeds) > 1 else out)
    aggregated = {
        name: {k: v for k, v in aggregate(r).items() if k not in PER_SEED_ONLY}
        for name, r in runs.items()
    }
    per_seed = [
        {name: {k: r[i][k] for k in RUN_KEYS} for name, r in runs.items()}
        for i in range(len(demo.seeds))
    ]
    return aggregated, per_seed


def _baseline_line(report: dict) -> str:
    """Which MoE the arms derive from: the preset's, or a granularity study's choice."""
    moe, source = report["baseline"]["moe"], report["config"].get("baseline")
    layout = (
        f"{moe['num_routed']} routed experts of width {moe['expert_hidden']}, top-"
        f"{moe['top_k']}, shared width {report['baseline']['shared_width']}"
    )
    if not source:
        return f"MoE baseline: the preset's own ({layout})."
    return (
        f"MoE baseline: the granularity study's choice in `{source}` ({layout}); its sweep is "
        "in that report."
    )


def _arms_table(arms: dict) -> str:
    rows = [
        [
            name,
            f"{a['p_tot']:,}",
            f"{a['p_act']:,}",
            f"{a['table_params']:,}",
            a["routed_experts"],
            f"{a['tokens']:,}",
            f"{a['val_loss']:.4f}",
            f"{a['val_loss_spread']:.4f}",
            f"{a['val_ppl']:.2f}",
            f"{a['tokens_per_s']:,.0f}",
        ]
        for name, a in arms.items()
    ]
    return markdown_table(
        [
            "arm",
            "P_tot",
            "P_act",
            "table params",
            "routed experts",
            "tokens",
            "val loss",
            "spread",
            "val ppl",
            "tokens/s",
        ],
        rows,
    )


def _markdown(report: dict, plan_text: str) -> str:
    arms, seeds = report["arms"], report["config"]["seeds"]
    table = _arms_table(arms)
    gap = arms["moe"]["val_loss"] - arms["engram"]["val_loss"]
    noise = max(arms["moe"]["val_loss_spread"], arms["engram"]["val_loss_spread"])
    verdict = (
        "Engram is better than the iso-parameter MoE"
        if gap > 0
        else "Engram is not better than the iso-parameter MoE"
    )
    caveat = (
        f"; the gap is {'larger' if abs(gap) > noise else 'not larger'} than the "
        f"seed-to-seed spread ({noise:.4f})"
        if len(seeds) > 1
        else "; one seed only, so the seed-to-seed noise (a few hundredths of a nat at this "
        "scale) is not measured here"
    )
    m = report["machine"]
    return f"""# Demo: MoE vs Engram (iso-parameter) vs dense

Seeds {list(seeds)}, {report["config"]["steps"]} steps of {report["config"]["batch_size"]} x
{report["config"]["seq_len"]} tokens per arm, data `{report["config"]["data"]}`, tokenizer
`{report["config"]["tokenizer"]}`, validation on the same {report["config"]["eval_tokens"]:,}
tokens for every arm. Machine: {m["processor"]}, {m["cpu_count"]} CPUs, torch {m["torch"]},
commit {m["commit"]}; {report["seconds"]:.0f} s in total.

{table}

{_baseline_line(report)}

Validation loss after the same tokens: MoE {arms["moe"]["val_loss"]:.4f}, Engram
{arms["engram"]["val_loss"]:.4f} ({gap:+.4f} nats in Engram's favour), dense
{arms["dense"]["val_loss"]:.4f}. {verdict}{caveat}. "spread" is max - min over seeds.

![validation loss](val_loss.png)

## Accounting (paper section 3.1)

```
{plan_text}
```
"""


def run_demo(demo: DemoConfig = DemoConfig(), preset: str | None = None) -> dict[str, Any]:
    """Train the three arms for every seed; write report.json, report.md and val_loss.png.

    `preset` (default `demo.preset`) gives the MoE backbone the arms are built from."""
    preset = preset or demo.preset
    out = Path(demo.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # Build once, before the clocks of the arms start.
    get_tokenizer(demo.train.tokenizer, demo.train.data)
    arms, plan = demo_arms(demo.base_model(preset), demo.rho)
    plan_text = format_plan(plan)
    print(plan_text, flush=True)
    aggregated, per_seed = train_demo_arms(demo, arms)
    report = {
        "arms": aggregated,
        "per_seed": per_seed,
        "config": {**demo.report_config(), "preset": preset, "baseline": demo.baseline},
        "baseline": {"moe": to_dict(arms["moe"].moe), "shared_width": arms["moe"].moe.shared_width},
        "plan": {
            "rho": plan.rho,
            "num_routed": plan.num_routed,
            "base_size": plan.base_size,
            "table_rows": plan.table_rows,
            "warnings": plan.warnings,
        },
        "machine": machine_info(),
        "seconds": time.perf_counter() - start,
    }
    write_json(out / "report.json", report)
    plot_curves(
        {n: a["curve"] for n, a in report["arms"].items()},
        out / "val_loss.png",
        "Validation loss: MoE vs Engram (iso-parameter) vs dense",
        bands={n: a["band"] for n, a in report["arms"].items()} if len(demo.seeds) > 1 else None,
    )
    (out / "report.md").write_text(_markdown(report, plan_text))
    _print_table(report)
    print(f"\nWrote {out / 'report.md'}, {out / 'report.json'} and {out / 'val_loss.png'}")
    return report


def _print_table(report: dict) -> None:
    print(
        f"\n{'arm':<8}{'P_tot':>12}{'P_act':>11}{'table':>11}{'tokens':>11}{'val loss':>10}"
        f"{'val ppl':>9}{'tok/s':>8}"
    )
    for name, a in report["arms"].items():
        print(
            f"{name:<8}{a['p_tot']:>12,}{a['p_act']:>11,}{a['table_params']:>11,}"
            f"{a['tokens']:>11,}{a['val_loss']:>10.4f}{a['val_ppl']:>9.2f}"
            f"{a['tokens_per_s']:>8,.0f}"
        )


__all__ = ["ARMS", "QUICK", "DemoConfig", "demo_arms", "run_demo"]
