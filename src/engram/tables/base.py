"""The row-store interface: one table of float32 rows, wherever it lives.

An Engram table is `num_rows` rows of `dim` values. A `RowStore` keeps each row together with
its optimiser state (Adam's two moments, Adagrad's accumulator) as one *record* of `width` floats:

    record = [ value (dim) | state slot 1 | state slot 2 | ... ]          TableLayout.columns(slot)

so that the state lives in the same tier as the row: one disk seek, one cache slot and one
write-back carry both. Every access names rows by *sorted unique* int64 ids, as the lookup
produces them after deduplication; this keeps disk access sequential and makes "each row once"
an invariant the stores can rely on. Misuse (unsorted or repeated ids, ids out of range, a
wrong dtype or shape) raises ValueError naming the bad value; the check of an id tensor reads
its min and max, a host sync on an accelerator, which the deduplication has already paid.

Statistics count calls, rows and payload bytes moved (`bytes_read` is rows x slot width x 4),
and for caches hits, misses, evictions and write-backs. `read` and `write` may run from several
threads at once on *disjoint* rows (the hot-row cache relies on this for its off-lock loads).
Legend: U rows in one call, r row dim, W record width.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from engram.rowinit import RowInit

VALUE = "value"  # the row itself, the first `dim` columns of a record
ALL = "all"  # the whole record: value and every state slot
BYTES_PER_FLOAT = 4


@dataclass(frozen=True)
class TableLayout:
    """Shape of one table's records: num_rows x (dim + state widths) float32."""

    num_rows: int
    dim: int
    state: tuple[tuple[str, int], ...] = field(default=())  # (slot name, width) after the value

    def validate(self) -> None:
        if self.num_rows < 1 or self.dim < 1:
            raise ValueError(f"num_rows={self.num_rows} and dim={self.dim} must be >= 1")
        names = [name for name, _ in self.state]
        if len(set(names)) != len(names) or {VALUE, ALL} & set(names):
            raise ValueError(f"state slot names {names} must be unique and not {VALUE!r}/{ALL!r}")
        for name, width in self.state:
            if width < 1:
                raise ValueError(f"state slot {name!r} has width {width}; must be >= 1")

    @property
    def width(self) -> int:
        """W: floats per record."""
        return self.dim + sum(width for _, width in self.state)

    @property
    def nbytes(self) -> int:
        """Logical size of the whole table with its state."""
        return self.num_rows * self.width * BYTES_PER_FLOAT

    def columns(self, slot: str) -> slice:
        """The record columns of `slot` (VALUE, ALL or a state slot name)."""
        if slot == VALUE:
            return slice(0, self.dim)
        if slot == ALL:
            return slice(0, self.width)
        start = self.dim
        for name, width in self.state:
            if name == slot:
                return slice(start, start + width)
            start += width
        known = [VALUE, ALL, *(name for name, _ in self.state)]
        raise ValueError(f"slot={slot!r} is not one of {known}")

    def to_json(self) -> dict[str, Any]:
        return {"num_rows": self.num_rows, "dim": self.dim, "state": [list(s) for s in self.state]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TableLayout:
        state = tuple((str(name), int(width)) for name, width in data.get("state", []))
        layout = cls(num_rows=int(data["num_rows"]), dim=int(data["dim"]), state=state)
        layout.validate()
        return layout


@dataclass
class StoreStats:
    """Counters of one store since construction (or `reset_stats`)."""

    read_calls: int = 0
    rows_read: int = 0
    bytes_read: int = 0
    write_calls: int = 0
    rows_written: int = 0
    bytes_written: int = 0
    hits: int = 0  # caches: requested rows already resident
    misses: int = 0  # caches: rows loaded from the slower store
    evictions: int = 0  # caches: resident rows dropped to make room
    writebacks: int = 0  # caches: dirty rows written to the slower store

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "hit_rate": self.hit_rate}


