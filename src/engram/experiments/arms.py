"""Training the arms of a study: one TrainConfig template, reuse of finished runs, mean and spread.

Every study compares arms (model configs) trained with the same data, tokens, schedule and
seeds: an arm is the study's template `TrainConfig` plus its model, seed and folder, and the
user's `key=value` overrides (the syntax of `engram train`), built by `arm_config`. `train_arm`
writes `summary.json` beside the run; a later call with the identical resolved config reads it
back instead of training again, so an interrupted study restarts where it stopped and a report
can be rebuilt without retraining. An arm interrupted after a checkpoint (`ckpt_every`)
continues from it (`arm.json` records the config it was started with; resuming is exact, as
`engram train --resume`). Any change to the config (steps, seed, model, data...) trains afresh;
how often a run checkpoints or shows progress changes no result, so those two fields are not
compared.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from engram.config import (
    OptimConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_recipe,
    parse_assignments,
    to_dict,
)
from engram.experiments.report import parse_list
from engram.model import ModelConfig, model_preset
from engram.model.accounting import count_params_from_config
from engram.train import train

SUMMARY = "summary.json"
ARM = "arm.json"  # the config an arm was started with: an unfinished run of it may resume
# TrainConfig fields that change neither a run's numbers nor where it writes them.
# Fields that do not change what a run computes, so reuse and resume ignore them. out_dir
# among them: a study's folder moved or linked elsewhere is still the same runs (comparing it
# once made a rerun through a linked folder retrain, and so delete, a finished arm).
NOT_RESULTS = ("ckpt_every", "progress", "out_dir")

# The CPU-scale runs committed under `results/`: 16 x 256 tokens per step, 131,072 validation
# tokens. eval_every 0: each arm evaluates only at its end (see `arm_config`).
STUDY_TRAIN = TrainConfig(
    optim=OptimConfig(lr=3e-3),
    tokenizer="bpe:4096",
    seq_len=256,
    batch_size=16,
    steps=300,  # 300 x 16 x 256 = 1.2M tokens, ~5 minutes per demo-size arm on 2 cores
    eval_every=0,
    eval_tokens=131072,
)


def arm_config(
    template: TrainConfig,
    model: ModelConfig,
    seed: int,
    out: str | Path,
    overrides: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """One arm: `template` with this arm's model, seed and folder, then `overrides`.

    Unless overridden, the warm-up is a tenth of the steps (at least one) and `eval_every` 0
    means once, at the end: so a study's `--steps` alone rescales every arm's schedule.
    """
    overrides = dict(overrides or {})
    config = replace(template, model=model, seed=seed, out_dir=str(out))
    config = apply_overrides(config, overrides)  # first, so that what follows sees their steps
    derived = {
        "eval_every": config.eval_every or config.steps,
        "optim.warmup_steps": max(1, config.steps // 10),
    }
    return apply_overrides(config, {k: v for k, v in derived.items() if k not in overrides})


def check_template(template: TrainConfig) -> None:
    if template.steps < 1:
        raise ValueError(f"steps={template.steps} must be >= 1")
    if template.eval_every < 0:
        raise ValueError(f"eval_every={template.eval_every} must be >= 0")


def tokens_per_arm(template: TrainConfig) -> int:
    return template.steps * template.batch_size * template.seq_len


@dataclass(frozen=True)
class Study:
    """What every training study shares: the arms' template, seeds, reference preset, reuse."""

    train: TrainConfig = STUDY_TRAIN
    seeds: tuple[int, ...] = (0,)
    preset: str = "demo"
    reuse: bool = True  # read back finished runs with identical configs instead of retraining
    overrides: tuple[str, ...] = ()  # key=value on every arm's TrainConfig (`--set`), last
    # A granularity study's report (`engram study granularity`): its chosen MoE replaces the
    # preset's, so that Engram is measured against the strongest MoE found, not the preset's.
    baseline: str = ""

    def validate_training(self) -> None:
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        check_template(self.train)
        parse_assignments(list(self.overrides))

    def base_model(self, preset: str | None = None) -> ModelConfig:
        """The preset's model (`preset` or the study's), with the `baseline` report's MoE."""
        name = preset or self.preset
        model = model_preset(name)
        if not self.baseline:
            return model
        from engram.experiments.granularity import best_baseline  # it imports this module

        return model.with_(moe=best_baseline(self.baseline, name))

    def arm(self, model: ModelConfig, seed: int, out: str | Path, **changes: Any) -> TrainConfig:
        """One arm's config; `changes` replace template fields first (e.g. steps=budget)."""
        template = replace(self.train, **changes)
        return arm_config(template, model, seed, out, parse_assignments(list(self.overrides)))

    def report_config(self, *train_keys: str) -> dict[str, Any]:
        """The study's settings as its report lists them: flat, tuples as lists."""
        t = self.train
        flat: dict[str, Any] = {
            "seq_len": t.seq_len,
            "batch_size": t.batch_size,
            "eval_tokens": t.eval_tokens,
            "lr": t.optim.lr,
            "tokenizer": t.tokenizer,
            "data": t.data,
            **{key: getattr(t, key) for key in train_keys},
        }
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "train" and (f.name != "overrides" or value):
                flat[f.name] = list(value) if isinstance(value, tuple) else value
        return flat


