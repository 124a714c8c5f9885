"""Row-wise sparse optimisers whose state lives with the rows, in the rows' own store.

A step reads the *records* of the rows a batch touched (value and state, one read), updates them
with the gradient of those rows (summed over duplicates by the lookup), and writes the records
back (one write). Untouched rows and their state are never read or written: with a table on
disk the cost of a step is the batch's rows, not the table. The store must be built with the
optimiser's state slots: `TableLayout(num_rows, dim, optimizer.state_slots(dim))`.

The paper trains the tables with Adam at 5x the base learning rate and no weight decay (section
4); the caller passes `lr` = base rate x multiplier x schedule factor at every step, and there
is no weight decay here at all. Two optimisers, selectable per table (`make_row_optimizer`):

`RowAdam` (m and v per element). Bias correction uses the table's *global* step count t (the
number of `step` calls), exactly as `torch.optim.SparseAdam`, and its arithmetic follows
SparseAdam's operation for operation:

    m += (1 - b1) (g - m)             v += (1 - b2) (g^2 - v)          (touched rows only)
    p -= lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)

so a store with RowAdam reproduces `nn.Embedding(sparse=True)` + SparseAdam bit for bit in
fp32 (tested), and moving a table off the accelerator does not change training. Why not a
per-row count (the "correct" debiasing of a row's first updates)? It would need one more float
per row, and it would change the dynamics the existing runs were trained with: with the global
count, a row first touched at a late step gets an un-debiased first update of size about
lr (1 - b1) / sqrt(1 - b2) (0.45 lr with betas (0.9, 0.95)) rather than lr, a milder start for
rare N-grams. That is torch's lazy-Adam behaviour, and we keep it on purpose.

`RowAdagrad` (one accumulator per row, the standard choice for huge embedding tables, as in
FBGEMM's row-wise Adagrad): the accumulator grows by the *mean* of g^2 over the row, so a row's
step matches element-wise Adagrad's scale while costing 1 float of state instead of dim:

    a += mean_j(g_j^2)                p -= lr g / (sqrt(a) + eps)       eps = 1e-10 (torch's)

No bias correction is involved. Legend: U touched rows, r row dim.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from engram.tables.base import ALL, RowStore, TableLayout, check_rows, check_values


def adam_rows(
    p: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    grads: torch.Tensor,
    betas: tuple[float, float],
    eps: float,
    lr: float,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """New (value, m, v) [U, r] of U rows from their old ones and summed gradients at `step`.

    The operations (and their order) of torch.optim._functional.sparse_adam, so that the fp32
    results agree bit for bit with nn.Embedding(sparse=True) + SparseAdam.
    """
    b1, b2 = betas
    m_new = grads.sub(m).mul_(1 - b1).add_(m)  # m + (1 - b1)(g - m)
    v_new = grads.pow(2).sub_(v).mul_(1 - b2).add_(v)  # v + (1 - b2)(g^2 - v)
    denom = v_new.sqrt().add_(eps)
    step_size = lr * math.sqrt(1 - b2**step) / (1 - b1**step)
    return p.add(m_new.div(denom).mul_(-step_size)), m_new, v_new


class RowOptimizer(ABC):
    """Updates the touched rows of a store from their gradients: `step(store, rows, grads, lr)`."""

    kind: ClassVar[str]

    def __init__(self) -> None:
        self.steps = 0  # step calls so far: Adam's global bias-correction count

    @abstractmethod
    def state_slots(self, dim: int) -> tuple[tuple[str, int], ...]:
        """The (name, width) state slots each row needs, for `TableLayout.state`."""

    def layout(self, num_rows: int, dim: int) -> TableLayout:
        """The layout of a table this optimiser can update."""
        return TableLayout(num_rows, dim, self.state_slots(dim))

    def step(self, store: RowStore, rows: torch.Tensor, grads: torch.Tensor, lr: float) -> None:
        """Update sorted unique `rows` [U] of `store` from their summed gradients [U, r].

        `lr` is the full rate of this step (base x table multiplier x schedule). The arithmetic
        runs on the gradients' device; the records travel there and back.
        """
        # lr = 0 is a step all the same (moments and count advance), as in torch's Adam: a
        # schedule may start from zero (transformers' warm-up does).
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr={lr!r} must be a finite number >= 0")
        expected = self.state_slots(store.dim)
        if store.layout.state != expected:
            raise ValueError(
                f"{type(self).__name__} needs state slots {expected}, the store has "
                f"{store.layout.state}: build it with optimizer.layout(num_rows, dim)"
            )
        check_rows(rows, store.num_rows)  # before counting the step: a bad call changes nothing
        check_values(grads, rows.numel(), store.dim)
        self.steps += 1  # counted even for an empty batch, as SparseAdam counts its steps
        if rows.numel() == 0:
            return
        records = store.read(rows, ALL).to(grads.device)  # [U, W]
        store.write(rows, self._update(records, grads, store.dim, float(lr)), ALL)

    @abstractmethod
    def _update(
        self, records: torch.Tensor, grads: torch.Tensor, dim: int, lr: float
    ) -> torch.Tensor:
        """New records [U, W] from old records [U, W] and gradients [U, r]."""

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "steps": self.steps, **self._hyper()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step count (hyper-parameters come from the config, and must agree)."""
        if state.get("kind") != self.kind:
            raise ValueError(f"state of a {state.get('kind')!r} optimiser, this is {self.kind!r}")
        for name, value in self._hyper().items():
            if state.get(name) != value:
                raise ValueError(f"saved {name}={state.get(name)!r}, this optimiser has {value!r}")
        steps = state.get("steps")
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps={steps!r} must be an int >= 0")
        self.steps = steps

    @abstractmethod
    def _hyper(self) -> dict[str, Any]: ...


