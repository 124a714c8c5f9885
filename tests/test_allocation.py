"""`engram study allocation`: iso-parameter arms across rho, and a quick sweep's report."""

from __future__ import annotations

import json
import math

import pytest

from engram.cli import main
from engram.experiments.allocation import AllocationConfig, allocation_arms
from engram.model import model_preset
from engram.model.accounting import count_params_from_config


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


def test_bad_sweep_config():
    with pytest.raises(ValueError, match="rhos"):
        AllocationConfig(rhos=(1.2,)).validate()
    with pytest.raises(ValueError, match="budgets"):
        AllocationConfig(budgets=()).validate()


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
    # A rerun reads the finished points back instead of training them again.
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == 8
    assert json.loads((out / "report.json").read_text())["sweeps"] == report["sweeps"]
    assert main(["study", "allocation", "--rhos", "x"]) == 2
