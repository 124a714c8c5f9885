"""Engram tables beyond accelerator memory: one row-store interface, several placements.

The storage layer. A table is a `RowStore` of float32 records
(row value + optimiser state); placements are `DeviceStore`, `HostStore` (pinned), `DiskStore`
(a sparse memory-mapped file) and `CachedStore` (a bounded hot-row cache in front of any of
them). `lookup` reads a batch's unique rows differentiably; `RowAdam` / `RowAdagrad` update the
touched rows in place in their store; `write_tables` / `restore_tables` put them in a checkpoint
(`engram.checkpoint` commits it atomically).
`TablePlan` says where each of a model's tables lives and `PlacedTables` applies it to the
model; `QuantizedStore` serves int8/fp8 rows for inference.
See docs/tables.md. The model core never imports this package: placement is applied from a plan.
"""

from engram.rowinit import RowInit
from engram.tables.base import ALL, VALUE, RowStore, StoreStats, TableLayout
from engram.tables.cache import CachedStore
from engram.tables.lookup import Lookup, lookup
from engram.tables.placed import PlacedTables, restore_tables, write_tables
from engram.tables.plan import LayerPlacement, TablePlacement, TablePlan
from engram.tables.quant import QuantizedStore
from engram.tables.row_optim import RowAdagrad, RowAdam, RowOptimizer, make_row_optimizer
from engram.tables.stores import DeviceStore, DiskStore, HostStore

__all__ = [
    "ALL",
    "VALUE",
    "CachedStore",
    "DeviceStore",
    "DiskStore",
    "HostStore",
    "LayerPlacement",
    "Lookup",
    "PlacedTables",
    "QuantizedStore",
    "RowAdagrad",
    "RowAdam",
    "RowInit",
    "RowOptimizer",
    "RowStore",
    "StoreStats",
    "TableLayout",
    "TablePlacement",
    "TablePlan",
    "lookup",
    "make_row_optimizer",
    "restore_tables",
    "write_tables",
]
