"""The Engram language model: config, backbone layers, MoE, hyper-connections, accounting."""

from engram.model.config import PRESETS, EngramOptions, ModelConfig, MoEConfig, model_preset
from engram.model.lm import Block, EngramLM

__all__ = [
    "PRESETS",
    "Block",
    "EngramLM",
    "EngramOptions",
    "MoEConfig",
    "ModelConfig",
    "model_preset",
]
