"""The smallest real training config, shared by the tests that train (seconds per run)."""

from __future__ import annotations

from pathlib import Path

import torch

from engram.cli import train_config
from engram.config import TrainConfig
from engram.inference.load import load_trained

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


def table_rows(out: Path) -> dict[str, torch.Tensor]:
    """Every Engram table's rows of a trained run, read back as one model (a sharded run's
    shards joined; an embedding or a store alike), by table name."""
    trained = load_trained(out, device="cpu")
    rows = {}
    for memory in trained.model.engram_layers:
        every = torch.arange(memory.spec.layer_rows(memory.layer_id))
        embedded = memory.table is not None
        table = memory.table.weight.detach() if embedded else memory.row_source.store.read(every)
        rows[f"layer{memory.layer_id}"] = table.cpu().clone()
    trained.tables.close()
    return rows