class RowAdam(RowOptimizer):
    """Adam with m and v per element, touched rows only; SparseAdam's global-step correction."""

    kind = "adam"

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__()
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1) or not eps > 0:
            raise ValueError(f"betas={betas} must lie in [0, 1) and eps={eps} be > 0")
        self.betas, self.eps = (float(b1), float(b2)), float(eps)

    def state_slots(self, dim: int) -> tuple[tuple[str, int], ...]:
        return (("exp_avg", dim), ("exp_avg_sq", dim))

    def _update(
        self, records: torch.Tensor, grads: torch.Tensor, dim: int, lr: float
    ) -> torch.Tensor:
        p, m, v = records[:, :dim], records[:, dim : 2 * dim], records[:, 2 * dim :]
        return torch.cat(adam_rows(p, m, v, grads, self.betas, self.eps, lr, self.steps), dim=1)

    def _hyper(self) -> dict[str, Any]:
        return {"betas": list(self.betas), "eps": self.eps}


class RowAdagrad(RowOptimizer):
    """Row-wise Adagrad: one accumulator per row, grown by the row's mean squared gradient."""

    kind = "adagrad"

    def __init__(self, eps: float = 1e-10) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps={eps} must be > 0")
        self.eps = float(eps)

    def state_slots(self, dim: int) -> tuple[tuple[str, int], ...]:
        return (("sum", 1),)

    def _update(
        self, records: torch.Tensor, grads: torch.Tensor, dim: int, lr: float
    ) -> torch.Tensor:
        p, acc = records[:, :dim], records[:, dim : dim + 1]
        acc_new = acc + grads.pow(2).mean(dim=1, keepdim=True)  # [U, 1]
        p_new = p - lr * grads / (acc_new.sqrt() + self.eps)
        return torch.cat([p_new, acc_new], dim=1)

    def _hyper(self) -> dict[str, Any]:
        return {"eps": self.eps}


ROW_OPTIMIZERS: dict[str, type[RowOptimizer]] = {"adam": RowAdam, "adagrad": RowAdagrad}


def make_row_optimizer(kind: str, **hyper: Any) -> RowOptimizer:
    """A row optimiser by name ("adam" or "adagrad"), e.g. from a per-table config value."""
    if kind not in ROW_OPTIMIZERS:
        raise ValueError(f"row optimiser {kind!r} is not one of {sorted(ROW_OPTIMIZERS)}")
    return ROW_OPTIMIZERS[kind](**hyper)
