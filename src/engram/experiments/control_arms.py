"""The mechanics of the table controls: what each control changes, and how it trains and evaluates.

A control keeps the reference model (its config, seed, tokens and schedule) and changes one thing
about its Engram tables, so that a loss difference can be pinned on what the stored rows do:

- `reference`:   the model as configured (content-addressed, trained tables);
- `zero-table`:  the tables start at zero and are never updated: everything else of Engram
                 (projections, gate, conv) still trains, so this measures the extra dense parameters
                 without any stored content (the published "negative result" trained exactly this);
- `capacity-1`:  every N-gram of a head reads the head's first row: a learned constant per head,
                 memory without addressing;
- `random-rows`: each position reads rows drawn at random from its position in the batch stream,
                 never from its tokens: the same parameters and sparsity without content addressing;
- `no-engram`:   the backbone alone.

Everything is composed from `engram.train.Run`: the table is frozen after the model is built (a
parameter without a gradient is skipped by every torch optimiser, SparseAdam included), and the
rows the loader would hash are replaced batch by batch before the training step (`ControlRun`, a
`Run` whose `transform` and `evaluate_val` apply the control inside `engram.train.train`'s own
loop). The evaluation-time controls (shuffled, zeroed, switched-off tables) act on a
trained model's weights in place and restore them afterwards.

Axes: B batch, T time, H heads of a layer (order-major), N stream tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engram.assembly import autocast_for, evaluate, to_device
from engram.config import TrainConfig
from engram.data import Batch, PackedLoader, eval_batches
from engram.model import EngramLM, ModelConfig
from engram.spec import HashSpec, SpecConfig
from engram.train import Run, train

Rows = dict[int, torch.Tensor]  # Engram layer id -> rows [B, T, H]
ADDRESSINGS = ("hash", "constant", "random")
TRAIN_STREAM, EVAL_STREAM = 0, 1  # salts: the random rows of training and of evaluation differ


@dataclass(frozen=True)
class Control:
    """One training control: which model it builds, how its tables train and are addressed."""

    name: str
    engram: bool = True  # False: the backbone alone
    frozen_zero_table: bool = False  # tables zeroed after construction, never updated
    addressing: str = "hash"  # "hash" (N-gram content), "constant" (row 0), "random" (position)
    description: str = ""

    def validate(self) -> None:
        if self.addressing not in ADDRESSINGS:
            raise ValueError(f"addressing={self.addressing!r} must be one of {ADDRESSINGS}")

    @property
    def reads_hash(self) -> bool:
        """Whether the loader must hash the N-grams (only content addressing reads them)."""
        return self.engram and self.addressing == "hash"

    def model_config(self, base: ModelConfig) -> ModelConfig:
        if base.engram is None:
            raise ValueError("the controls need a model preset with Engram")
        return base if self.engram else base.with_(engram=None)

    def prepare(self, model: EngramLM) -> None:
        """Apply the control to a freshly built model (before the first step)."""
        if self.frozen_zero_table:
            for engram in model.engram_layers:
                engram.table.weight.requires_grad_(False)
                with torch.no_grad():
                    engram.table.weight.zero_()

    def address(self, batch: Batch, spec: HashSpec | None, stream: int) -> Batch:
        """The batch with this control's rows (the hashed rows are kept for `hash`)."""
        if spec is None or self.addressing == "hash":
            return batch
        B, T = batch.ids.shape
        if self.addressing == "constant":
            return replace(batch, rows=constant_rows(spec, B, T))
        return replace(batch, rows=random_rows(spec, B, T, (stream, batch.epoch, batch.index)))

    def trained_table_params(self, table_params: int, spec: SpecConfig) -> int:
        """Of a model's `table_params`, how many can receive an update under this control."""
        if not self.engram or self.frozen_zero_table:
            return 0
        if self.addressing == "constant":  # one row per head and layer
            heads = len(spec.orders) * spec.heads_per_order
            return len(spec.layer_ids) * heads * spec.row_dim
        return table_params


