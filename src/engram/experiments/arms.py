"""Training the arms of a study: shared settings, reuse of finished runs, mean and spread.

Every study compares arms (model configs) trained with the same data, tokens, schedule and
seeds. `train_arm` writes `summary.json` beside the run; a later call with the identical
resolved config reads it back instead of training again, so an interrupted study restarts
where it stopped and a report can be rebuilt without retraining. Any change to the config
(steps, seed, model, data...) trains afresh.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from engram.config_io import from_dict, to_dict
from engram.model import ModelConfig
from engram.model.accounting import count_params_from_config
from engram.optim import OptimConfig
from engram.train import TrainConfig, train

SUMMARY = "summary.json"


@dataclass(frozen=True)
class StudyTraining:
    """What every training study shares, as the base of its config: the data, the tokens per
    step, the validation tokens, the learning rate, the seeds and the reference preset.

    The defaults are the CPU-scale runs committed under `results/` (the `demo` preset, 16 x 256
    tokens per step, 131,072 validation tokens).
    """

    seq_len: int = 256
    batch_size: int = 16
    eval_tokens: int = 131072
    lr: float = 3e-3
    tokenizer: str = "bpe:4096"
    data: str = "default"
    seeds: tuple[int, ...] = (0,)
    preset: str = "demo"
    reuse: bool = True  # read back finished runs with identical configs instead of retraining

    def validate_training(self) -> None:
        if not self.seeds:
            raise ValueError("seeds must not be empty")


@dataclass(frozen=True)
class ArmSettings:
    """What every arm of a study shares (the paper trains all arms on the same tokens)."""

    steps: int = 300  # 300 x 16 x 256 = 1.2M tokens, ~5 minutes per demo-size arm on 2 cores
    seq_len: int = 256
    batch_size: int = 16
    eval_every: int = 0  # 0: evaluate only at the end
    eval_tokens: int = 131072
    lr: float = 3e-3
    tokenizer: str = "bpe:4096"
    data: str = "default"

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        if self.eval_every < 0:
            raise ValueError(f"eval_every={self.eval_every} must be >= 0")

    @classmethod
    def of(cls, study: Any, steps: int | None = None) -> ArmSettings:
        """The settings a study config shares by field name (its own `steps` unless given)."""
        shared = ("seq_len", "batch_size", "eval_tokens", "lr", "tokenizer", "data")
        steps = study.steps if steps is None else steps
        return cls(steps=steps, **{name: getattr(study, name) for name in shared})

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len

    def train_config(self, model: ModelConfig, seed: int, out: Path) -> TrainConfig:
        return TrainConfig(
            model=model,
            optim=OptimConfig(lr=self.lr, warmup_steps=max(1, self.steps // 10)),
            tokenizer=self.tokenizer,
            data=self.data,
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            steps=self.steps,
            eval_every=self.eval_every or self.steps,
            eval_tokens=self.eval_tokens,
            seed=seed,
            out_dir=str(out),
        )


def finished_summary(config: TrainConfig) -> dict[str, Any] | None:
    """The summary of a finished run of exactly this config in its out_dir, else None."""
    path = Path(config.out_dir) / SUMMARY
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    # Read back through the dataclasses so that a field added since (with a default that keeps
    # the old behaviour, e.g. the Engram placement) does not orphan every finished run.
    try:
        saved_config = _jsonable(from_dict(TrainConfig, saved.get("config") or {}))
    except ValueError:
        return None
    return saved["summary"] if saved_config == _jsonable(config) else None


def _jsonable(config: TrainConfig) -> Any:
    return json.loads(json.dumps(to_dict(config)))  # tuples become lists, as when read back


def train_arm(
    settings: ArmSettings, model: ModelConfig, seed: int, out: Path, reuse: bool = True
) -> dict[str, Any]:
    """Train one arm (or reuse its finished run); its summary plus parameter accounting."""
    config = settings.train_config(model, seed, out)
    summary = finished_summary(config) if reuse else None
    if summary is None:
        shutil.rmtree(out, ignore_errors=True)  # a fresh, comparable run
        summary = train(config)
        (out / SUMMARY).write_text(
            json.dumps({"config": _jsonable(config), "summary": summary}, indent=2)
        )
    else:
        print(f"reusing the finished run in {out}", flush=True)
    counts = count_params_from_config(model)
    return {
        **summary,
        "seed": seed,
        "p_tot": counts.p_tot,
        "p_act": counts.p_act,
        "table_params": counts.engram_tables,
        "routed_experts": model.moe.num_routed if model.moe else 0,
    }


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of one arm, the spread (max - min), per-seed values, mean curve + band."""
    losses = [r["val_loss"] for r in runs]
    mean = sum(losses) / len(losses)
    curves = [r["curve"] for r in runs]
    points = list(zip(*curves, strict=False))  # curves of equal runs have equal lengths
    keep = ("p_tot", "p_act", "table_params", "routed_experts", "tokens")
    return {
        **{k: runs[0][k] for k in keep if k in runs[0]},
        "val_loss": mean,
        "val_loss_spread": max(losses) - min(losses),
        "val_loss_per_seed": losses,
        "seeds": [r["seed"] for r in runs],
        # Per seed, as each run was trained (None: a run finished before this was recorded).
        "torch_threads_per_seed": [r.get("torch_threads") for r in runs],
        "val_ppl": math.exp(mean),
        "tokens_per_s": sum(r["tokens_per_s"] for r in runs) / len(runs),
        "curve": [[p[0][0], sum(q[1] for q in p) / len(p)] for p in points],
        "band": [[p[0][0], min(q[1] for q in p), max(q[1] for q in p)] for p in points],
    }


def train_arms(
    settings: ArmSettings,
    arms: dict[str, ModelConfig],
    seeds: tuple[int, ...],
    out: Path,
    reuse: bool = True,
) -> dict[str, dict[str, Any]]:
    """Train every arm for every seed (seed-major, so seed 0 of all arms finishes first)."""
    settings.validate()
    if not seeds:
        raise ValueError("seeds must not be empty")
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for seed in seeds:
        for name, model in arms.items():
            print(f"\n== arm {name} (seed {seed}) ==", flush=True)
            runs[name].append(train_arm(settings, model, seed, out / f"seed-{seed}" / name, reuse))
    return {name: aggregate(r) for name, r in runs.items()}


def with_steps(settings: ArmSettings, steps: int) -> ArmSettings:
    return replace(settings, steps=steps)


__all__ = [
    "ArmSettings",
    "aggregate",
    "finished_summary",
    "train_arm",
    "train_arms",
    "with_steps",
]
