"""Configs as data: round trips, dotted overrides with typed parsing, TOML recipes."""

from __future__ import annotations

import dataclasses
import json

import pytest

from engram.config import (
    TrainConfig,
    apply_overrides,
    from_dict,
    load_recipe,
    parse_assignments,
    to_dict,
)
from engram.model import ModelConfig, model_preset


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


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("steps", True, "steps=True is not a valid int"),  # bool is an int subclass
        ("steps", [1, 2], r"steps=\[1, 2\] is not a valid int"),
        ("steps", 1.5, "steps=1.5 is not a valid int"),
        ("steps", "1e400", "steps='1e400' is not a valid int"),  # int(float('inf')) overflows
        ("steps", float("inf"), "steps=inf is not a valid int"),
        ("steps", "nan", "steps='nan' is not a valid int"),
        ("progress", 5, "progress=5 is not a valid bool"),  # a number is not a flag
        ("progress", "7", "progress='7' is not a valid bool"),
        ("progress", "yes", "progress='yes' is not a valid bool"),
        ("optim.lr", True, "optim.lr=True is not a valid float"),
        ("optim.lr", [1], r"optim.lr=\[1\] is not a valid float"),
        ("optim.lr", "nan", "optim.lr='nan' is not a valid float"),
        ("optim.lr", "-inf", "optim.lr='-inf' is not a valid float"),
        ("optim.lr", 10**400, "is not a valid float"),  # beyond float range: OverflowError
        ("tokenizer", ["bpe:512"], r"tokenizer=\['bpe:512'\] is not a valid str"),
        ("tokenizer", 512, "tokenizer=512 is not a valid str"),
        ("model.engram.spec.layer_ids", 3, "layer_ids=3 is not a valid list"),
        ("model.engram.spec.layer_ids", [0, True], "layer_ids=True is not a valid int"),
        ("model.engram.spec.layer_ids", "0,x", "layer_ids='x' is not a valid int"),
    ],
)
def test_values_of_the_wrong_type_are_refused(key, value, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(TrainConfig(), {key: value})


def test_values_that_are_the_right_type_in_other_clothes():
    config = apply_overrides(
        TrainConfig(),
        {
            "steps": "1e3",
            "eval_every": 5.0,
            "optim.lr": 1,
            "progress": "1",
            "model.engram.spec.layer_ids": [0, "2"],
        },
    )
    assert config.steps == 1000 and config.eval_every == 5
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.progress is True and config.model.engram.spec.layer_ids == (0, 2)
    assert isinstance(config.eval_every, int)


def test_missing_fields_are_a_user_error_and_bad_field_types_a_bug():
    with pytest.raises(ValueError, match=r"missing field\(s\) \['engram.spec.base_sizes', "):
        from_dict(type(model_preset("demo").engram.spec), {"seed": 1}, prefix="engram.spec.")

    @dataclasses.dataclass
    class Odd:
        pair: tuple[int, str] = (1, "a")
        names: set[str] = dataclasses.field(default_factory=set)

    with pytest.raises(TypeError, match="only tuple"):
        from_dict(Odd, {"pair": [2, "b"]})
    with pytest.raises(TypeError, match="not supported"):
        from_dict(Odd, {"names": ["x"]})


def test_a_renamed_field_reads_under_its_new_name():
    """`model.engram.placement` (block/input) became `site`: old configs and keys still work."""
    cfg = TrainConfig()
    old = to_dict(cfg)
    old["model"]["engram"]["placement"] = old["model"]["engram"].pop("site")
    assert from_dict(TrainConfig, old) == cfg
    over = apply_overrides(cfg, {"model.engram.placement": "input"})
    assert over.model.engram.site == "input"


def test_gpu_presets_are_what_their_comments_say():
    """`gpu`: about 100M active parameters, Engram at blocks 1 and 5, the DeepSeek tokenizer,
    GEMM widths multiples of 128; `gpu-small`'s MoE baseline: the allocation recipe's sizes."""
    from engram.model.accounting import count_params_from_config

    gpu = model_preset("gpu")
    counts = count_params_from_config(gpu)
    assert (counts.p_act, counts.p_tot) == (105_171_200, 804_102_528)
    assert count_params_from_config(gpu.with_(engram=None)).p_act == 102_009_600
    spec = gpu.engram.spec
    assert (spec.tokenizer, spec.layer_ids, gpu.max_seq_len) == ("deepseek", (1, 5), 2048)
    d_mem = spec.row_dim * spec.heads_per_order * len(spec.orders)
    widths = (gpu.d_model, gpu.ffn_hidden, gpu.moe.expert_hidden, d_mem)
    assert all(w % 128 == 0 for w in widths) and gpu.head_dim == 64
    small = count_params_from_config(model_preset("gpu-small").with_(engram=None))
    assert (small.p_act, small.p_tot) == (3_197_184, 39_766_272)


def test_demo_deep_is_the_demo_deeper_and_narrower_at_equal_parameters():
    """`demo-deep` (issue 17, depth): >= 8 blocks, narrower than `demo`, the first block dense,
    Engram at block 1; its MoE baseline's P_tot and P_act (outside the embeddings, as the demo
    compares its arms) within 3% of the demo's, and its table the planner's at rho = 0.8."""
    from engram.model.accounting import count_params_from_config
    from engram.model.planner import plan_from_moe

    demo, deep = model_preset("demo"), model_preset("demo-deep")
    assert deep.n_layers >= 8 and deep.d_model < demo.d_model and deep.first_dense_layers == 1
    assert deep.engram.spec.layer_ids == (1,) and deep.moe.num_routed == demo.moe.num_routed
    ours = count_params_from_config(deep.with_(engram=None))
    theirs = count_params_from_config(demo.with_(engram=None))
    assert (ours.p_tot, ours.p_act) == (9_818_208, 818_784)  # the numbers its comment states
    assert (theirs.p_tot, theirs.p_act) == (9_954_432, 812_160)
    assert abs(ours.p_tot / theirs.p_tot - 1) < 0.03
    assert abs(ours.p_act / theirs.p_act - 1) < 0.03
    plan = plan_from_moe(deep, 0.8)
    assert plan.base_size == deep.engram.spec.base_sizes[0] and plan.num_routed == 52
