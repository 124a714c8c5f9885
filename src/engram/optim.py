"""Optimisers and learning-rate schedules for the Engram LM.

Two explicit groups, as the paper trains them (section 4):
- the backbone with AdamW (weight decay on matrices only, never on norms, biases or embeddings of
  one dimension), or Muon for its hidden matrices as the paper's backbone (`backbone="muon"`);
- the Engram tables with Adam at `table_lr_multiplier` (5x) the base rate and no weight decay,
  updated *sparsely*: the tables produce sparse gradients and `IndexedSparseAdam` (torch's
  SparseAdam, bit for bit, in fewer passes) touches only the rows a batch read, together with
  their moment estimates (lazy Adam).
`check_groups` asserts that every trainable parameter sits in exactly one group.

Tables placed outside the model by a `TablePlan` (host, disk, or a row-wise Adagrad) are not
parameters at all: the trainer steps them (`PlacedTables.step`) with row-wise optimisers at the
same rate (`Optimizers.table_lr`: base x multiplier x schedule), after the torch optimisers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from engram.config import OptimConfig
from engram.model.lm import EngramLM
from engram.tables.row_optim import adam_rows


def lr_factor(step: int, total: int, config: OptimConfig) -> float:
    """Multiplier of the base rate at `step` (0-based) of `total`: linear warm-up, then decay."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    if config.schedule == "step":
        return 1.0 if progress < 0.8 else (0.316 if progress < 0.9 else 0.1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


class IndexedSparseAdam(torch.optim.SparseAdam):
    """`torch.optim.SparseAdam` with the same state, hyper-parameters and results bit for bit
    (tests/test_optim.py), in fewer passes: the touched rows of the value and both
    moments are gathered once, updated as dense [U, r] blocks and written back, where torch's
    step masks and adds sparse tensors six times (bench/moe_parts.py times both)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_param(p, group)
        return loss

    def _step_param(self, p: torch.Tensor, group: dict) -> None:
        if not p.grad.is_sparse:
            raise RuntimeError(
                "SparseAdam does not support dense gradients, please consider Adam instead"
            )
        state = self.state[p]
        if not state:  # SparseAdam's state, so checkpoints of either optimiser load in the other
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        grad = (-p.grad if group.get("maximize", False) else p.grad).coalesce()
        rows, grads = grad.indices()[0], grad.values()  # [U] sorted unique, [U, r]
        if grads.numel() == 0:
            return
        m, v = state["exp_avg"], state["exp_avg_sq"]
        new = adam_rows(
            p.index_select(0, rows),
            m.index_select(0, rows),
            v.index_select(0, rows),
            grads,
            group["betas"],
            group["eps"],
            float(group["lr"]),
            state["step"],
        )
        for tensor, rows_new in zip((p, m, v), new, strict=True):
            tensor.index_copy_(0, rows, rows_new)


class Optimizers:
    """The backbone's optimiser(s) and the table Adam, stepped together with one schedule.

    `named` maps a stable name to each optimiser ("adamw", optionally "muon", "tables"); the
    names key the checkpointed states. With `backbone="muon"`, Muon (torch.optim.Muon, with the
    update scaled to AdamW's RMS so one learning rate serves both) takes the hidden weight
    matrices; AdamW keeps the embeddings, the LM head and every vector.
    """

    def __init__(self, model: EngramLM, config: OptimConfig) -> None:
        config.validate()
        self.config, self.factor = config, 1.0
        # Tables handed to a row store are no longer parameters; the rest stay embeddings.
        embedded = [e for e in model.engram_layers if e.table is not None]
        tables = [e.table.weight for e in embedded]
        table_ids = {id(p) for p in tables}
        muon, decay, no_decay = [], [], []
        for name, p in model.named_parameters():
            if not p.requires_grad or id(p) in table_ids:
                continue
            hidden_matrix = p.ndim == 2 and not name.startswith(("embed", "head"))
            if config.backbone == "muon" and hidden_matrix:
                muon.append(p)
            else:
                (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
        betas = (config.beta1, config.beta2)
        self.named: dict[str, torch.optim.Optimizer] = {
            "adamw": torch.optim.AdamW(
                [
                    {"params": decay, "weight_decay": config.weight_decay},
                    {"params": no_decay, "weight_decay": 0.0},
                ],
                lr=config.lr,
                betas=betas,
                fused=config.fused or None,  # None: torch's default (foreach where it can)
            )
        }
        if muon:
            self.named["muon"] = torch.optim.Muon(
                muon, lr=config.lr, weight_decay=config.weight_decay, adjust_lr_fn="match_rms_adamw"
            )
        self.backbone_params = muon + decay + no_decay
        self.lr_multipliers = dict.fromkeys(self.named, 1.0)
        self.table_multiplier = (
            model.config.engram.table_lr_multiplier if model.config.engram else 1.0
        )
        if tables:
            for engram in embedded:
                # A training concern applied from outside: the module itself stays dense-agnostic.
                engram.table.sparse = config.sparse_tables
            cls = IndexedSparseAdam if config.sparse_tables else torch.optim.Adam
            mult = self.table_multiplier
            self.named["tables"] = cls(tables, lr=config.lr * mult, betas=betas)
            self.lr_multipliers["tables"] = mult
        check_groups(model, self.all())

    def all(self) -> list[torch.optim.Optimizer]:
        return list(self.named.values())

    @property
    def lr(self) -> float:
        """The backbone's current learning rate."""
        return self.named["adamw"].param_groups[0]["lr"]

    def set_lr(self, factor: float) -> None:
        self.factor = factor
        for name, opt in self.named.items():
            for group in opt.param_groups:
                group["lr"] = self.config.lr * self.lr_multipliers[name] * factor

    def step(self) -> float:
        """Clip the backbone gradients, step every optimiser, clear the gradients; returns norm."""
        norm = 0.0
        if self.config.grad_clip > 0:
            total = nn.utils.clip_grad_norm_(self.backbone_params, self.config.grad_clip)
            # FSDP's gradients are shards (DTensors): their norm is assembled over the ranks.
            norm = float(total.full_tensor() if isinstance(total, DTensor) else total)
        for opt in self.all():
            opt.step()
            opt.zero_grad(set_to_none=True)
        return norm

    @property
    def table_lr(self) -> float:
        """The tables' current rate (base x multiplier x schedule), for placed tables' row
        optimisers, which the trainer steps after these (`PlacedTables.step`)."""
        return self.config.lr * self.table_multiplier * self.factor


def check_groups(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
    """Every trainable parameter is optimised exactly once (internal invariant)."""
    seen: dict[int, int] = {}
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                seen[id(p)] = seen.get(id(p), 0) + 1
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for i, n in names.items() if i not in seen]
    twice = [names.get(i, "?") for i, c in seen.items() if c > 1]
    assert not missing and not twice, f"optimiser groups: missing {missing}, twice {twice}"
