"""`engram study memory`: arms on a fixed backbone, the log-linear fit, a quick study's report."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from engram.cli import main
from engram.experiments.memory import (
    MEMORY_TRAIN,
    MemoryConfig,
    fit_log_linear,
    memory_arms,
    slots_of,
)
from engram.model import granular, model_preset
from engram.model.accounting import count_params_from_config


def test_fit_recovers_a_log_linear_law():
    slots = [2**k for k in range(10, 16)]
    exact = fit_log_linear(slots, [5.0 - 0.03 * math.log2(s) for s in slots])
    assert exact["slope"] == pytest.approx(-0.03) and exact["intercept"] == pytest.approx(5.0)
    assert exact["r2"] == pytest.approx(1.0) and exact["n"] == 6
    # Noise of known sum of squares: the residuals below are orthogonal to 1 and to x, so the
    # fitted line is unchanged and R^2 = 1 - SS_res / SS_tot exactly.
    noise = [0.01, -0.01, -0.01, 0.01, 0.0, 0.0]  # sum 0, sum x*noise = 10-11-12+13 = 0
    noisy = fit_log_linear(
        slots, [5.0 - 0.03 * math.log2(s) + e for s, e in zip(slots, noise, strict=True)]
    )
    assert noisy["slope"] == pytest.approx(-0.03) and noisy["intercept"] == pytest.approx(5.0)
    xs = [math.log2(s) for s in slots]
    ss_tot = sum((0.03 * (x - sum(xs) / 6)) ** 2 for x in xs) + 4e-4
    assert noisy["r2"] == pytest.approx(1 - 4e-4 / ss_tot)
    assert fit_log_linear([4, 8], [2.0, 2.0])["r2"] is None  # nothing to explain
    with pytest.raises(ValueError, match="2 distinct"):
        fit_log_linear([1024, 1024], [3.0, 2.9])
    with pytest.raises(ValueError, match="losses"):
        fit_log_linear([1024, 2048], [3.0])


def test_arms_share_the_backbone_and_pair_the_tables():
    cfg = MemoryConfig(slots=(2048, 8192), overencoding_slots=(8192,))
    arms = memory_arms(cfg)
    assert list(arms) == ["backbone", "engram-2048", "engram-8192", "overencoding-8192"]
    base = model_preset("demo")
    assert arms["backbone"].engram is None and arms["backbone"].moe == base.moe
    backbone = count_params_from_config(arms["backbone"]).p_tot
    for name, model in list(arms.items())[1:]:
        counts = count_params_from_config(model)
        # Memory is added on top: everything outside the Engram weights is the backbone.
        assert counts.p_tot - counts.engram_tables - counts.engram_dense == backbone, name
        slots, rows = slots_of(model)
        requested = int(name.split("-")[1])
        assert requested <= slots < 1.05 * requested  # primes are searched upward
        assert counts.engram_tables == rows * model.engram.spec.row_dim
    engram, over = arms["engram-8192"], arms["overencoding-8192"]
    assert (engram.engram.site, over.engram.site) == ("block", "input")
    assert engram.engram.spec == over.engram.spec  # same tables, same addresses
    assert count_params_from_config(engram).engram_tables == (
        count_params_from_config(over).engram_tables
    )


def test_a_granularity_reports_moe_is_the_backbone(granularity_report):
    finer = granular(model_preset("demo").moe, 2)
    study = str(granularity_report(finer))
    arms = memory_arms(MemoryConfig(slots=(2048,), overencoding_slots=(), baseline=study))
    assert all(model.moe == finer for model in arms.values())


def test_bad_config():
    with pytest.raises(ValueError, match="not among slots"):
        MemoryConfig(slots=(2048,), overencoding_slots=(4096,)).validate()
    with pytest.raises(ValueError, match="unique"):
        MemoryConfig(slots=(2048, 2048), overencoding_slots=()).validate()
    with pytest.raises(ValueError, match="must be >= 2"):
        MemoryConfig(slots=(1,), overencoding_slots=()).validate()
    with pytest.raises(ValueError, match="steps=0"):
        MemoryConfig(train=replace(MEMORY_TRAIN, steps=0)).validate()


def test_quick_study_writes_a_report(tmp_path, monkeypatch, capsys, stdlib_corpus):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path / "cache"))
    corpus = stdlib_corpus(60)
    out = tmp_path / "memory"
    argv = ["study", "memory", "--quick", "--data", str(corpus), "--out", str(out)]
    assert main([*argv, "--steps", "6"]) == 0
    report = json.loads((out / "report.json").read_text())
    for family in ("engram", "overencoding"):
        points = report["families"][family]
        assert [p["slots_requested"] for p in points] == [256, 1024]
        assert all(math.isfinite(p["val_loss"]) and p["seeds"] == [0] for p in points)
        assert points[0]["table_params"] < points[1]["table_params"]
        fit = report["fits"][family]
        assert math.isfinite(fit["slope"]) and math.isfinite(fit["intercept"])
        assert fit["n"] == 2 and fit["r2"] == pytest.approx(1.0)  # two points fit exactly
    pairs = zip(*report["families"].values(), strict=True)
    assert all(e["table_params"] == o["table_params"] for e, o in pairs)
    assert math.isfinite(report["backbone"]["val_loss"])
    assert report["backbone"]["table_params"] == 0
    assert report["config"]["steps"] == 6 and report["machine"]["commit"]
    assert (out / "memory.png").stat().st_size > 1000
    text = (out / "report.md").read_text()
    assert "Same memory: Engram against OverEncoding" in text and "per doubling" in text
    # A rerun reads all five finished arms back instead of training them again.
    capsys.readouterr()
    assert main([*argv, "--steps", "6"]) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == 5
    assert json.loads((out / "report.json").read_text())["families"] == report["families"]


@pytest.mark.parametrize(
    "extra",
    [
        ["--slots", "x"],
        ["--slots", "256", "--overencoding-slots", "1024"],
        ["--slots", "1"],
        ["--steps", "0"],
        ["--seeds", ","],
    ],
)
def test_bad_cli_input_exits_2(tmp_path, extra):
    assert main(["study", "memory", "--quick", "--out", str(tmp_path), *extra]) == 2
