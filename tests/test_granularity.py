"""`engram study granularity`: finer experts at fixed widths, shared_hidden, verdicts, a run."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace

import pytest
import torch

from engram.cli import main
from engram.experiments import granularity
from engram.experiments.granularity import (
    QUICK,
    GranularityConfig,
    best_baseline,
    choose_best,
    compare,
    granularity_arms,
    lr_summary,
    verdict,
)
from engram.model import EngramLM, MoEConfig, granular, model_preset, plan_from_moe
from engram.model.accounting import count_params, count_params_from_config
from engram.model.moe import MoE

DEMO = model_preset("demo")


# ---- granular and shared_hidden ------------------------------------------------------------------
@pytest.mark.parametrize("g", [0.5, 2, 4.0])
def test_granular_keeps_the_routed_and_shared_widths(g):
    moe = DEMO.moe
    fine = granular(moe, g)
    assert fine.num_routed * fine.expert_hidden == moe.num_routed * moe.expert_hidden  # total
    assert fine.top_k * fine.expert_hidden == moe.top_k * moe.expert_hidden  # active
    assert fine.shared_width == fine.shared_hidden == moe.shared_width == 128
    assert (fine.num_routed, fine.top_k) == (round(64 * g), round(2 * g))
    fine.validate()


def test_granular_of_one_is_the_config_itself():
    assert granular(DEMO.moe, 1) is DEMO.moe  # the demo's baseline, shared_hidden still None


@pytest.mark.parametrize(
    "g, match",
    [(3, "expert_hidden would be 42.6667"), (0.25, "top_k would be 0.5"), (0.1, "num_routed")],
)
def test_granular_refuses_an_uneven_g(g, match):
    with pytest.raises(ValueError, match=match):
        granular(DEMO.moe, g)


@pytest.mark.parametrize("g", [0, -2, math.nan, math.inf])
def test_granular_refuses_a_non_positive_g(g):
    with pytest.raises(ValueError, match="positive"):
        granular(DEMO.moe, g)


def test_shared_hidden_is_validated():
    with pytest.raises(ValueError, match="shared_hidden=-1"):
        MoEConfig(num_routed=4, top_k=2, expert_hidden=8, shared_hidden=-1).validate()
    with pytest.raises(ValueError, match="num_shared=0"):
        MoEConfig(num_routed=4, top_k=2, expert_hidden=8, num_shared=0, shared_hidden=8).validate()
    MoEConfig(num_routed=4, top_k=2, expert_hidden=8, shared_hidden=0).validate()  # no shared


@pytest.mark.parametrize("num_shared", [1, 2])
def test_shared_hidden_none_is_todays_moe(num_shared):
    """None means num_shared x expert_hidden: the same parameters, drawn in the same order, so
    the same init and the same forward (bitwise) as the explicit width."""
    today = MoEConfig(num_routed=4, top_k=2, expert_hidden=8, num_shared=num_shared)
    explicit = replace(today, shared_hidden=8 * num_shared)
    torch.manual_seed(0)
    a = MoE(16, today).eval()
    torch.manual_seed(0)
    b = MoE(16, explicit).eval()
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())
    assert a.shared.down.in_features == b.shared.down.in_features == 8 * num_shared
    x = torch.randn(2, 5, 16)
    assert torch.equal(a(x), b(x))


def test_shared_hidden_zero_builds_no_shared_expert():
    assert (
        MoE(16, MoEConfig(num_routed=4, top_k=2, expert_hidden=8, shared_hidden=0)).shared is None
    )


@pytest.mark.parametrize("shared_hidden", [None, 24, 0])
def test_accounting_counts_the_shared_width(shared_hidden):
    tiny = model_preset("tiny").with_(engram=None)
    config = tiny.with_(moe=replace(tiny.moe, shared_hidden=shared_hidden))
    counts = count_params_from_config(config)
    assert counts == count_params(EngramLM(config))  # analytic = measured
    width = tiny.moe.expert_hidden if shared_hidden is None else shared_hidden
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.n_layers))
    assert counts.shared_experts == moe_layers * 3 * config.d_model * width


def test_granularity_changes_only_the_router():
    arms = granularity_arms(DEMO, (0.5, 1.0, 2.0, 4.0))
    assert [a.moe.num_routed for a in arms.values()] == [32, 64, 128, 256]
    assert all(a.engram is None for a in arms.values())
    counts = [count_params_from_config(a) for a in arms.values()]
    assert len({c.p_tot - c.router for c in counts}) == 1
    assert len({c.p_act - c.router for c in counts}) == 1
    assert [c.router for c in counts] == [3 * 128 * e for e in (32, 64, 128, 256)]


@pytest.mark.parametrize("g", [0.5, 2.0])
def test_planner_keeps_the_shared_width_of_a_granular_moe(g):
    moe_model = granularity_arms(DEMO, (1.0, g))[f"g-{g:g}"]
    plan = plan_from_moe(moe_model, 0.8, engram=DEMO.engram)
    assert plan.config.moe.shared_hidden == 128 and plan.config.moe.top_k == moe_model.moe.top_k
    assert abs(plan.p_tot_diff) <= plan.expert_size and abs(plan.p_act_diff) <= plan.expert_size
    assert plan.warnings == [] and plan.counts.shared_experts == plan.baseline.shared_experts


# ---- verdicts on synthetic numbers ---------------------------------------------------------------
def _arm(*losses: float) -> dict:
    return {"val_loss_per_seed": list(losses), "val_loss_spread": max(losses) - min(losses)}


def test_verdict_needs_a_gap_over_twice_the_larger_spread():
    assert verdict(-0.12, 0.02, 0.05, seeds=2) == "resolved"  # 0.12 > 2 x 0.05
    assert verdict(-0.09, 0.02, 0.05, seeds=2) == "unresolved"
    assert verdict(0.30, 0.0, 0.0, seeds=1) == "unresolved"  # one seed measures no spread
    c = compare(_arm(3.56, 3.58), _arm(3.68, 3.70))
    assert c["diff_per_seed"] == pytest.approx([-0.12, -0.12])
    assert c["diff_mean"] == pytest.approx(-0.12) and c["threshold"] == pytest.approx(0.04)
    assert c["verdict"] == "resolved"
    assert compare(_arm(3.56, 3.75), _arm(3.68, 3.70))["verdict"] == "unresolved"  # spread 0.19


def test_choose_best_and_its_resolution():
    ref = {"g": 1.0, "name": "g-1", "val_loss": 3.69, **_arm(3.68, 3.70), "vs_reference": None}
    fine = {"g": 4.0, "name": "g-4", "val_loss": 3.57, **_arm(3.56, 3.58)}
    coarse = {"g": 0.5, "name": "g-0.5", "val_loss": 3.745, **_arm(3.74, 3.75)}
    for r in (fine, coarse):
        r["vs_reference"] = compare(r, ref)
    best = choose_best([coarse, ref, fine])
    assert (best["name"], best["verdict"]) == ("g-4", "resolved")
    # The reference best: resolved only against its runner-up.
    fine.update(val_loss=3.70, **_arm(3.60, 3.80))
    fine["vs_reference"] = compare(fine, ref)
    best = choose_best([coarse, ref, fine])
    assert (best["name"], best["verdict"]) == ("g-1", "unresolved")
    assert best["diff_mean"] == pytest.approx(0.01)


def test_lr_summary_sign_and_best_lrs():
    def point(lr: float, moe: float, engram: float) -> dict:
        return {
            "lr": lr,
            "moe": {"val_loss": moe},
            "engram": {"val_loss": engram},
            "gap_per_seed": [moe - engram],
        }

    s = lr_summary([point(1e-3, 3.9, 3.7), point(3e-3, 3.6, 3.5), point(6e-3, 3.7, 3.6)])
    assert s["sign_holds"] and s["engram_better_everywhere"]
    assert s["best_lr"] == {"moe": 3e-3, "engram": 3e-3}
    assert s["best_lr_at_edge"] == {"moe": False, "engram": False}
    assert s["tuned_gap"] == pytest.approx(0.1)
    s = lr_summary([point(1e-3, 3.5, 3.7), point(3e-3, 3.6, 3.5)])
    assert not s["sign_holds"] and s["best_lr"] == {"moe": 1e-3, "engram": 3e-3}
    assert s["best_lr_at_edge"] == {"moe": True, "engram": True}


# ---- config and command line ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes, match",
    [
        ({"granularities": (2.0, 4.0)}, "must hold 1"),
        ({"granularities": (1.0,)}, "at least one other"),
        ({"granularities": (1.0, 3.0)}, "does not divide"),
        ({"lrs": (0.0,)}, "lrs"),
        ({"lr_seeds": ()}, "lr_seeds"),
        ({"rho": 1.0}, "rho"),
        ({"overrides": ("optim.lr=1e-3",)}, "--lrs"),
        ({"baseline": "results/granularity"}, "chooses the baseline"),
    ],
)
def test_bad_study_config(changes, match):
    with pytest.raises(ValueError, match=match):
        replace(GranularityConfig(), **changes).validate()
    replace(GranularityConfig(), lrs=(), overrides=("optim.lr=1e-3",)).validate()  # no lr check


def test_cli_parses_the_lists_and_lrs_none(monkeypatch):
    seen = []
    monkeypatch.setattr(granularity, "run_granularity", seen.append)
    args = dict(quick=False, recipe=None, seeds="0,1,2", lr_seeds="0,1", rho=0.7, steps=50)
    args.update(granularities="1,2", lrs="none", data=None, out="o", set=[])
    granularity.run_cli(argparse.Namespace(**args))
    cfg = seen[0]
    assert (cfg.granularities, cfg.seeds, cfg.lrs, cfg.lr_seeds) == (
        (1.0, 2.0),
        (0, 1, 2),
        (),
        (0, 1),
    )
    assert (cfg.rho, cfg.train.steps, cfg.out_dir) == (0.7, 50, "o")
    granularity.run_cli(argparse.Namespace(**{**args, "lrs": "1e-3,2e-3", "rho": None}))
    assert (seen[1].lrs, seen[1].rho) == ((1e-3, 2e-3), 0.8)


def test_bad_granularity_is_one_line(tmp_path, capsys):
    argv = ["study", "granularity", "--granularities", "2,4", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "must hold 1" in capsys.readouterr().err


def test_best_baseline_refuses_other_reports(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"sweeps": {}}))
    with pytest.raises(ValueError, match="no best_moe"):
        best_baseline(tmp_path)
    with pytest.raises(ValueError, match="cannot read"):
        best_baseline(tmp_path / "missing.json")


# ---- a tiny study through the CLI ----------------------------------------------------------------
def test_quick_study_writes_a_report(tmp_path, monkeypatch, capsys, stdlib_corpus):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "granularity"
    argv = ["study", "granularity", "--quick", "--data", str(stdlib_corpus(60)), "--out", str(out)]
    argv += ["--granularities", "1,2", "--seeds", "0", "--lrs", "3e-3", "--steps", "3"]
    argv += ["--set", "seq_len=32", "--set", "batch_size=4", "--set", "eval_tokens=1024"]
    assert main(argv) == 0
    # The lr check's MoE at the template lr is the sweep's own run of the best g: read back.
    assert capsys.readouterr().out.count("reusing the finished run") == 1
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"arms", "reference", "best", "best_moe", "lr_check", "machine"}
    assert report["tokens_per_arm"] == 3 * 4 * 32 and report["train"]["seq_len"] == 32
    arms = {a["name"]: a for a in report["arms"]}
    assert list(arms) == ["g-1", "g-2"] and arms["g-1"]["vs_reference"] is None
    assert arms["g-2"]["router"] == 2 * arms["g-1"]["router"]
    for a in arms.values():
        assert a["seeds"] == [0] and math.isfinite(a["val_loss"]) and a["p_act"] < a["p_tot"]
    assert arms["g-2"]["vs_reference"]["verdict"] == "unresolved"  # one seed
    best = report["best"]["name"]
    assert best_baseline(out) == best_baseline(out, "demo") == granular(DEMO.moe, arms[best]["g"])
    with pytest.raises(ValueError, match="not 'gpu-small'"):  # absolute widths: one preset's
        best_baseline(out, "gpu-small")
    lr = report["lr_check"]
    (point,) = lr["points"]
    assert point["moe"]["val_loss"] == arms[best]["val_loss"]  # the same run
    assert point["gap"] == pytest.approx(point["moe"]["val_loss"] - point["engram"]["val_loss"])
    assert lr["engram_plan"]["table_params"] > 0 and isinstance(lr["sign_holds"], bool)
    text = (out / "report.md").read_text()
    for want in ("Chosen baseline", "threads", "P_act", "router", "Learning-rate check", "gap"):
        assert want in text, want
    assert (out / "granularity.png").stat().st_size > 1000


def test_quick_preset_is_valid():
    QUICK.validate()
    GranularityConfig().validate()


@pytest.mark.parametrize("g", [1, 2])
def test_demo_dense_arm_is_as_wide_as_the_active_experts(g):
    from engram.experiments.demo import demo_arms

    base = DEMO.with_(moe=granular(DEMO.moe, g))
    arms, _ = demo_arms(base, 0.8)
    assert arms["dense"].ffn_hidden == 2 * 128 + 128  # top-k x width + shared, at any g
