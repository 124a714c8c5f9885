"""Inference: cached generation (and, with the `hf` extra, Hugging Face integration)."""

from engram.inference.generate import Generation, SamplingConfig, generate, left_pad, sample_next

__all__ = ["Generation", "SamplingConfig", "generate", "left_pad", "sample_next"]
