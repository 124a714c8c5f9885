"""`engram study allocation`: iso-parameter arms across rho, and a quick sweep's report."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from engram.cli import main, train_config
from engram.experiments.allocation import (
    QUICK,
    AllocationConfig,
    allocation_arms,
    sweep_flops,
    u_shape,
)
from engram.experiments.arms import (
    arm_config,
    study_from_args,
    study_from_recipe,
    tokens_per_arm,
    train_arm,
)
from engram.model import model_preset
from engram.model.accounting import count_params_from_config

GPU_RECIPE = Path(__file__).parent.parent / "recipes" / "gpu-allocation.toml"


def test_every_rho_keeps_p_tot_and_p_act():
    plans = allocation_arms(model_preset("demo"), (1.0, 0.9, 0.8, 0.6, 0.4, 0.2))
    base = count_params_from_config(plans[1.0].config)
    tables = []
    for rho, plan in plans.items():
        counts = count_params_from_config(plan.config)
        assert abs(counts.p_tot - base.p_tot) <= plan.expert_size, rho
        assert abs(counts.p_act - base.p_act) <= plan.expert_size, rho
        tables.append(counts.engram_tables)
    assert tables == sorted(tables) and tables[0] == 0  # less rho, more memory


def point(rho: float, *losses: float) -> dict:
    """An allocation point as the report holds it: per-seed losses, their mean and spread."""
    return {
        "rho": rho,
        "val_loss": sum(losses) / len(losses),
        "val_loss_per_seed": list(losses),
        "val_loss_spread": max(losses) - min(losses),
    }


def test_u_shape_verdicts():
    """Resolved only for an interior best with both ends worse by more than twice the spread."""
    u = u_shape(
        [point(1.0, 4.0, 4.1), point(0.8, 3.5, 3.52), point(0.6, 3.55, 3.6), point(0.2, 4.2, 4.3)]
    )
    assert u["best_rho"] == 0.8 and u["interior"] and u["verdict"] == "resolved"
    assert u["highest_rho"]["rho"] == 1.0 and u["highest_rho"]["diff_per_seed"] == pytest.approx(
        [0.5, 0.58]
    )
    assert u["lowest_rho"]["verdict"] == "resolved"
    assert u["within_noise_of_best"] == [0.6, 0.8]  # 0.6 is +0.065 against a threshold of 0.1
    # Monotone: the best is an end, so no U whatever the noise.
    mono = u_shape([point(1.0, 4.0, 4.0), point(0.8, 3.8, 3.8), point(0.2, 3.5, 3.5)])
    assert mono["best_rho"] == 0.2 and not mono["interior"] and mono["lowest_rho"] is None
    assert mono["verdict"] == "unresolved"
    # Noisy: an interior best, but one end within twice the spread.
    noisy = u_shape([point(1.0, 3.9, 4.3), point(0.8, 3.8, 3.9), point(0.2, 4.5, 4.6)])
    assert noisy["interior"] and noisy["highest_rho"]["verdict"] == "unresolved"
    assert noisy["verdict"] == "unresolved"
    assert u_shape([point(1.0, 4.0), point(0.8, 3.9)]) is None  # two rhos draw no U


def test_bad_sweep_config():
    with pytest.raises(ValueError, match="rhos"):
        AllocationConfig(rhos=(1.2,)).validate()
    with pytest.raises(ValueError, match="budgets"):
        AllocationConfig(budgets=()).validate()


def test_arm_config_derives_the_schedule_unless_overridden(tmp_path):
    template = QUICK.train
    model = model_preset("tiny")
    arm = arm_config(template, model, seed=3, out=tmp_path / "a")
    assert (arm.seed, arm.out_dir, arm.model) == (3, str(tmp_path / "a"), model)
    assert (arm.eval_every, arm.optim.warmup_steps) == (template.steps, template.steps // 10)
    # Overrides come first for what follows from the steps, and win over it when named.
    arm = arm_config(template, model, 0, tmp_path, {"steps": "50", "optim.lr": "1e-3"})
    assert (arm.steps, arm.eval_every, arm.optim.warmup_steps, arm.optim.lr) == (50, 50, 5, 1e-3)
    arm = arm_config(template, model, 0, tmp_path, {"optim.warmup_steps": 0, "eval_every": 7})
    assert (arm.optim.warmup_steps, arm.eval_every) == (0, 7)


def test_study_from_args_applies_the_flags_and_sets():
    args = argparse.Namespace(
        quick=True, rhos="1.0,0.5", budgets=None, seeds="0,1", data="x.txt", out="o"
    )
    args.set = ["seq_len=32"]  # `--set`, repeatable
    cfg = study_from_args(args, AllocationConfig(), QUICK, {"rhos": float, "budgets": int})
    assert (cfg.rhos, cfg.budgets, cfg.seeds, cfg.out_dir) == ((1.0, 0.5), (10, 20), (0, 1), "o")
    assert cfg.train == replace(QUICK.train, data="x.txt") and cfg.overrides == ("seq_len=32",)
    assert cfg.arm(model_preset("tiny"), 0, "o/a", steps=4).seq_len == 32
    with pytest.raises(ValueError, match="bad override"):
        study_from_args(argparse.Namespace(quick=False, set=["seq_len"]), cfg, cfg)


def test_quick_sweep_writes_a_report(tmp_path, monkeypatch, capsys, stdlib_corpus):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path / "cache"))
    corpus = stdlib_corpus(60)
    out = tmp_path / "allocation"
    argv = [
        "study",
        "allocation",
        "--quick",
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--rhos",
        "1.0,0.6",
        "--budgets",
        "3,4",
        "--seeds",
        "0,1",
    ]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["sweeps"]) == 2
    for points in report["sweeps"].values():
        assert [p["rho"] for p in points] == [1.0, 0.6]
        assert all(math.isfinite(p["val_loss"]) for p in points)
        assert points[0]["table_params"] == 0 < points[1]["table_params"]
        for p in points:
            assert p["seeds"] == [0, 1] and len(p["val_loss_per_seed"]) == 2
            assert p["val_loss_per_seed"][0] != p["val_loss_per_seed"][1]  # seeds differ
            assert math.isclose(p["val_loss"], sum(p["val_loss_per_seed"]) / 2)
    assert (out / "allocation.png").stat().st_size > 1000
    assert "Lowest loss at rho" in (out / "report.md").read_text()
    assert set(report["u_shape"]) == set(report["sweeps"])  # None per budget: only two rhos
    # Engram's gain over the pure MoE at each budget, paired by seed (issue 17: more tokens).
    trend = report["trend"]
    assert [(t["tokens"], t["rho"]) for t in trend] == [(3 * 8 * 64, 0.6), (4 * 8 * 64, 0.6)]
    for t, points in zip(trend, report["sweeps"].values(), strict=True):
        moe, engram = (p["val_loss_per_seed"] for p in points)
        assert t["diff_per_seed"] == [m - e for m, e in zip(moe, engram, strict=True)]
        assert t["verdict"] in ("resolved", "unresolved")
    (change,) = report["trend_change"]  # the gain at the last budget minus the first, paired
    assert change["change_per_seed"] == [
        b - a for a, b in zip(trend[0]["diff_per_seed"], trend[1]["diff_per_seed"], strict=True)
    ]
    assert change["gains"] == [t["diff_mean"] for t in trend] and change["verdict"] in (
        "resolved",
        "unresolved",
    )
    assert (out / "gap_vs_tokens.png").stat().st_size > 1000
    assert "gain against training tokens" in (out / "report.md").read_text()
    # A rerun reads the finished points back instead of training them again.
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == 8
    assert json.loads((out / "report.json").read_text())["sweeps"] == report["sweeps"]
    assert main(["study", "allocation", "--rhos", "x"]) == 2


# ---- the GPU recipe ------------------------------------------------------------------------------
def test_gpu_recipe_is_the_sweep_its_sizing_describes():
    """recipes/gpu-allocation.toml: the U-curve's 7 rhos, 2 seeds, >= 20M tokens per arm of the
    packages corpus, in bf16 on CUDA; every arm validates; its model FLOPs are the 9.40e15 that
    the recipe and docs/benchmarks.md size the 9-minute call from (313 s at 30 TFLOP/s)."""
    cfg = study_from_recipe(GPU_RECIPE, AllocationConfig(), "allocation")
    cfg.validate()
    assert (len(cfg.rhos), cfg.seeds, cfg.preset) == (7, (0, 1), "gpu-small")
    assert (cfg.train.data, cfg.train.device, cfg.train.precision) == ("packages", "cuda", "bf16")
    plans = allocation_arms(model_preset(cfg.preset), cfg.rhos)
    for steps in cfg.budgets:
        for plan in plans.values():
            arm = cfg.arm(plan.config, 0, "runs/x", steps=steps)
            arm.validate()
            assert tokens_per_arm(arm) >= 20_000_000
    flops = sweep_flops(cfg, plans)
    assert flops == pytest.approx(9.40e15, rel=0.001)
    assert flops / 30e12 < 320  # seconds of training at the assumed rate, of the 540


def test_a_study_recipe_is_checked(tmp_path):
    def recipe(text: str) -> Path:
        path = tmp_path / "r.toml"
        path.write_text(text)
        return path

    base = AllocationConfig()
    with pytest.raises(ValueError, match="is for study 'memory', not 'allocation'"):
        study_from_recipe(recipe('study = "memory"'), base, "allocation")
    with pytest.raises(ValueError, match='names no study: add study = "allocation"'):
        study_from_recipe(recipe("rhos = [1.0]"), base, "allocation")
    for key, owner in (("model.d_model", "preset"), ("seed", "seeds"), ("out_dir", "out_dir")):
        with pytest.raises(ValueError, match=f"train.{key} is set by each arm.*use {owner}"):
            study_from_recipe(recipe(f'study = "allocation"\ntrain.{key} = 1'), base, "allocation")
    with pytest.raises(ValueError, match="unknown key 'colour'"):
        study_from_recipe(recipe('study = "allocation"\ncolour = 1'), base, "allocation")
    with pytest.raises(ValueError, match="not a valid int"):
        study_from_recipe(recipe('study = "allocation"\nbudgets = ["x"]'), base, "allocation")
    with pytest.raises(ValueError, match="is a study's: run engram study allocation --recipe"):
        train_config(str(GPU_RECIPE), [])
    cfg = study_from_recipe(
        recipe('study = "allocation"\nrhos = [1.0, 0.5]\n[train.optim]\nlr = 1e-3'),
        base,
        "allocation",
    )
    assert (cfg.rhos, cfg.train.optim.lr, cfg.budgets) == ((1.0, 0.5), 1e-3, base.budgets)


def test_gpu_recipe_runs_on_a_cpu_shrunk_by_flags(tmp_path, monkeypatch, stdlib_corpus):
    """The recipe through the CLI, its sizes and device overridden (flags and --set win over
    it): the `gpu-small` arms train, evaluate and report on a CPU in seconds."""
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "gpu-allocation"
    shrink = ["device=cpu", "batch_size=2", "seq_len=32", "eval_tokens=256", "tokenizer=bpe:300"]
    argv = ["study", "allocation", "--recipe", str(GPU_RECIPE), "--rhos", "1.0,0.9"]
    argv += ["--seeds", "0", "--budgets", "2", "--data", str(stdlib_corpus(30)), "--out", str(out)]
    for assignment in shrink:
        argv += ["--set", assignment]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    (points,) = report["sweeps"].values()
    assert [p["rho"] for p in points] == [1.0, 0.9]
    assert all(math.isfinite(p["val_loss"]) for p in points)
    assert report["config"]["preset"] == "gpu-small" and report["training_flops"] > 0
    config = json.loads((out / "steps-2" / "seed-0" / "rho-0.9" / "config.json").read_text())
    assert (config["precision"], config["steps"], config["optim"]["fused"]) == ("bf16", 2, True)


def test_an_interrupted_arm_resumes_from_its_checkpoint(
    tmp_path, monkeypatch, capsys, stdlib_corpus
):
    """A study's arm killed after a checkpoint continues from it on the next call, to the same
    result as an arm never interrupted; how often it checkpoints is not part of reuse."""
    import engram.train

    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path / "cache"))
    template = replace(QUICK.train, data=str(stdlib_corpus(60)), steps=4, ckpt_every=2)
    template = replace(template, seq_len=32, batch_size=4, eval_tokens=1024)
    model = model_preset("tiny")
    whole = train_arm(arm_config(template, model, seed=0, out=tmp_path / "whole"))

    real_step = engram.train.Run.train_step

    def dies_at_step_3(run, batch):
        if run.step == 3:
            raise KeyboardInterrupt  # the process is stopped (a session ends, ^C)
        return real_step(run, batch)

    config = arm_config(template, model, seed=0, out=tmp_path / "cut")
    monkeypatch.setattr(engram.train.Run, "train_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_arm(config)
    steps_taken = []

    def counts(run, batch):
        steps_taken.append(run.step)
        return real_step(run, batch)

    monkeypatch.setattr(engram.train.Run, "train_step", counts)
    capsys.readouterr()
    resumed = train_arm(config)
    assert "resuming the unfinished run" in capsys.readouterr().out
    assert steps_taken == [2, 3]  # from the step-2 checkpoint on, not from scratch
    assert resumed["val_loss"] == whole["val_loss"] and resumed["tokens"] == whole["tokens"]
    # A finished run is read back whatever its checkpoint cadence; another config retrains.
    assert train_arm(replace(config, ckpt_every=0))["val_loss"] == whole["val_loss"]
    assert "reusing the finished run" in capsys.readouterr().out
    # A study folder moved elsewhere holds the same runs: read back, not retrained (and so
    # not deleted).
    (tmp_path / "cut").rename(tmp_path / "moved")
    moved = train_arm(replace(config, out_dir=str(tmp_path / "moved")))
    assert moved["val_loss"] == whole["val_loss"]
    assert "reusing the finished run" in capsys.readouterr().out
    (tmp_path / "moved").rename(tmp_path / "cut")
    (tmp_path / "cut" / "summary.json").unlink()
    train_arm(replace(config, seed=1))  # an unfinished run of another config: trained afresh
    assert "resuming" not in capsys.readouterr().out