S = TypeVar("S", bound=Study)
TRAIN_FLAGS = ("steps", "eval_tokens", "data")  # CLI flags setting the template's own field


def add_set_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a TrainConfig field for every arm, as `engram train` takes it (repeatable), "
        "e.g. --set optim.lr=1e-3 --set batch_size=8",
    )


def add_baseline_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--baseline",
        help="a granularity study's report (or its folder): its chosen MoE replaces the "
        "preset's as the baseline every arm derives from",
    )


def add_recipe_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--recipe",
        help="a TOML of the study's fields (study = NAME, its lists, [train] for the arms' "
        "template); the other flags and --set override it",
    )


# Template fields every arm sets itself: a recipe naming them would be silently ignored.
_ARM_OWNED = {"train.model": "preset", "train.seed": "seeds", "train.out_dir": "out_dir"}


def study_from_recipe(path: str | Path, base: S, study: str) -> S:
    """`base` with the fields of the TOML recipe at `path`, which must say `study = "<study>"`.

    Top-level keys are the study's fields (`preset`, `seeds`, `rhos`...), `[train]` (and
    `[train.optim]`...) the arms' `TrainConfig` template, as `engram train` recipes write it."""
    values = load_recipe(path)
    named = values.pop("study", None)
    if named != study:
        raise ValueError(
            f"recipe {path} is for study {named!r}, not {study!r}"
            if named is not None
            else f'recipe {path} names no study: add study = "{study}" (or use engram train)'
        )
    for key in values:
        owner = next(
            (o for field, o in _ARM_OWNED.items() if key == field or key.startswith(field + ".")),
            None,
        )
        if owner is not None:
            raise ValueError(
                f"recipe {path}: {key} is set by each arm of the study; use {owner} instead"
            )
    return apply_overrides(base, values)


def study_from_args(
    args: argparse.Namespace,
    full: S,
    quick: S,
    lists: Mapping[str, type] | None = None,
    **changes: Any,
) -> S:
    """The study config a command line names: `--quick` picks the base, `--recipe` (if the
    study takes one) replaces its fields, then `changes`, the comma-separated `lists`
    (attribute -> item type) and `--seeds`, `--out`, the template flags (`--steps`,
    `--eval-tokens`, `--data`) and the `--set` overrides."""
    cfg = quick if args.quick else full
    if getattr(args, "recipe", None):
        cfg = study_from_recipe(args.recipe, cfg, getattr(args, "study", None) or "")
    for name, kind in {**(lists or {}), "seeds": int}.items():
        if getattr(args, name, None):
            changes[name] = parse_list(getattr(args, name), kind, name.replace("_", "-"))
    given = {k: getattr(args, k, None) for k in TRAIN_FLAGS}
    train = apply_overrides(cfg.train, {k: v for k, v in given.items() if v not in (None, "")})
    sets = tuple(getattr(args, "set", None) or ())
    parse_assignments(list(sets))  # a malformed key=value fails before any work
    if getattr(args, "out", None):
        changes["out_dir"] = args.out
    if getattr(args, "baseline", None):
        changes["baseline"] = args.baseline
    return replace(cfg, train=train, overrides=cfg.overrides + sets, **changes)


