"""`engram study ablation`: each arm changes exactly one thing, and a quick study's report."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from engram.cli import main
from engram.config import to_dict
from engram.experiments.ablation import (
    ABLATION_TRAIN,
    AblationConfig,
    _backbone_line,
    ablation_arms,
    reference_config,
)
from engram.model import granular, model_preset
from engram.model.accounting import count_params_from_config

# The dotted config fields each arm may change, written out here rather than read from the module.
EXPECTED = {
    "reference": set(),
    "no-compression": {"engram.spec.compress"},
    "no-gate": {"engram.gate"},
    "no-conv": {"engram.conv"},
    "no-branch-keys": {"engram.branch_keys"},
    "+4-grams": {"engram.spec.orders", "engram.spec.base_sizes"},
    "layer-0": {"engram.spec.layer_ids"},
    "layer-2": {"engram.spec.layer_ids"},
    "layer-3": {"engram.spec.layer_ids"},
    "layers-1+3": {"engram.spec.layer_ids", "engram.spec.base_sizes"},
    "no-engram": {"engram"},
}


def changed(a: object, b: object, prefix: str = "") -> set[str]:
    """Dotted paths where two config dicts differ (a whole sub-config when one side is None)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return set().union(*(changed(a.get(k), b.get(k), f"{prefix}{k}.") for k in a | b))
    return {prefix.rstrip(".")} if a != b else set()


def test_every_arm_changes_exactly_its_fields():
    ref = reference_config(model_preset("demo"))
    # The demo preset has M = 1, where per-branch keys would not exist: the reference adds mHC.
    assert changed(to_dict(model_preset("demo")), to_dict(ref)) == {"hc_branches"}
    assert ref.hc_branches == 4 and ref.engram.spec.layer_ids == (1,)
    arms = ablation_arms(ref)
    assert list(arms) == list(EXPECTED)
    for name, arm in arms.items():
        arm.config.validate()
        assert changed(to_dict(ref), to_dict(arm.config)) == EXPECTED[name], name
    assert arms["+4-grams"].config.engram.spec.orders == (2, 3, 4)
    assert arms["layers-1+3"].config.engram.spec.layer_ids == (1, 3)
    assert arms["no-compression"].config.engram.spec.compress is False


def test_arms_that_move_memory_keep_its_size():
    arms = ablation_arms(reference_config(model_preset("demo")))
    ref = count_params_from_config(arms["reference"].config).engram_tables
    assert ref > 1_000_000
    for name in ("+4-grams", "layers-1+3", "layer-0", "layer-3"):
        tables = count_params_from_config(arms[name].config).engram_tables
        assert abs(tables - ref) / ref < 0.02, (name, tables, ref)
    assert count_params_from_config(arms["no-engram"].config).engram_tables == 0


def test_a_granularity_reports_moe_is_every_arms_backbone(granularity_report):
    """`baseline` (a recipe's field, or --baseline): every arm, the floor too, has the MoE the
    granularity study chose, and only the MoE differs from the preset's arms."""
    finer = granular(model_preset("demo").moe, 2)
    study = granularity_report(finer)
    own = AblationConfig().all_arms()
    chosen = AblationConfig(baseline=str(study)).all_arms()
    assert list(chosen) == list(own)
    for name, arm in chosen.items():
        assert arm.config.moe == finer, name
        assert changed(to_dict(own[name].config), to_dict(arm.config)) == {
            "moe.num_routed",
            "moe.top_k",
            "moe.expert_hidden",
            "moe.shared_hidden",  # the shared expert keeps its width
        }, name
    report = {"backbone_moe": to_dict(finer), "config": {"baseline": str(study)}}
    assert _backbone_line(report) == (
        f"Backbone MoE: the granularity study's choice in `{study}`, 128 routed experts of "
        "width 64, top-4.\n"
    )