CONTROLS: dict[str, Control] = {
    c.name: c
    for c in (
        Control("reference", description="content-addressed, trained tables"),
        Control(
            "zero-table",
            frozen_zero_table=True,
            description="tables zero and frozen; projections, gate and conv train",
        ),
        Control(
            "capacity-1",
            addressing="constant",
            description="every N-gram of a head reads one row (a learned constant per head)",
        ),
        Control(
            "random-rows",
            addressing="random",
            description="rows drawn from the position in the batch stream, not the tokens",
        ),
        Control("no-engram", engram=False, description="the backbone alone"),
    )
}


# ---- addressing ----------------------------------------------------------------------------------
def constant_rows(spec: HashSpec, B: int, T: int) -> Rows:
    """Row 0 of every head at every position: {layer: zeros [B, T, H]}."""
    H = spec.heads_total
    return {layer: torch.zeros(B, T, H, dtype=torch.int64) for layer in spec.layer_ids}


def random_rows(spec: HashSpec, B: int, T: int, key: tuple[int, ...]) -> Rows:
    """Rows uniform in each head's [0, prime), a pure function of (`key`, layer, b, t).

    `key` names the batch in its stream (salt, epoch, batch index), so the rows are deterministic
    per position and cannot depend on the tokens: there is no token among the inputs.
    """
    if any(k < 0 for k in key):
        raise ValueError(f"key={key} must hold non-negative integers")
    rows = {}
    for layer in spec.layer_ids:
        primes = np.asarray(spec.layer_primes(layer), dtype=np.int64)  # [H]
        rng = np.random.default_rng([*key, layer])
        rows[layer] = torch.from_numpy(rng.integers(0, primes, size=(B, T, len(primes))))
    return rows


