"""Configs as data: round trips, dotted overrides with typed parsing, TOML recipes."""

from __future__ import annotations

import json

import pytest

from engram.config_io import apply_overrides, from_dict, load_recipe, parse_assignments, to_dict
from engram.model import ModelConfig, model_preset
from engram.train import TrainConfig


def test_round_trip_through_json():
    config = TrainConfig(model=model_preset("demo"))
    again = from_dict(TrainConfig, json.loads(json.dumps(to_dict(config))))
    assert again == config


def test_dotted_overrides_parse_by_type():
    config = apply_overrides(
        TrainConfig(),
        {
            "steps": "7",
            "optim.lr": "1e-3",
            "model.moe.num_routed": "8",
            "model.engram.spec.layer_ids": "0,2",
            "model.engram.gate": "false",
            "progress": False,
        },
    )
    assert config.steps == 7 and config.optim.lr == 1e-3
    assert config.model.moe.num_routed == 8
    assert config.model.engram.spec.layer_ids == (0, 2) and config.model.engram.gate is False


def test_setting_a_section_to_none():
    config = apply_overrides(TrainConfig(), {"model.moe": "none", "model.engram": "none"})
    assert config.model.moe is None and config.model.engram is None
    with pytest.raises(ValueError, match="not inside a config section"):
        apply_overrides(config, {"model.moe.top_k": "2"})


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("stepz", "1", "unknown key 'stepz'"),
        ("steps", "many", "steps='many' is not a valid int"),
        ("model.engram.gate", "maybe", "is not a valid bool"),
        ("model.d_model", "none", "cannot be none"),
    ],
)
def test_bad_overrides_name_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(TrainConfig(), {key: value})


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown field"):
        from_dict(ModelConfig, {**to_dict(model_preset("tiny")), "colour": "red"})


def test_recipe_sections_become_dotted_keys(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('preset = "tiny"\nsteps = 3\n[model]\nd_model = 64\n[model.moe]\ntop_k = 1\n')
    assert load_recipe(path) == {
        "preset": "tiny",
        "steps": 3,
        "model.d_model": 64,
        "model.moe.top_k": 1,
    }
    with pytest.raises(ValueError, match="does not exist"):
        load_recipe(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("steps = = 3")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_recipe(tmp_path / "bad.toml")


def test_parse_assignments():
    assert parse_assignments(["a.b=1", "c = x"]) == {"a.b": "1", "c": "x"}
    with pytest.raises(ValueError, match="use key=value"):
        parse_assignments(["oops"])
