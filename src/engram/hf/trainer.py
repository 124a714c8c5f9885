"""Engram in a `transformers.Trainer`: one function for the optimiser, one callback for the tables.

For users who train with the Hugging Face `Trainer` rather than `engram train`:

    add_engram(model, spec, tokenizer)                             # docs/hf.md
    optimizer, callback = engram_for_trainer(model, "out/engram-tables", lr=1e-3,
                                             plan=TablePlan(placement="host"))
    Trainer(model=model, args=args, train_dataset=data,
            optimizers=(optimizer, None), callbacks=[callback]).train()

`engram_for_trainer` moves every Engram table into a row store placed by `plan` (device, host,
or a disk file larger than RAM behind the hot-row cache; `engram.tables`) and returns:
- `EngramAdamW`: AdamW over every trainable parameter (the backbone's and Engram's projections,
  norms and conv; weight decay on matrices only), whose `step` also steps the tables' row-wise
  Adam on the rows the step's forwards read (gradient accumulation included), at the paper's
  5x the current learning rate, so the Trainer's schedule drives both;
- `EngramTablesCallback`: writes the tables into each Trainer checkpoint (`engram_tables/`, the
  format `engram train` checkpoints use, with every file's SHA-256 in `engram_tables.json`) and
  restores them when the Trainer resumes from one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, TrainerCallback

from engram.checkpoint import check_digests, file_digest, seal, unseal
from engram.files import fsync_file
from engram.hf.attach import get_attachment
from engram.tables.placed import PlacedTables, table_name
from engram.tables.plan import TablePlan

TABLES, RECORD = "engram_tables", "engram_tables.json"


class EngramAdamW(torch.optim.AdamW):
    """AdamW whose step also steps the placed Engram tables (row-wise Adam, `lr x multiplier`)."""

    def __init__(
        self,
        params: list[dict[str, Any]],
        tables: PlacedTables,
        table_lr_multiplier: float = 5.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, **kwargs)
        self.tables, self.table_lr_multiplier = tables, table_lr_multiplier

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = super().step(closure)
        # The scheduler sets every group's lr alike: the first group's is the schedule's now.
        self.tables.step(self.param_groups[0]["lr"] * self.table_lr_multiplier)
        return loss


class EngramTablesCallback(TrainerCallback):
    """Saves the placed tables with every Trainer checkpoint and restores them on resume."""

    def __init__(self, tables: PlacedTables) -> None:
        self.tables = tables

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not args.should_save or not folder.is_dir():
            return
        saved = self.tables.write(folder / TABLES)
        files = sorted(p for p in (folder / TABLES).rglob("*") if p.is_file())
        record = {"tables": saved, "files": {p.relative_to(folder).as_posix(): file_digest(p)
                                             for p in files}}  # fmt: skip
        (folder / RECORD).write_text(json.dumps(seal(record), indent=1))
        fsync_file(folder / RECORD)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 0:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not (folder / RECORD).is_file():
            raise ValueError(
                f"resuming from {folder}, which holds no {RECORD}: its Engram tables were "
                "not saved with it (was EngramTablesCallback among the Trainer's callbacks?)"
            )
        record = unseal(json.loads((folder / RECORD).read_text()), str(folder / RECORD))
        check_digests(folder, record["files"], f"checkpoint {folder}", "is damaged")
        self.tables.restore(folder / TABLES, record["tables"])


def engram_for_trainer(
    model: PreTrainedModel,
    folder: str | Path,
    lr: float,
    plan: TablePlan | None = None,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    table_lr_multiplier: float = 5.0,
) -> tuple[EngramAdamW, EngramTablesCallback]:
    """The optimiser and callback that train `model`'s attached Engram (see the module
    docstring). `folder` holds disk tables while they train; `plan` places the tables (default:
    in a row store on the model's device)."""
    memories = get_attachment(model).engram_layers
    plan = plan if plan is not None else TablePlan(placement="device")
    device = next(model.parameters()).device
    stores = [table_name(m.layer_id) for m in memories]  # every table in a row store
    tables = PlacedTables(memories, plan, folder, device, betas=betas, stores=stores)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = EngramAdamW(groups, tables, table_lr_multiplier, lr=lr, betas=betas)
    return optimizer, EngramTablesCallback(tables)
