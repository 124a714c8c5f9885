"""The Engram language model: config, backbone layers, MoE, hyper-connections, parameter
accounting (`accounting`) and the iso-parameter MoE/Engram planner (`planner`)."""

from engram.model.accounting import ParamCounts, count_params, count_params_from_config
from engram.model.config import (
    PRESETS,
    EngramOptions,
    ModelConfig,
    MoEConfig,
    granular,
    model_preset,
)
from engram.model.lm import Block, EngramLM
from engram.model.planner import AllocationPlan, format_plan, plan_allocation, plan_from_moe

__all__ = [
    "PRESETS",
    "AllocationPlan",
    "Block",
    "EngramLM",
    "EngramOptions",
    "MoEConfig",
    "ModelConfig",
    "ParamCounts",
    "count_params",
    "count_params_from_config",
    "format_plan",
    "granular",
    "model_preset",
    "plan_allocation",
    "plan_from_moe",
]
