"""A model's Engram tables, placed as its `TablePlan` says: stores, row optimisers, prefetch.

`PlacedTables(model, plan, folder, device)` walks `model.engram_layers`. A table whose placement
is `embedded` (device + adam) stays the model's nn.Embedding and is trained by the torch
optimiser as before. Every other table gets a `RowStore` (device, host or disk, optionally
behind a hot-row cache) and a row-wise optimiser, and the module reads it through a row source:

    forward   HashedMemory.lookup(rows) -> source(rows, offsets) -> tables.lookup(store, ...)
              the Lookup (unique rows, their values as a leaf) is kept until the step
    backward  autograd fills the leaf's gradient: one summed gradient per unique row
    step      RowAdam / RowAdagrad update those rows and their state in the store

So training with a table on disk runs the same arithmetic as training it on the device (tested
bit for bit on fp32). The tables are named `layer{id}` in checkpoints and statistics.

Prefetch (`prefetched(batches)`): a thread takes batch n+1 from the loader and pins its rows in
every cached table (loading misses from host or disk) while step n computes; the trainer
releases a batch's pins after its optimiser step, and only then may the thread pin the batch
after next. So at most two batches are pinned at once (the one training and the next), and a
cache must hold their rows.

Fetch ahead (`fetch_ahead(model)`): the model hands each forward's rows of every layer to a
background thread as soon as it has hashed them, before its first layer runs. The thread reads
them (from the cache, loading misses) and, on CUDA, starts their copy to the device on a side
stream; a layer's row source waits only for its own table's fetch, and the compute stream only
for its copy (`engram.tables.lookup.fetch`/`finish`). So a table's rows arrive while the layers
before it compute (the paper's host-offload overlap), in inference and, on an accelerator, in
training (where the batch prefetch above has already made a cache's rows resident). Forwards of
fewer than `PREFETCH_MIN_LOOKUPS` lookups (decode steps) read in the layer: for a handful of
rows the hand-off costs more than it hides.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engram.files import remove_later, sweep_trash
from engram.module import HashedMemory
from engram.tables.base import RowStore, TableLayout
from engram.tables.cache import CachedStore
from engram.tables.lookup import Fetched, Lookup, fetch, finish, global_ids, lookup
from engram.tables.optim import RowOptimizer, make_row_optimizer
from engram.tables.packed import PackedStore, is_packed
from engram.tables.persist import restore_tables, write_tables
from engram.tables.plan import TablePlacement, TablePlan
from engram.tables.stores import DeviceStore, DiskStore, HostStore

# Below this many lookups in a forward (B x T x heads) a table is not prefetched: handing a
# decode step's handful of rows to a thread cost 0.6 ms against 0.3 ms for reading them
# through the cache directly (batch 1, 8 heads, this project's CPU).
PREFETCH_MIN_LOOKUPS = 1024
_EMBED_CHUNK = 1 << 16  # rows read at a time when a placed table becomes an embedding again


def table_name(layer: int) -> str:
    return f"layer{layer}"


@dataclass
class PlacedTable:
    """One table held outside the model: its memory module, store, optimiser and pending reads."""

    memory: HashedMemory
    placement: TablePlacement
    store: RowStore
    optimizer: RowOptimizer
    pending: list[Lookup] = field(default_factory=list)
    inflight: Future | None = None  # fetch ahead: this forward's rows, read (a `Fetched`)

    @property
    def prefetches(self) -> bool:
        """Whether rows are pinned ahead of use (a cache in front, and the plan asks for it)."""
        return isinstance(self.store, CachedStore) and self.placement.prefetch

    def unique_ids(self, rows: dict[int, torch.Tensor]) -> torch.Tensor:
        """The sorted global ids [U] this table reads for a forward's `rows` (all layers)."""
        return torch.unique(global_ids(rows[self.memory.layer_id].cpu(), self.memory.offsets))

    def read(self, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The row source installed in the module: e [B, T, D] for rows [B, T, H]."""
        fetched = self.settle()
        if fetched is None:
            looked = lookup(self.store, rows, offsets, device=rows.device)
        elif fetched.inverse.shape != rows.shape:  # the hook always sees this forward's rows
            raise RuntimeError(
                f"rows fetched ahead for {list(fetched.inverse.shape)}, read for {list(rows.shape)}"
            )
        else:
            looked = finish(fetched)
        if looked.values.requires_grad:  # a training forward: keep it for the optimiser step
            self.pending.append(looked)
        return looked.out

    def settle(self) -> Fetched | None:
        """Wait for this table's fetch ahead, if any, and take it."""
        inflight, self.inflight = self.inflight, None
        return inflight.result() if inflight is not None else None

    def step(self, lr: float) -> None:
        """Update the rows read since the last step from their gradients, then forget them."""
        grads = [(look.rows, look.values.grad) for look in self.pending]
        self.pending.clear()
        grads = [(r, g) for r, g in grads if g is not None]
        if not grads:  # nothing reached the table (as SparseAdam skips a parameter without grad)
            return
        rows, grad = grads[0] if len(grads) == 1 else _merge(grads)
        self.optimizer.step(self.store, rows, grad, lr)


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Several lookups of one step (e.g. gradient accumulation): one gradient per unique row."""
    rows = torch.cat([r.cpu() for r, _ in parts])  # fetched ahead (CPU) or not (the ids' device)
    grads = torch.cat([g for _, g in parts])
    uniq, inverse = torch.unique(rows, sorted=True, return_inverse=True)
    out = grads.new_zeros(uniq.numel(), grads.shape[1])
    out.index_add_(0, inverse.to(grads.device), grads)
    return uniq, out


class PlacedTables:
    """Every non-embedded table of `model`, placed by `plan`; `folder` holds disk tables.

    `read_only`: `folder` is a checkpoint's `tables/` (for inference): its disk tables are
    mapped read-only where they lie instead of being copied, and `restore` leaves them be.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        plan: TablePlan,
        folder: str | Path,
        device: str | torch.device = "cpu",
        betas: tuple[float, float] = (0.9, 0.999),
        fresh: bool = True,
        read_only: bool = False,
    ) -> None:
        plan.validate()
        memories: list[HashedMemory] = list(getattr(model, "engram_layers", []))
        plan.check_layers([m.layer_id for m in memories])
        self.plan, self.folder, self.device = plan, Path(folder), torch.device(device)
        self.read_only = read_only
        self.in_place: set[str] = set()  # tables read from `folder` where they lie
        self.tables: dict[str, PlacedTable] = {}
        try:
            for memory in memories:
                placement = plan.for_layer(memory.layer_id)
                if placement.embedded:
                    if memory.table is not None and memory.table.weight.is_meta:
                        memory.materialize_table()
                    continue
                self._place(memory, placement, betas, fresh)
        except BaseException:
            self.close()
            raise

    def _place(
        self, memory: HashedMemory, placement: TablePlacement, betas: tuple, fresh: bool
    ) -> None:
        name = table_name(memory.layer_id)
        kind = placement.optimizer
        optimizer = make_row_optimizer(kind, **({"betas": betas} if kind == "adam" else {}))
        layout = optimizer.layout(memory.spec.layer_rows(memory.layer_id), memory.spec.row_dim)
        store = self._store(name, placement, layout, memory, fresh)
        if placement.cache_rows:
            store = CachedStore(store, capacity=min(placement.cache_rows, layout.num_rows))
        if memory.table is not None and not memory.table.weight.is_meta:
            # A model built with its table (e.g. a trained one being converted): keep its rows.
            every = torch.arange(layout.num_rows, dtype=torch.int64)
            store.write(every, memory.table.weight.detach().float().cpu())
        table = PlacedTable(memory, placement, store, optimizer)
        memory.use_row_source(table.read)
        self.tables[name] = table

    def _store(self, name, placement, layout, memory, fresh: bool) -> RowStore:
        if placement.placement == "device":
            return DeviceStore(layout, memory.init, self.device)
        if placement.placement == "host":
            return HostStore(layout, memory.init)
        if self.read_only:  # the checkpoint's own file: nothing copied, nothing written
            self.in_place.add(name)
            return self._open(self.folder / f"{name}.table", name, layout, memory, True)
        folder = self.folder
        if placement.path:  # a shared fast drive: one subfolder per run, so runs never collide
            key = hashlib.sha256(str(self.folder.resolve()).encode()).hexdigest()[:12]
            folder = Path(placement.path) / f"{self.folder.parent.name}-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.table"
        if path.exists() and not fresh:  # resumed: the checkpoint's rows are restored into it
            return self._open(path, name, layout, memory, False)
        sweep_trash(folder)
        remove_later(path)  # the live copy of an earlier run: checkpoints hold theirs
        return DiskStore.create(path, layout, memory.init)

    @staticmethod
    def _open(
        path: Path, name: str, layout: TableLayout, memory: HashedMemory, read_only: bool
    ) -> RowStore:
        if not path.is_file():
            raise ValueError(f"{path} is missing: no file for the {name} disk table")
        if read_only and is_packed(path):  # a checkpoint's written rows, served where they lie
            store: RowStore = PackedStore(path)
        else:  # a live table (resume), or a checkpoint from before packing
            store = DiskStore(path, read_only=read_only)
        if store.layout != layout or store.init != memory.init:
            store.close()
            raise ValueError(f"{path} does not hold this model's {name} table")
        return store

    # ---- training ----------------------------------------------------------------------------
    def __bool__(self) -> bool:
        return bool(self.tables)

    def step(self, lr: float) -> None:
        """The row optimisers' step at the tables' full rate (base x multiplier x schedule)."""
        for table in self.tables.values():
            table.step(lr)

    def zero_grad(self) -> None:
        for table in self.tables.values():
            table.pending.clear()

    # ---- prefetch ----------------------------------------------------------------------------
    def pin(self, rows: dict[int, torch.Tensor] | None) -> list[tuple[CachedStore, torch.Tensor]]:
        """Pin a batch's rows in every cached, prefetching table; returns what to `release`."""
        pinned = []
        for table in self._prefetching() if rows is not None else []:
            ids = table.unique_ids(rows)
            table.store.pin(ids)
            pinned.append((table.store, ids))
        return pinned

    def _prefetching(self) -> list[PlacedTable]:
        return [t for t in self.tables.values() if t.prefetches]

    @staticmethod
    def release(pinned: list[tuple[CachedStore, torch.Tensor]]) -> None:
        for store, ids in pinned:
            store.unpin(ids)

    def prefetched(self, batches: Iterable) -> Iterator[tuple[Any, list]]:
        """(batch, pins) pairs, batch n+1 pinned in a background thread while n trains."""
        if not self._prefetching():
            yield from ((batch, []) for batch in batches)
            return
        ready: queue.Queue = queue.Queue()
        room = threading.Semaphore(1)  # batches pinned ahead of the one training: one
        stop = threading.Event()
        worker = threading.Thread(
            target=self._prefetch_loop, args=(iter(batches), ready, room, stop), daemon=True
        )
        worker.start()
        try:
            while True:
                item = ready.get()
                room.release()  # the worker may pin batch n+2 while n+1 trains
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    return
                yield item
        finally:
            stop.set()
            room.release()
            worker.join()
            while not ready.empty():  # a batch pinned but never trained: release it
                item = ready.get()
                if isinstance(item, tuple):
                    self.release(item[1])

    def fetch_ahead(self, model: torch.nn.Module, training: bool = False) -> None:
        """Read each forward's rows in a background thread before its layers run (see the
        module docstring); sets `model.row_prefetch`. Tables fetched: those behind a cache or
        off the compute device; with `training`, only the latter (the batch prefetch already
        pins a cache's rows, so on the CPU there is nothing left to hide)."""
        tables = [t for t in self.tables.values() if self._fetches(t, training)]
        if not tables:
            return
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-rows")
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

        def hook(rows: dict[int, torch.Tensor]) -> None:
            for table in tables:
                table.settle()  # a forward that never reached this table: drop its rows
                local = rows[table.memory.layer_id]
                if local.numel() < PREFETCH_MIN_LOOKUPS:
                    continue  # a decode step: the layer reads its few rows itself
                ids = global_ids(local.cpu(), table.memory.offsets)
                table.inflight = self._pool.submit(fetch, table.store, ids, self.device, stream)

        model.row_prefetch = hook

    def _fetches(self, table: PlacedTable, training: bool) -> bool:
        off_device = table.store.device != self.device
        return table.placement.prefetch and (off_device or (table.prefetches and not training))

    def _prefetch_loop(
        self,
        batches: Iterator,
        ready: queue.Queue,
        room: threading.Semaphore,
        stop: threading.Event,
    ) -> None:
        try:
            while True:
                room.acquire()
                if stop.is_set():
                    return
                batch = next(batches, None)
                if batch is None:
                    ready.put(None)
                    return
                ready.put((batch, self.pin(batch.rows)))
        except BaseException as e:  # handed to the consumer, which raises it
            ready.put(e)

    def embed(self, model: torch.nn.Module) -> None:
        """Hand every placed table back to its module as an nn.Embedding on the compute device
        (all rows read, a chunk at a time), for exports that keep tables as weights (the HF
        integration). ValueError if their values exceed the RAM available now."""
        need = sum(t.store.num_rows * t.store.dim * 4 for t in self.tables.values())
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if need > free:
            raise ValueError(
                f"the placed tables hold {need / 1e9:.1f} GB of values, more than the "
                f"{free / 1e9:.1f} GB of free RAM: they cannot become embeddings"
            )
        model.row_prefetch = None  # nothing is left to fetch ahead
        for table in self.tables.values():
            table.settle()
            weight = torch.empty(table.store.num_rows, table.store.dim)
            for start in range(0, table.store.num_rows, _EMBED_CHUNK):
                rows = torch.arange(start, min(start + _EMBED_CHUNK, table.store.num_rows))
                weight[start : start + rows.numel()] = table.store.read(rows).cpu()
            table.memory.use_table(weight.to(self.device))
            table.store.close()
        self.tables.clear()

    # ---- checkpoints, statistics ---------------------------------------------------------------
    def stores(self) -> dict[str, RowStore]:
        return {name: t.store for name, t in self.tables.items()}

    def write(self, folder: Path) -> dict[str, Any]:
        """Save every table into `folder` (inside a checkpoint being written); manifest entry."""
        folder.mkdir(parents=True, exist_ok=True)
        entries = write_tables(folder, self.stores())
        states = {name: t.optimizer.state_dict() for name, t in self.tables.items()}
        return {"entries": entries, "optimizers": states}

    def restore(self, folder: Path, manifest: dict[str, Any]) -> None:
        """Load every table and row-optimiser state from a checkpoint's `folder`."""
        if self.in_place and Path(folder).resolve() != self.folder.resolve():
            raise ValueError(f"tables {sorted(self.in_place)} read {self.folder}, not {folder}")
        stores = {n: s for n, s in self.stores().items() if n not in self.in_place}
        restore_tables(folder, stores, manifest["entries"])
        for name, table in self.tables.items():
            table.optimizer.load_state_dict(manifest["optimizers"][name])

    def stats(self) -> dict[str, dict[str, float]]:
        return {name: t.store.stats.as_dict() for name, t in self.tables.items()}

    def reset_stats(self) -> None:
        for table in self.tables.values():
            table.store.reset_stats()

    def describe(self) -> dict[str, Any]:
        return {name: t.store.describe() for name, t in self.tables.items()}

    def flush(self) -> None:
        for table in self.tables.values():
            table.store.flush()

    def close(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
        for table in getattr(self, "tables", {}).values():
            table.store.close()
