"""The smallest real training config, shared by the tests that train (seconds per run)."""

from __future__ import annotations

from pathlib import Path

from engram.cli import train_config
from engram.config import TrainConfig

BASE = [
    "tokenizer=bpe:400",
    "seq_len=32",
    "batch_size=4",
    "steps=8",
    "eval_every=4",
    "eval_tokens=2048",
    "progress=false",
    "optim.warmup_steps=2",
]


def small_config(corpus: Path, out: Path, *overrides: str) -> TrainConfig:
    """The tiny preset on `corpus`, written to `out`; later `key=value` overrides win."""
    return train_config(None, [f"data={corpus}", f"out_dir={out}", *BASE, *overrides])