def check_rows(rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Validate sorted unique int64 row ids [U] in [0, num_rows); returns them unchanged."""
    if not isinstance(rows, torch.Tensor) or rows.dtype != torch.int64 or rows.ndim != 1:
        got = f"{rows.dtype} {list(rows.shape)}" if isinstance(rows, torch.Tensor) else type(rows)
        raise ValueError(f"rows must be a 1-D int64 tensor, got {got}")
    if rows.numel() == 0:
        return rows
    if rows.device.type == "cpu":  # numpy: a decode step's handful of ids in ~5 us, not ~20
        ids = rows.numpy()
        unordered = bool(ids.size > 1 and not (ids[1:] > ids[:-1]).all())
        # Sorted ids have their extremes at the ends; unsorted ones get a full scan.
        low, high = (int(ids.min()), int(ids.max())) if unordered else (int(ids[0]), int(ids[-1]))
    else:  # one host transfer for all three checks: a single sync with the accelerator
        disorder = (rows[1:] <= rows[:-1]).sum()
        low, high, unordered = torch.stack([rows.min(), rows.max(), disorder]).tolist()
    if low < 0 or high >= num_rows:
        bad = low if low < 0 else high
        raise ValueError(f"row id {bad} is out of range [0, {num_rows})")
    if unordered:
        at = int(torch.nonzero(rows[1:] <= rows[:-1])[0, 0])
        raise ValueError(
            f"rows must be sorted and unique: id {int(rows[at + 1])} follows {int(rows[at])}"
        )
    return rows


def initial_records(layout: TableLayout, init: RowInit, ids: np.ndarray) -> np.ndarray:
    """Full records [U, W] of rows never written: the init value, then zero optimiser state."""
    out = np.zeros((ids.size, layout.width), dtype=np.float32)
    out[:, : layout.dim] = init(torch.from_numpy(ids), layout.dim).numpy()
    return out


def check_values(values: torch.Tensor, count: int, width: int) -> None:
    """Validate float32 values [count, width]."""
    if not isinstance(values, torch.Tensor) or values.dtype != torch.float32:
        got = values.dtype if isinstance(values, torch.Tensor) else type(values)
        raise ValueError(f"values must be a float32 tensor, got {got}")
    if tuple(values.shape) != (count, width):
        raise ValueError(f"values must be [{count}, {width}], got {list(values.shape)}")


class RowStore(ABC):
    """A table of `layout.num_rows` float32 records. See the module docstring.

    Subclasses implement `_gather`/`_scatter` (ids already validated, values already checked),
    `save`/`load` (a checkpoint file of the whole table) and, where they buffer, `flush`.
    """

    kind: ClassVar[str]

    def __init__(self, layout: TableLayout, init: RowInit, device: torch.device) -> None:
        layout.validate()
        init.validate()
        self.layout, self.init, self.device = layout, init, torch.device(device)
        self._stats = StoreStats()
        self._stats_lock = threading.Lock()  # counters are updated from prefetch threads too
        self._closed = False

    @property
    def num_rows(self) -> int:
        return self.layout.num_rows

    @property
    def dim(self) -> int:
        return self.layout.dim

    @property
    def nbytes(self) -> int:
        """Logical bytes of the table and its optimiser state."""
        return self.layout.nbytes

    # ---- rows ----------------------------------------------------------------------------------
    def read(self, rows: torch.Tensor, slot: str = VALUE) -> torch.Tensor:
        """The `slot` columns of sorted unique `rows` [U] -> [U, width of slot] on `self.device`."""
        self._check_open()
        check_rows(rows, self.num_rows)
        cols = self.layout.columns(slot)
        if rows.numel() == 0:
            return torch.empty(0, cols.stop - cols.start, dtype=torch.float32, device=self.device)
        out = self._gather(rows, slot)
        self._count(read_calls=1, rows_read=rows.numel(), bytes_read=out.numel() * BYTES_PER_FLOAT)
        return out

    def read_to(self, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The values of sorted unique `rows` [U] on `device` [U, r] (asynchronously from pinned
        memory). A store that holds fewer bytes per row than float32 moves those instead."""
        return self.read(rows).to(device, non_blocking=True)

    def write(self, rows: torch.Tensor, values: torch.Tensor, slot: str = VALUE) -> None:
        """Overwrite the `slot` columns of sorted unique `rows` [U] with values [U, width]."""
        self._check_open()
        check_rows(rows, self.num_rows)
        cols = self.layout.columns(slot)
        check_values(values, rows.numel(), cols.stop - cols.start)
        if rows.numel() == 0:
            return
        self._scatter(rows, slot, values.detach())
        moved = values.numel() * BYTES_PER_FLOAT
        self._count(write_calls=1, rows_written=rows.numel(), bytes_written=moved)

    @abstractmethod
    def _gather(self, rows: torch.Tensor, slot: str) -> torch.Tensor: ...

    @abstractmethod
    def _scatter(self, rows: torch.Tensor, slot: str, values: torch.Tensor) -> None: ...

    # ---- statistics ----------------------------------------------------------------------------
    @property
    def stats(self) -> StoreStats:
        """A snapshot of the counters."""
        with self._stats_lock:
            return replace(self._stats)

    def reset_stats(self) -> None:
        with self._stats_lock:
            self._stats = StoreStats()

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, delta in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + delta)

    # ---- lifetime and checkpoints ----------------------------------------------------------------
    def flush(self) -> None:  # noqa: B027 - in-memory stores have nothing to flush
        """Make every write durable in this store's own tier (no-op for in-memory stores)."""

    def close(self) -> None:
        """Flush and release resources; the store cannot be used afterwards."""
        if not self._closed:
            self.flush()
            self._closed = True

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write the whole table (values and state) to the new file `path`, durably (fsync)."""

    @abstractmethod
    def load(self, path: Path) -> None:
        """Replace the whole table by the one `save` wrote to `path` (same layout)."""

    def describe(self) -> dict[str, Any]:
        """JSON-able identity of the table, for manifests."""
        return {"kind": self.kind, "layout": self.layout.to_json(), "init": self.init.to_json()}

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{type(self).__name__} is closed")

    def __enter__(self) -> RowStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        L = self.layout
        return f"{type(self).__name__}(rows={L.num_rows}, dim={L.dim}, width={L.width})"


def check_layout(expected: TableLayout, found: dict[str, Any], where: object) -> None:
    """ValueError unless a saved table's layout (JSON) equals `expected`."""
    got = TableLayout.from_json(found)
    if got != expected:
        raise ValueError(f"{where} holds a table of layout {got}, expected {expected}")