def finished_summary(config: TrainConfig) -> dict[str, Any] | None:
    """The summary of a finished run of exactly this config in its out_dir, else None."""
    path = Path(config.out_dir) / SUMMARY
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    # Read back through the dataclasses so that a field added since (with a default that keeps
    # the old behaviour, e.g. the Engram site) does not orphan every finished run.
    try:
        saved_config = _jsonable(from_dict(TrainConfig, saved.get("config") or {}))
    except ValueError:
        return None
    return saved["summary"] if saved_config == _jsonable(config) else None


def _jsonable(config: TrainConfig) -> Any:
    """The config as JSON reads it back (tuples become lists), without `NOT_RESULTS`."""
    values = json.loads(json.dumps(to_dict(config)))
    return {k: v for k, v in values.items() if k not in NOT_RESULTS}


def _resumable(config: TrainConfig) -> bool:
    """Whether `config.out_dir` holds an unfinished run of this config with a checkpoint."""
    out = Path(config.out_dir)
    try:
        started = from_dict(TrainConfig, json.loads((out / ARM).read_text()))
    except (OSError, ValueError, json.JSONDecodeError):
        return False
    return _jsonable(started) == _jsonable(config) and (out / "checkpoints" / "latest").exists()


def train_arm(config: TrainConfig, reuse: bool = True) -> dict[str, Any]:
    """Train one arm (or reuse its finished run); its summary plus parameter accounting."""
    out, model = Path(config.out_dir), config.model
    summary = finished_summary(config) if reuse else None
    if summary is None:
        resume = reuse and _resumable(config)
        if resume:
            print(f"resuming the unfinished run in {out}", flush=True)
        else:
            shutil.rmtree(out, ignore_errors=True)  # a fresh, comparable run
            out.mkdir(parents=True)
            (out / ARM).write_text(json.dumps(to_dict(config), indent=2))
        summary = train(config, resume=resume)
        (out / SUMMARY).write_text(
            json.dumps({"config": _jsonable(config), "summary": summary}, indent=2)
        )
    else:
        print(f"reusing the finished run in {out}", flush=True)
    counts = count_params_from_config(model)
    return {
        **summary,
        "seed": config.seed,
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


def train_runs(
    study: Study, arms: dict[str, ModelConfig], seed_dir: Callable[[int], Path], **changes: Any
) -> dict[str, list[dict[str, Any]]]:
    """Train every arm for every seed (seed-major, so seed 0 of all arms finishes first) into
    `seed_dir(seed) / arm`; each arm's runs in seed order. `changes` replace fields of the
    study's template (e.g. steps=budget)."""
    study.validate_training()
    check_template(replace(study.train, **changes))
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for seed in study.seeds:
        for name, model in arms.items():
            print(f"\n== arm {name} (seed {seed}) ==", flush=True)
            config = study.arm(model, seed, seed_dir(seed) / name, **changes)
            runs[name].append(train_arm(config, study.reuse))
    return runs


def train_arms(
    study: Study, arms: dict[str, ModelConfig], out: Path, **changes: Any
) -> dict[str, dict[str, Any]]:
    """`train_runs` into `out/seed-N/arm`, each arm aggregated over its seeds."""
    runs = train_runs(study, arms, lambda seed: out / f"seed-{seed}", **changes)
    return {name: aggregate(r) for name, r in runs.items()}


__all__ = [
    "STUDY_TRAIN",
    "Study",
    "add_recipe_argument",
    "add_set_argument",
    "aggregate",
    "arm_config",
    "finished_summary",
    "study_from_args",
    "study_from_recipe",
    "tokens_per_arm",
    "train_arm",
    "train_arms",
    "train_runs",
]
