"""`engram study controls`: what the Engram table itself contributes, against controls.

An Engram layer adds two things: stored rows addressed by the N-gram, and dense parameters
(projections, gate, conv) that act on whatever the rows hold. One widely cited small-scale
"negative result" never trained its tables (they stayed zero), so a loss difference says nothing
about memory until the table's own share is isolated. Training controls, each with the reference's
tokens, seed and schedule (see `control_arms` for what each changes): `reference`, `zero-table`,
`capacity-1`, `random-rows`, `no-engram`. Evaluation-time controls on the trained reference: its
rows shuffled within each head, zeroed, and Engram switched off (the paper's switch-off test),
per token and grouped by token kind (`token_kinds`), next to a context-free unigram baseline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from engram.assembly import get_tokenizer
from engram.config import TrainConfig, to_dict
from engram.data import build_shard
from engram.experiments.arms import (
    STUDY_TRAIN,
    SUMMARY,
    Study,
    add_baseline_argument,
    add_set_argument,
    aggregate,
    finished_summary,
    study_from_args,
    tokens_per_arm,
)
from engram.experiments.control_arms import (
    CONTROLS,
    read_control,
    target_losses,
    train_control,
    unigram_losses,
)
from engram.experiments.report import machine_info, markdown_table, pyplot, write_json
from engram.experiments.token_kinds import KINDS, WORDS, classify_stream, group_table, piece_texts
from engram.inference.load import load_trained
from engram.model.accounting import count_params_from_config

VARIANTS = ("on", "off", "shuffled", "zeroed")


# 150 x 16 x 256 = 614k tokens, ~2.5 minutes per demo-size arm on 2 cores
CONTROLS_TRAIN = replace(STUDY_TRAIN, steps=150)


@dataclass(frozen=True)
class ControlsConfig(Study):
    train: TrainConfig = CONTROLS_TRAIN
    arms: tuple[str, ...] = tuple(CONTROLS)
    ckpt: str | None = None  # only the evaluation-time controls, on this trained run
    shuffle_seed: int = 0
    device: str = "auto"  # of the evaluation-time controls (training follows TrainConfig)
    out_dir: str = "runs/controls"

    def validate(self) -> None:
        unknown = [a for a in self.arms if a not in CONTROLS]
        if unknown or not self.arms:
            raise ValueError(f"arms={list(self.arms)}: choose from {list(CONTROLS)}")
        self.validate_training()
        t = self.train
        if t.eval_tokens < t.seq_len + 1:
            raise ValueError(f"eval_tokens={t.eval_tokens} must be > seq_len={t.seq_len}")


QUICK = ControlsConfig(
    train=replace(STUDY_TRAIN, steps=6, seq_len=64, batch_size=8, eval_tokens=8192),
    out_dir="runs/controls-quick",
)


HELP = "what the table contributes: zero, constant, random-address and shuffled controls"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quick", action="store_true", help="6 steps per arm, 8k eval tokens (well under a minute)"
    )
    p.add_argument("--ckpt", help="only the evaluation-time controls, on this trained run")
    p.add_argument("--arms", help=f"comma-separated, from {','.join(CONTROLS)}")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1 (mean and spread)")
    p.add_argument("--steps", type=int, help="training steps per arm (default 150)")
    p.add_argument("--eval-tokens", type=int, help="validation tokens (default 131072)")
    p.add_argument("--data", help="text source (default: the stdlib corpus)")
    p.add_argument("--out", help="report folder (default runs/controls[-quick|-ckpt])")
    add_baseline_argument(p)
    add_set_argument(p)


def run_cli(args: argparse.Namespace) -> None:
    changes: dict[str, Any] = {}
    if args.ckpt:
        out_dir = (QUICK if args.quick else ControlsConfig()).out_dir
        changes.update(ckpt=args.ckpt, out_dir=out_dir.replace("controls", "controls-ckpt"))
    run_controls(study_from_args(args, ControlsConfig(), QUICK, {"arms": str}, **changes))


# ---- training controls ---------------------------------------------------------------------------
def train_arm(cfg: ControlsConfig, name: str, seed: int, out: Path) -> dict[str, Any]:
    """Train one control arm (or reuse its finished run), as `arms.train_arm` trains plain arms."""
    control = CONTROLS[name]
    model = control.model_config(cfg.base_model())
    config = cfg.arm(model, seed, out)
    summary = finished_summary(config) if cfg.reuse else None
    if summary is not None and read_control(out) == name:
        print(f"reusing the finished run in {out}", flush=True)
    else:
        shutil.rmtree(out, ignore_errors=True)  # a fresh, comparable run
        summary = train_control(config, control)
        saved = {"config": json.loads(json.dumps(to_dict(config))), "summary": summary}
        (out / SUMMARY).write_text(json.dumps({**saved, "control": name}, indent=2))
    counts = count_params_from_config(model)
    spec = model.engram.spec if model.engram else None
    return {
        **summary,
        "seed": seed,
        "p_tot": counts.p_tot,
        "p_act": counts.p_act,
        "table_params": counts.engram_tables,
        "trained_table_params": control.trained_table_params(counts.engram_tables, spec)
        if spec
        else 0,
    }


def train_controls(cfg: ControlsConfig, out: Path) -> dict[str, dict[str, Any]]:
    """Every arm for every seed (seed-major), aggregated over seeds as `arms.aggregate` does."""
    runs: dict[str, list[dict]] = {name: [] for name in cfg.arms}
    for seed in cfg.seeds:
        for name in cfg.arms:
            print(f"\n== control {name} (seed {seed}) ==", flush=True)
            path = out / f"seed-{seed}" / name
            runs[name].append(train_arm(cfg, name, seed, path))
    return {
        name: {
            **aggregate(r),
            "trained_table_params": r[0]["trained_table_params"],
            "description": CONTROLS[name].description,
        }
        for name, r in runs.items()
    }


# ---- evaluation-time controls --------------------------------------------------------------------
def eval_controls(
    run_dir: str | Path, eval_tokens: int, shuffle_seed: int = 0, device: str = "auto"
) -> dict[str, Any]:
    """Per-token losses of a trained content-addressed run: tables on, off, shuffled, zeroed.

    Scored over the first `eval_tokens` validation tokens with the run's own windows, so the
    "on" mean equals the run's validation loss at that many tokens; grouped by token kind.
    """
    if read_control(Path(run_dir)) != "reference":
        raise ValueError(
            f"{run_dir} was trained as control {read_control(Path(run_dir))!r}: the "
            "evaluation-time controls need a content-addressed run"
        )
    trained = load_trained(run_dir, device=device)
    if trained.tables:  # shuffled and zeroed tables are whole-table edits: in memory only
        trained.tables.embed()  # (ValueError naming the size if they do not fit in RAM)
    model, tok, config, manifest = (
        trained.model,
        trained.tokenizer,
        trained.config,
        trained.manifest,
    )
    if model.spec is None:
        raise ValueError(f"the model of {run_dir} has no Engram layers: nothing to control")
    config: TrainConfig = replace(config, eval_tokens=eval_tokens)
    tokens = np.asarray(build_shard(config.data, "val", tok).tokens[:eval_tokens], dtype=np.int64)
    if len(tokens) < config.seq_len + 1:
        raise ValueError(f"{len(tokens)} validation tokens are fewer than one window")
    dev = next(model.parameters()).device
    losses = {v: target_losses(model, tokens, config, dev, v, shuffle_seed) for v in VARIANTS}
    train_tokens = build_shard(config.data, "train", tok).tokens
    unigram = unigram_losses(train_tokens, tokens, tok.vocab_size)
    kinds, words = classify_stream(tokens, piece_texts(tok), tok.eos_id)
    scored = np.isfinite(losses["on"])
    return {
        "ckpt": manifest["path"],
        "step": manifest["step"],
        "data": config.data,
        "tokens": len(tokens),
        "scored": int(scored.sum()),
        "shuffle_seed": shuffle_seed,
        "loss": {v: float(a[scored].mean()) for v, a in losses.items()},
        "loss_unigram": float(unigram[scored].mean()),
        "kinds": group_table(kinds, KINDS, losses, unigram),
        "words": group_table(words, WORDS, losses, unigram),
    }


def run_controls(cfg: ControlsConfig = ControlsConfig()) -> dict[str, Any]:
    """Train the control arms (unless `ckpt`), run the evaluation-time ones, write the report."""
    cfg.validate()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    arms, ckpt = None, cfg.ckpt
    if ckpt is None:
        # Trained once here, not inside the first arm.
        get_tokenizer(cfg.train.tokenizer, cfg.train.data)
        arms = train_controls(cfg, out)
        if "reference" in cfg.arms:
            ckpt = str(out / f"seed-{cfg.seeds[0]}" / "reference")
    evaluation = (
        eval_controls(ckpt, cfg.train.eval_tokens, cfg.shuffle_seed, cfg.device) if ckpt else None
    )
    report = {
        "config": cfg.report_config("steps"),
        "tokens_per_arm": tokens_per_arm(cfg.train) if arms else None,
        "arms": arms,
        "eval": evaluation,
        "machine": machine_info(),
        "seconds": time.perf_counter() - start,
    }
    write_json(out / "report.json", report)
    plot = _plot(report, out / "controls.png")
    text = _markdown(report, plot)
    (out / "report.md").write_text(text)
    print(text)
    return report


# ---- the report ----------------------------------------------------------------------------------
def _f(value: float | None, digits: int = 4, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _arms_markdown(report: dict) -> list[str]:
    arms, seeds = report["arms"], report["config"]["seeds"]
    ref = arms.get("reference")
    rows = [
        [
            f"`{name}`",
            a["description"],
            f"{a['trained_table_params']:,} / {a['table_params']:,}",
            f"{a['p_tot']:,}",
            _f(a["val_loss"]),
            _f(a["val_loss_spread"]),
            ", ".join(_f(v) for v in a["val_loss_per_seed"]),
            _f(a["val_loss"] - ref["val_loss"], sign=True) if ref else "-",
        ]
        for name, a in arms.items()
    ]
    headers = ["arm", "what changes", "trained / table params", "P_tot", "val loss"]
    headers += ["spread", "per seed", "vs reference"]
    noise = max(a["val_loss_spread"] for a in arms.values())
    return [
        f"## Training controls: {report['tokens_per_arm']:,} tokens per arm, seeds {seeds}\n",
        markdown_table(headers, rows),
        (
            f"\nLargest seed spread (max - min) of any arm: {noise:.4f}.\n"
            if len(seeds) > 1
            else "\nOne seed per arm: the seed noise is not measured here (use --seeds 0,1).\n"
        ),
    ]


def _eval_markdown(ev: dict) -> list[str]:
    on = ev["loss"]["on"]
    rows = [[v, _f(loss), _f(loss - on, sign=True)] for v, loss in ev["loss"].items()]
    unigram = ev["loss_unigram"]
    rows.append(["unigram (train split)", _f(unigram), _f(unigram - on, sign=True)])
    parts = [
        "## Evaluation-time controls\n",
        f"Checkpoint `{ev['ckpt']}` (step {ev['step']}), {ev['scored']:,} scored validation "
        f"tokens of `{ev['data']}`; shuffled = rows permuted within each head (seed "
        f"{ev['shuffle_seed']}), zeroed = every row zero, off = Engram skipped.\n",
        markdown_table(["tables", "loss", "vs on"], rows),
        "\n## Sensitivity by token kind\n",
        "increase = loss off - loss on; retained = (unigram - off) / (unigram - on), the share of "
        "the model's gain over a unigram predictor that survives switching Engram off.\n",
    ]
    for title, table in (("kind", ev["kinds"]), ("word position", ev["words"])):
        body = [
            [
                r["kind"],
                f"{r['tokens']:,}",
                f"{r['share']:.3f}",
                _f(r["loss_on"]),
                _f(r["loss_off"]),
                _f(r["increase"], sign=True),
                _f(None if r["loss_on"] is None else r["loss_shuffled"] - r["loss_on"], sign=True),
                _f(None if r["loss_on"] is None else r["loss_zeroed"] - r["loss_on"], sign=True),
                _f(r["loss_unigram"]),
                _f(r["retained"], 3),
            ]
            for r in table
        ]
        headers = [title, "tokens", "share", "loss on", "loss off", "increase"]
        headers += ["shuffled - on", "zeroed - on", "unigram", "retained"]
        parts += [markdown_table(headers, body), ""]
    return parts


def _markdown(report: dict, plot: Path | None) -> str:
    c, m = report["config"], report["machine"]
    subject = (
        f"Preset `{c['preset']}` (reference: its backbone with its Engram), data `{c['data']}`"
        if report["arms"]
        else f"Evaluation-time controls only, on the trained run `{c['ckpt']}`"
    )
    parts = [
        "# Table controls: what the Engram table itself contributes\n",
        f"{subject}; machine {m['processor']}, commit {m['commit']}; {report['seconds']:.0f} s.\n",
    ]
    if report["arms"]:
        parts += _arms_markdown(report)
    if report["eval"]:
        parts += _eval_markdown(report["eval"])
    if plot is not None:
        parts.append(f"![controls]({plot.name})\n")
    return "\n".join(parts)


def _plot(report: dict, path: Path) -> Path | None:
    """Validation loss per training arm (with the seed range) and the per-kind loss increase."""
    plt = pyplot()
    panels = [p for p in ("arms", "eval") if report[p]]
    if plt is None or not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), dpi=120, squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "arms":
            arms = report["arms"]
            lo = [a["val_loss"] - min(a["val_loss_per_seed"]) for a in arms.values()]
            hi = [max(a["val_loss_per_seed"]) - a["val_loss"] for a in arms.values()]
            ax.bar(list(arms), [a["val_loss"] for a in arms.values()], yerr=[lo, hi], capsize=4)
            losses = [a["val_loss"] for a in arms.values()]
            ax.set_ylim(min(losses) - 0.05, max(losses) + 0.05)
            ax.set_ylabel("validation loss (nats/token)")
            ax.set_title("Training controls (bars: mean, whiskers: seed range)")
        else:
            rows = [r for r in report["eval"]["kinds"] if r["tokens"]]
            x = np.arange(len(rows))
            for i, variant in enumerate(("off", "shuffled", "zeroed")):
                gaps = [r[f"loss_{variant}"] - r["loss_on"] for r in rows]
                ax.bar(x + (i - 1) * 0.27, gaps, 0.27, label=f"{variant} - on")
            ax.set_xticks(x, [r["kind"] for r in rows], rotation=30, ha="right")
            ax.set_ylabel("loss increase over tables on (nats/token)")
            ax.set_title("Evaluation-time controls by token kind")
            ax.legend()
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = [
    "QUICK",
    "VARIANTS",
    "ControlsConfig",
    "eval_controls",
    "run_controls",
    "train_arm",
    "train_controls",
]