# ---- training ------------------------------------------------------------------------------------
def evaluate_control(
    model: EngramLM, tokens: np.ndarray, config: TrainConfig, device: torch.device, control: Control
) -> float:
    """`engram.train.evaluate` with this control's rows; identical to it for content addressing."""
    if control.addressing == "hash" or model.spec is None:
        return evaluate(model, tokens, config, device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    hasher = None  # the rows come from the control, not from the tokens
    with torch.no_grad():
        for raw in eval_batches(
            tokens, config.seq_len, config.batch_size, hasher, max_tokens=config.eval_tokens
        ):
            ids, targets, rows = to_device(control.address(raw, model.spec, EVAL_STREAM), device)
            with autocast_for(device, config.precision):
                logits = model(ids, rows=rows)
            total += float(
                F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
            )
            count += targets.numel()
    model.train(was_training)
    return total / count


class ControlRun(Run):
    """A training run under a control: its rows replace the hashed ones, in training and in
    validation; the loop is `engram.train.train`'s."""

    def __init__(self, config: TrainConfig, control: Control) -> None:
        control.validate()
        super().__init__(config)
        self.control = control
        control.prepare(self.model)
        self.loader.close()  # never iterated: rebuilt with the hasher this control needs
        hasher = self.model.hasher if control.reads_hash else None
        self.loader = PackedLoader(
            self.train_tokens, config.seq_len, config.batch_size, hasher, seed=config.seed
        )
        (self.dir / "control.json").write_text(json.dumps(control.__dict__, indent=2))

    @property
    def label(self) -> str:
        return f"{self.control.name} (seed {self.config.seed})"

    def transform(self, batch: Batch) -> Batch:
        return self.control.address(batch, self.spec, TRAIN_STREAM)

    def evaluate_val(self) -> float:
        return evaluate_control(self.model, self.val_tokens, self.config, self.device, self.control)


def train_control(config: TrainConfig, control: Control) -> dict[str, Any]:
    """Train one control arm like `engram.train.train`; returns the same summary."""
    return train(config, run=ControlRun(config, control))


# ---- evaluation-time controls --------------------------------------------------------------------
def shuffled_table(weight: torch.Tensor, spec: HashSpec, layer: int, seed: int) -> torch.Tensor:
    """The table with its rows permuted within each head (fixed `seed`).

    Every address still reads a row of its own head, with that head's row statistics, but no
    longer the row its N-gram trained: only the N-gram -> row content is destroyed.
    """
    rng = np.random.default_rng([seed, layer])
    offsets, primes = spec.layer_offsets(layer), spec.layer_primes(layer)
    perm = np.concatenate([o + rng.permutation(p) for o, p in zip(offsets, primes, strict=True)])
    return weight[torch.from_numpy(perm).to(weight.device)]


@contextmanager
def table_variant(model: EngramLM, variant: str, seed: int = 0) -> Iterator[bool]:
    """Temporarily set the tables to a variant; yields whether Engram is switched off.

    Variants: "on" (as trained), "off" (Engram skipped), "shuffled" (rows permuted within each
    head), "zeroed" (every row zero, the rest of Engram as trained).
    """
    if variant not in ("on", "off", "shuffled", "zeroed"):
        raise ValueError(f"variant={variant!r} must be on, off, shuffled or zeroed")
    saved = [e.table.weight.detach().clone() for e in model.engram_layers]
    try:
        with torch.no_grad():
            for e in model.engram_layers:
                if variant == "shuffled":
                    e.table.weight.copy_(
                        shuffled_table(e.table.weight, model.spec, e.layer_id, seed)
                    )
                elif variant == "zeroed":
                    e.table.weight.zero_()
        yield variant == "off"
    finally:
        with torch.no_grad():
            for e, w in zip(model.engram_layers, saved, strict=True):
                e.table.weight.copy_(w)


@torch.no_grad()
def target_losses(
    model: EngramLM,
    tokens: np.ndarray,
    config: TrainConfig,
    device: torch.device,
    variant: str,
    seed: int = 0,
) -> np.ndarray:
    """Cross-entropy of predicting each token [N] (NaN where never a target), for one variant.

    Windows as `engram.train.evaluate` (window i = tokens[i*T : i*T+T+1], fresh context at each
    start), so the mean over the scored tokens equals `evaluate` over `tokens`. `seed` picks the
    permutation of the "shuffled" variant.
    """
    was_training = model.training
    model.eval()
    out = np.full(len(tokens), np.nan)
    position = 0
    with table_variant(model, variant, seed) as off:
        for batch in eval_batches(tokens, config.seq_len, config.batch_size, model.hasher):
            ids, targets, rows = to_device(batch, device)
            B, T = targets.shape
            with autocast_for(device, config.precision):
                logits = model(ids, rows=None if off else rows, engram_off=off)  # [B, T, V]
            loss = F.cross_entropy(
                logits.float().flatten(0, 1), targets.flatten(), reduction="none"
            )
            # Window b predicts tokens position + b*T + 1 .. position + b*T + T.
            out[position + 1 : position + 1 + B * T] = loss.cpu().numpy()
            position += B * T
    model.train(was_training)
    return out


def unigram_losses(train_tokens: np.ndarray, tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """-log p(token) [N] under the train split's add-one unigram: a context-free baseline."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size)
    probs = (counts + 1.0) / (counts.sum() + vocab_size)
    return -np.log(probs[np.asarray(tokens, dtype=np.int64)])


def read_control(run_dir: Path) -> str:
    """The control a run folder was trained under (a run without control.json is a plain run)."""
    path = Path(run_dir) / "control.json"
    return json.loads(path.read_text())["name"] if path.is_file() else "reference"


__all__ = [
    "CONTROLS",
    "Control",
    "constant_rows",
    "evaluate_control",
    "random_rows",
    "read_control",
    "shuffled_table",
    "table_variant",
    "target_losses",
    "train_control",
    "unigram_losses",
]