def test_bad_ablation_config():
    with pytest.raises(ValueError, match="unknown arms \\['no-such'\\]"):
        AblationConfig(arms=("no-such",)).validate()
    with pytest.raises(ValueError, match="no-branch-keys needs hc_branches > 1"):
        AblationConfig(hc_branches=1).validate()
    AblationConfig(hc_branches=1, arms=("no-gate",)).validate()  # M = 1 is fine without it
    with pytest.raises(ValueError, match="steps=0"):
        AblationConfig(train=replace(ABLATION_TRAIN, steps=0)).validate()


def test_quick_study_writes_a_report(tmp_path, monkeypatch, capsys, stdlib_corpus):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path / "cache"))
    corpus = stdlib_corpus(60)
    out = tmp_path / "ablation"
    argv = ["study", "ablation", "--quick", "--data", str(corpus), "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {r["arm"]: r for r in report["arms"]}
    assert list(rows) == list(EXPECTED)
    ref = rows["reference"]["val_loss"]
    for name, r in rows.items():
        assert math.isfinite(r["val_loss"]), name
        assert math.isclose(r["delta_ref"], r["val_loss"] - ref, abs_tol=1e-9), name
    floor = rows["no-engram"]["val_loss"]
    assert math.isclose(rows["no-gate"]["delta_no_engram"], rows["no-gate"]["val_loss"] - floor)
    assert rows["no-engram"]["table_params"] == 0 < rows["reference"]["table_params"]
    # The gate's keys and the conv are parameters: removing them must show in P_tot.
    assert rows["no-gate"]["p_tot"] < rows["no-branch-keys"]["p_tot"] < rows["reference"]["p_tot"]
    assert rows["no-conv"]["p_tot"] < rows["reference"]["p_tot"]
    assert 0 < report["compression"]["canonical_ids"] < report["compression"]["vocab_size"]
    markdown = (out / "report.md").read_text()
    assert all(f"| {name} |" in markdown for name in EXPECTED)
    gain = floor - ref  # positive when Engram helps, as the paper's 1.808 - 1.768
    assert f"Engram gain (no-engram minus reference): {gain:+.4f}" in markdown
    assert "One seed" in markdown
    assert "Backbone MoE: the preset's own, 64 routed experts of width 128, top-2." in markdown
    assert {r["verdict"] for r in rows.values()} == {"-", "unresolved"}  # one seed resolves nothing
    assert "the largest regression" in markdown  # the paper's finding beside ours
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "ablation.png").stat().st_size > 5000

    # A second seed of one ablation: seed 0 is read back, seed 1 trained for it and the baselines.
    capsys.readouterr()
    assert main([*argv, "--arms", "no-gate", "--seeds", "0,1"]) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == 3
    report = json.loads((out / "report.json").read_text())
    rows = {r["arm"]: r for r in report["arms"]}
    assert list(rows) == ["reference", "no-gate", "no-engram"]
    assert rows["reference"]["delta_ref_per_seed"] == [0.0, 0.0]
    gate = rows["no-gate"]
    assert gate["seeds"] == [0, 1] and gate["val_loss_per_seed"][0] != gate["val_loss_per_seed"][1]
    assert math.isclose(gate["delta_ref"], sum(gate["delta_ref_per_seed"]) / 2)
    # The studies' rule: resolved only past twice the larger seed spread of the two arms.
    bar = 2 * max(gate["val_loss_spread"], rows["reference"]["val_loss_spread"])
    assert gate["verdict"] == ("resolved" if abs(gate["delta_ref"]) > bar else "unresolved")
    assert rows["reference"]["verdict"] == "-"
    markdown = (out / "report.md").read_text()
    assert "2 seeds; the largest spread" in markdown
    assert "Resolved against the reference" in markdown
    assert f"| {gate['verdict']} |" in markdown


def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["study", "ablation", "--arms", "no-gate,no-such", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown arms ['no-such']" in err
    assert main(["study", "ablation", "--seeds", "x", "--out", str(out)]) == 2
    assert not out.exists()  # rejected before anything was written
