"""`engram demo --quick`: three arms, the same tokens, a report with the promised fields."""

from __future__ import annotations

import json
import math

import pytest

from engram.cli import main
from engram.experiments.demo import QUICK, demo_arms
from engram.model import model_preset
from engram.model.accounting import count_params_from_config


@pytest.fixture()
def corpus(tmp_path, monkeypatch, stdlib_corpus):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path / "cache"))
    return stdlib_corpus(60)


def test_arms_are_iso_parameter():
    arms, plan = demo_arms(model_preset("demo"), 0.8)
    counts = {name: count_params_from_config(cfg) for name, cfg in arms.items()}
    tolerance = plan.expert_size  # the planner's promise: within one expert in every MoE layer
    assert abs(counts["engram"].p_tot - counts["moe"].p_tot) <= tolerance
    assert abs(counts["engram"].p_act - counts["moe"].p_act) <= tolerance
    assert abs(counts["dense"].p_act - counts["moe"].p_act) <= tolerance
    assert counts["engram"].engram_tables > 0 and 0.75 <= plan.rho <= 0.85


def test_quick_demo_writes_the_report(corpus, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--data", str(corpus), "--out", str(out), "--steps", "6"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["arms"]) == {"moe", "engram", "dense"}
    for arm in report["arms"].values():
        for key in (
            "p_tot",
            "p_act",
            "table_params",
            "tokens",
            "val_loss",
            "val_ppl",
            "tokens_per_s",
            "curve",
        ):
            assert key in arm
        assert math.isfinite(arm["val_loss"]) and arm["tokens"] == 6 * QUICK.train.batch_size * 128
        assert arm["curve"][-1][0] == arm["tokens"]
    assert report["arms"]["engram"]["table_params"] > 0
    assert (out / "val_loss.png").stat().st_size > 1000
    text = (out / "report.md").read_text()
    assert "Accounting" in text and "engram" in text
    assert "val loss" in capsys.readouterr().out


def test_quick_config_is_small():
    assert QUICK.train.steps * QUICK.train.batch_size * QUICK.train.seq_len <= 50_000
    assert not QUICK.reuse  # the demo always retrains its arms


def test_a_granularity_reports_moe_is_the_baseline(corpus, tmp_path, granularity_report):
    """--baseline: the MoE a granularity study chose replaces the preset's, the Engram arm is
    planned from it (still iso-parameter), and the report names it."""
    from engram.config import to_dict
    from engram.model import granular

    finer = granular(model_preset("demo").moe, 2)
    study = granularity_report(finer)
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--data", str(corpus), "--out", str(out), "--steps", "2"]
    assert main([*argv, "--baseline", str(study)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["baseline"]["moe"] == to_dict(finer)
    assert report["arms"]["moe"]["routed_experts"] == 128
    assert report["arms"]["engram"]["routed_experts"] < 128
    assert "granularity study's choice" in (out / "report.md").read_text()
    assert main([*argv, "--baseline", str(tmp_path)]) == 2  # not a granularity report
    granularity_report(finer, preset="demo-deep")  # another preset's experts: wrong widths
    assert main([*argv, "--baseline", str(study)]) == 2
