"""The study recipes under recipes/: each resolves to a valid study, and the ablation's recipe
still describes the arms committed under results/ (their configs must match it exactly, or a
rerun would retrain them)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from engram.experiments.ablation import AblationConfig
from engram.experiments.allocation import AllocationConfig
from engram.experiments.arms import finished_summary, study_from_recipe
from engram.experiments.granularity import best_baseline
from engram.experiments.long_context import LongContextConfig

ROOT = Path(__file__).parent.parent
STUDIES = {"ablation": AblationConfig, "allocation": AllocationConfig}
STUDIES["long-context"] = LongContextConfig
RECIPES = sorted(
    p for p in (ROOT / "recipes").glob("*.toml") if "study" in tomllib.loads(p.read_text())
)


def test_every_study_recipe_is_known():
    names = {tomllib.loads(p.read_text())["study"] for p in RECIPES}
    assert len(RECIPES) >= 5 and names <= set(STUDIES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_a_study_recipe_resolves(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name results/ relative to the project
    name = tomllib.loads(path.read_text())["study"]
    cfg = study_from_recipe(path, STUDIES[name](), name)
    cfg.validate()
    model = cfg.base_model()
    if cfg.baseline:  # the granularity study's choice, as the recipe's comment says
        assert model.moe == best_baseline(cfg.baseline, cfg.preset)


def test_the_ablation_recipe_describes_its_committed_arms(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = study_from_recipe("recipes/ablation-cpu.toml", AblationConfig(), "ablation")
    kept = ROOT / "results" / "ablation-cpu" / "arms"
    seen = 0
    for name, arm in cfg.selected().items():
        for seed in cfg.seeds:
            folder = kept / f"seed-{seed}" / name
            if folder.exists():  # read back as a rerun reads its run folder
                assert finished_summary(cfg.arm(arm.config, seed, folder)), (name, seed)
                seen += 1
    assert seen >= 18
