"""What the table tests share: the placements, one deterministic init, a store of each kind,
and an exact comparison."""

from __future__ import annotations

from pathlib import Path

import torch

from engram.rowinit import RowInit
from engram.tables.base import RowStore, TableLayout
from engram.tables.cache import CachedStore
from engram.tables.stores import DeviceStore, DiskStore, HostStore

INIT = RowInit(seed=7, table_id=1, std=1.0)
PLACEMENTS = ["device", "host", "disk", "cached"]


def make_store(kind: str, layout: TableLayout, path: Path, capacity: int = 8) -> RowStore:
    if kind == "device":
        return DeviceStore(layout, INIT, "cpu")
    if kind == "host":
        return HostStore(layout, INIT)
    path.mkdir(parents=True, exist_ok=True)
    disk = DiskStore.create(path / f"{kind}.table", layout, INIT)
    return disk if kind == "disk" else CachedStore(disk, capacity)


def ids(*rows: int) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    diff = (a.double() - b.double()).abs()
    assert torch.equal(a, b), f"max diff {diff.max():.3g}, mean {diff.mean():.3g}"
