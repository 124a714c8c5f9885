"""A model's Engram tables, placed as its `TablePlan` says: stores, row optimisers, rows ahead.

`PlacedTables(model.engram_layers, plan, folder, device)` walks the model's memories. A table whose
placement is `embedded` (device + adam) stays the model's nn.Embedding and is trained by the
torch optimiser as before. Every other table gets a `RowStore` (device, host or disk, optionally
behind a hot-row cache) and a row-wise optimiser, and the module reads it through its
`PlacedTable`, installed as the module's row source. One training step, as the trainer runs it:

    pin_ahead(batch n+1)  a thread pins the next batch's rows in every cached table (loading
                          misses from host or disk) while this step computes
    fetch(rows)           tables off the compute device: a thread reads this forward's rows and,
                          on CUDA, copies them to the device on a side stream
    forward               HashedMemory.lookup(rows) -> PlacedTable.read -> the fetched rows, or
                          `tables.lookup(store, ...)`; the Lookup (unique rows, their values as a
                          leaf) is kept until the step
    backward              autograd fills the leaf's gradient: one summed gradient per unique row
    step(lr)              RowAdam / RowAdagrad update those rows and their state in the store
    release(pins)         the batch's rows may leave the cache

So training with a table on disk runs the same arithmetic as training it on the device (tested
bit for bit on fp32), and every table operation is started and awaited from the training loop
(where a collective would go). At most two batches are pinned at once (the one training and the
next), and a cache must hold their rows. The tables are named `layer{id}` in checkpoints and
statistics.

In inference the model hashes its own input, so `fetch_ahead(model)` registers a rows hook: the
fetch starts as soon as the model has hashed a forward, before its first layer runs, and a
table's rows arrive while the layers before it compute (the paper's host-offload overlap). A
layer's row source waits only for its own table's fetch, and the compute stream only for its
copy (`engram.tables.lookup.fetch`/`finish`). Forwards of fewer than `PREFETCH_MIN_LOOKUPS`
lookups (decode steps) read in the layer: for a handful of rows the hand-off costs more than it
hides.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.hooks import RemovableHandle

from engram.files import remove_later, sweep_trash
from engram.module import HashedMemory
from engram.rowinit import RowInit
from engram.tables.base import ALL, RowStore, TableLayout, check_layout
from engram.tables.cache import CachedStore
from engram.tables.lookup import Fetched, Lookup, fetch, finish, global_ids, lookup
from engram.tables.packed import PackedStore, is_packed
from engram.tables.plan import TablePlacement, TablePlan
from engram.tables.reshard import SavedTables, Target, open_joined, part_entry
from engram.tables.row_optim import RowOptimizer, make_row_optimizer
from engram.tables.sharded import RowShards, ShardGroup, rows_asked, sharded_lookup
from engram.tables.stores import DeviceStore, DiskStore, HostStore

if TYPE_CHECKING:
    from engram.model import EngramLM

# Below this many lookups in a forward (B x T x heads) a table is not prefetched: handing a
# decode step's handful of rows to a thread cost 0.6 ms against 0.3 ms for reading them
# through the cache directly (batch 1, 8 heads, this project's CPU).
PREFETCH_MIN_LOOKUPS = 1024
_EMBED_CHUNK = 1 << 16  # rows read at a time when a placed table becomes an embedding again


def table_name(layer: int) -> str:
    """How layer `layer`'s table is named in checkpoints, statistics and quantised folders."""
    return f"layer{layer}"


@dataclass
class PlacedTable:
    """One table held outside the model: its memory module, store, optimiser and pending reads."""

    memory: HashedMemory
    entry: TablePlacement  # the plan's entry for this table: where it lives, how it trains
    store: RowStore
    optimizer: RowOptimizer
    pending: list[Lookup] = field(default_factory=list)
    inflight: Future | None = None  # fetch ahead: this forward's rows, read (a `Fetched`)
    sharding: ShardGroup | None = None  # the store holds this rank's range of the rows only
    shards: RowShards | None = None

    @property
    def prefetches(self) -> bool:
        """Whether rows are pinned ahead of use (a cache in front, and the plan asks for it)."""
        return isinstance(self.store, CachedStore) and self.entry.prefetch

    def unique_ids(self, rows: dict[int, torch.Tensor]) -> torch.Tensor:
        """The sorted global ids [U] this table reads for a forward's `rows` (all layers)."""
        return torch.unique(global_ids(rows[self.memory.layer_id].cpu(), self.memory.offsets))

    def rows_to_pin(self, rows: dict[int, torch.Tensor]) -> torch.Tensor:
        """The store rows a forward of `rows` will read: for a shard, the local rows every rank
        asks of it (learnt by a collective, so called on the main thread by every rank)."""
        ids = self.unique_ids(rows)
        if self.shards is None:
            return ids
        return rows_asked(ids, self.shards, self.sharding.group)

    def read(self, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The row source installed in the module: e [B, T, D] for rows [B, T, H]."""
        fetched = self.settle()
        if self.shards is not None:  # the rows come from their owners (a collective)
            group = self.sharding.group
            looked = sharded_lookup(self.store, rows, offsets, self.shards, rows.device, group)
        elif fetched is None:
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
        if self.sharding is not None and self.sharding.grad_scale != 1.0:
            grad = grad * self.sharding.grad_scale
        self.optimizer.step(self.store, rows, grad, lr)


def _pin(wanted: list[tuple[CachedStore, torch.Tensor]]) -> list[tuple[CachedStore, torch.Tensor]]:
    for store, ids in wanted:
        store.pin(ids)
    return wanted


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
    `stores`: names of tables held in a row store even where the plan embeds them (device,
    adam), e.g. because the checkpoint being resumed saved them from stores.
    """

    def __init__(
        self,
        memories: Sequence[HashedMemory],
        plan: TablePlan,
        folder: str | Path,
        device: str | torch.device = "cpu",
        betas: tuple[float, float] = (0.9, 0.999),
        read_only: bool = False,
        sharding: ShardGroup | None = None,
        stores: Collection[str] = (),
    ) -> None:
        plan.validate()
        plan.check_layers([m.layer_id for m in memories])
        self.plan, self.folder, self.device = plan, Path(folder), torch.device(device)
        self.read_only, self.sharding = read_only, sharding
        self.in_place: set[str] = set()  # tables read from `folder` where they lie
        self.tables: dict[str, PlacedTable] = {}
        self._pins: ThreadPoolExecutor | None = None  # pins the next batch's rows
        self._fetches: ThreadPoolExecutor | None = None  # reads a forward's rows ahead
        self._fetch_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._hook: RemovableHandle | None = None
        try:
            for memory in memories:
                entry = plan.for_layer(memory.layer_id)
                # A shard is always a row store, and so is a table a checkpoint holds as one
                # (`stores`): RowAdam on a device store is SparseAdam's arithmetic bit for bit.
                as_store = sharding is not None or table_name(memory.layer_id) in stores
                if entry.embedded and not as_store:
                    if memory.table is not None and memory.table.weight.is_meta:
                        memory.materialize_table()
                    continue
                self._place(memory, entry, betas)
        except BaseException:
            self.close()
            raise

    def _place(self, memory: HashedMemory, entry: TablePlacement, betas: tuple) -> None:
        name = self.file_name(table_name(memory.layer_id))
        kind = entry.optimizer
        optimizer = make_row_optimizer(kind, **({"betas": betas} if kind == "adam" else {}))
        num_rows, start, shards = memory.spec.layer_rows(memory.layer_id), 0, None
        if self.sharding is not None:  # this rank's contiguous range of the rows
            shards = RowShards(num_rows, self.sharding.world)
            start, num_rows = shards.start(self.sharding.rank), shards.size(self.sharding.rank)
        layout = optimizer.layout(num_rows, memory.spec.row_dim)
        store = self._store(name, entry, layout, memory.init.shard(start))
        if entry.cache_rows:
            store = CachedStore(store, capacity=min(entry.cache_rows, layout.num_rows))
        if memory.table is not None and not memory.table.weight.is_meta:
            # A model built with its table (e.g. a trained one being converted): keep its rows.
            every = torch.arange(layout.num_rows, dtype=torch.int64)
            store.write(every, memory.table.weight.detach()[start : start + num_rows].float().cpu())
        table = PlacedTable(memory, entry, store, optimizer, sharding=self.sharding, shards=shards)
        memory.use_row_source(table)
        self.tables[table_name(memory.layer_id)] = table

    def file_name(self, name: str) -> str:
        """How table `name` is named in files and checkpoints: a shard adds its rank and world,
        so the shards of all ranks share a folder and a mismatched world size is refused."""
        return name if self.sharding is None else f"{name}.{self.sharding.suffix()}"

    def _store(
        self,
        name: str,
        entry: TablePlacement,
        layout: TableLayout,
        init: RowInit,
    ) -> RowStore:
        if entry.placement == "device":
            return DeviceStore(layout, init, self.device)
        if entry.placement == "host":
            return HostStore(layout, init)
        if self.read_only:  # the checkpoint's own file: nothing copied, nothing written
            self.in_place.add(name)
            path = self.folder / f"{name}.table"
            if not path.exists() and self.sharding is None:  # a sharded run's: its shards as one
                joined = open_joined(self.folder, name, layout, init)
                if joined is not None:
                    return joined
            return self._open_saved(path, name, layout, init)
        folder = self.live_folder(entry)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.table"
        # A live file left by an earlier process is never read, however it was left (killed
        # mid-write, damaged, of another run): a resumed run restores a checkpoint's rows into
        # the new one, and checkpoints hold the rows that count.
        sweep_trash(folder)
        remove_later(path)
        return DiskStore.create(path, layout, init)

    def live_folder(self, entry: TablePlacement) -> Path:
        """Where a disk table of `entry` lives while it trains."""
        if not entry.path:
            return self.folder
        # A shared fast drive: one subfolder per run, so runs never collide.
        key = hashlib.sha256(str(self.folder.resolve()).encode()).hexdigest()[:12]
        return Path(entry.path) / f"{self.folder.parent.name}-{key}"

    def remove_stale(self) -> list[Path]:
        """Remove the live disk files of this run's tables under another world size (or unsharded
        when sharded, and back), e.g. left by the run this one resumed at a new world size: their
        rows were restored from the checkpoint, and their blocks would stay allocated. Every
        rank's current files are spared, so one rank may call it once all have restored."""
        world = self.sharding.world if self.sharding else None
        removed = []
        for table in self.tables.values():
            if table.entry.placement != "disk" or self.read_only:
                continue
            folder, name = self.live_folder(table.entry), table_name(table.memory.layer_id)
            keep = (
                {f"{name}.table"}
                if world is None
                else {f"{name}.rank{r}-of-{world}.table" for r in range(world)}
            )
            for path in [folder / f"{name}.table", *folder.glob(f"{name}.rank*-of-*.table")]:
                if path.name not in keep and path.exists():
                    remove_later(path)
                    removed.append(path)
        return removed

    @staticmethod
    def _open_saved(path: Path, name: str, layout: TableLayout, init: RowInit) -> RowStore:
        """A checkpoint's disk table, for reading where it lies."""
        if not path.is_file():
            raise ValueError(f"{path} is missing: no file for the {name} disk table")
        if is_packed(path):  # a checkpoint's written rows
            store: RowStore = PackedStore(path)
        else:  # a checkpoint from before packing: the whole table file
            store = DiskStore(path, read_only=True)
        if store.layout != layout or store.init != init:
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

    # ---- rows ahead of use: pins for the next batch, fetches for this forward --------------------
    def pin(self, rows: dict[int, torch.Tensor] | None) -> list[tuple[CachedStore, torch.Tensor]]:
        """Pin a batch's rows in every cached, prefetching table; returns what to `release`."""
        return _pin(self._rows_to_pin(rows))

    def _rows_to_pin(self, rows: dict[int, torch.Tensor] | None) -> list[tuple[Any, torch.Tensor]]:
        if rows is None:
            return []
        return [(t.store, t.rows_to_pin(rows)) for t in self._prefetching()]

    def _prefetching(self) -> list[PlacedTable]:
        return [t for t in self.tables.values() if t.prefetches]

    def pin_ahead(self, batch: Any) -> Future:
        """Start pinning `batch`'s rows in a background thread; the future's result is `batch`
        and what to `release` after its step. The trainer pins batch n+1 while step n computes,
        so a cache holds the rows of at most two batches at once. A shard first learns which of
        its rows the ranks' batches n+1 ask for (a collective of ids, here on the main thread);
        the loads from host or disk run in the thread."""
        if not self._prefetching():
            done: Future = Future()
            done.set_result((batch, []))
            return done
        if self._pins is None:
            self._pins = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-pins")
        if self.sharding is not None:
            wanted = self._rows_to_pin(batch.rows)
            return self._pins.submit(lambda: (batch, _pin(wanted)))
        return self._pins.submit(lambda: (batch, self.pin(batch.rows)))

    @staticmethod
    def release(pinned: list[tuple[CachedStore, torch.Tensor]]) -> None:
        for store, ids in pinned:
            store.unpin(ids)

    def fetch(self, rows: dict[int, torch.Tensor] | None, training: bool = True) -> None:
        """Start reading a forward's `rows` (every layer's, best on the CPU) of each table that
        fetches ahead, in a background thread; on CUDA their copy to the device runs on a side
        stream. Each layer's row source waits for its own table only. In training only tables
        off the compute device fetch (a cache's rows are pinned already: on the CPU nothing is
        left to hide); in inference cached tables too."""
        if rows is None:
            return
        for table in self.tables.values():
            table.settle()  # a forward that never reached this table: drop its rows
            local = rows[table.memory.layer_id]
            if not self._fetches_ahead(table, training) or local.numel() < PREFETCH_MIN_LOOKUPS:
                continue  # (a decode step: the layer reads its few rows itself)
            if self._fetches is None:
                self._fetches = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-rows")
            ids = global_ids(local.cpu(), table.memory.offsets)
            table.inflight = self._fetches.submit(
                fetch, table.store, ids, self.device, self._fetch_stream
            )

    def _fetches_ahead(self, table: PlacedTable, training: bool) -> bool:
        if table.memory.row_source is not table or table.shards is not None:
            return False  # replaced (e.g. by quantised rows), or read by a collective
        off_device = table.store.device != self.device
        return table.entry.prefetch and (off_device or (table.prefetches and not training))

    def fetches_ahead(self, training: bool) -> list[str]:
        """The tables whose rows `fetch` reads ahead (in training, or in inference)."""
        return [n for n, t in self.tables.items() if self._fetches_ahead(t, training)]

    def fetch_ahead(self, model: EngramLM) -> None:
        """Fetch every inference forward's rows as soon as `model` has hashed them, before its
        first layer runs (a rows hook; `embed` and `close` remove it)."""
        if self.fetches_ahead(training=False) and self._hook is None:
            self._hook = model.register_rows_hook(lambda rows: self.fetch(rows, training=False))

    def embed(self, names: Collection[str] | None = None) -> None:
        """Hand every placed table (or those of `names`) back to its module as an nn.Embedding on
        the compute device (all rows read, a chunk at a time), for exports that keep tables as
        weights (the HF integration). ValueError if their values exceed the RAM available now."""
        unknown = sorted(set(names or ()) - set(self.tables))
        if unknown:
            raise ValueError(f"no placed tables named {unknown} (there are {sorted(self.tables)})")
        chosen = [n for n in self.tables if names is None or n in names]
        need = sum(self.tables[n].store.num_rows * self.tables[n].store.dim * 4 for n in chosen)
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if need > free:
            raise ValueError(
                f"the placed tables hold {need / 1e9:.1f} GB of values, more than the "
                f"{free / 1e9:.1f} GB of free RAM: they cannot become embeddings"
            )
        if len(chosen) == len(self.tables):
            self._stop_fetching()  # nothing is left to fetch ahead
        for name in chosen:
            table = self.tables.pop(name)
            table.settle()
            weight = torch.empty(table.store.num_rows, table.store.dim)
            for start in range(0, table.store.num_rows, _EMBED_CHUNK):
                rows = torch.arange(start, min(start + _EMBED_CHUNK, table.store.num_rows))
                weight[start : start + rows.numel()] = table.store.read(rows).cpu()
            table.memory.use_table(weight.to(self.device))
            table.store.close()

    # ---- checkpoints, statistics ---------------------------------------------------------------
    def stores(self) -> dict[str, RowStore]:
        """Every table's store, by its file name (`file_name`)."""
        return {self.file_name(name): t.store for name, t in self.tables.items()}

    def write(self, folder: Path) -> dict[str, Any]:
        """Save every table into `folder` (inside a checkpoint being written); manifest entry.
        Shards are named by rank, so every rank writes its own into one folder, and each entry
        names its table and global rows (`engram.tables.reshard`): rank 0 merges them all."""
        folder.mkdir(parents=True, exist_ok=True)
        entries = write_tables(folder, self.stores())
        rank = self.sharding.rank if self.sharding is not None else 0
        for name, table in self.tables.items():
            entries[self.file_name(name)] |= part_entry(name, table.shards, rank)
        states = {self.file_name(n): t.optimizer.state_dict() for n, t in self.tables.items()}
        return {"entries": entries, "optimizers": states}

    def restore_rows(
        self, name: str, read: Callable[[int, int], tuple[list[torch.Tensor], int]]
    ) -> None:
        """Fill table `name`'s store from elsewhere than a table file: `read(start, stop)` gives
        global rows [start, stop) as record parts ([value, exp_avg, exp_avg_sq] for Adam) and
        the optimiser's step count. How a table a checkpoint holds as an embedding trained by
        SparseAdam (whose state RowAdam's records hold bit for bit) resumes in a row store."""
        table = self.tables[name]
        start = 0 if table.shards is None else table.shards.start(self.sharding.rank)
        steps = 0
        for lo in range(0, table.store.num_rows, _EMBED_CHUNK):
            hi = min(lo + _EMBED_CHUNK, table.store.num_rows)
            parts, steps = read(start + lo, start + hi)
            records = torch.cat([p.float() for p in parts], dim=1)
            if records.shape[1] != table.store.layout.width:
                raise ValueError(
                    f"{name}: the saved rows have {records.shape[1]} values per row, a "
                    f"{table.optimizer.kind} store holds {table.store.layout.width}"
                )
            table.store.write(torch.arange(lo, hi), records, ALL)
        table.optimizer.load_state_dict({**table.optimizer.state_dict(), "steps": steps})

    def restore(
        self, folder: Path, manifest: dict[str, Any], names: Collection[str] | None = None
    ) -> None:
        """Load every table and row-optimiser state from a checkpoint's `folder`, saved sharded
        over any number of ranks or not at all (`engram.tables.reshard`): each store gets the
        rows of its own range. The manifest (every rank's part of every table present, the
        same optimiser state from all) is checked before any store changes."""
        if self.in_place and Path(folder).resolve() != self.folder.resolve():
            raise ValueError(f"tables {sorted(self.in_place)} read {self.folder}, not {folder}")
        saved = SavedTables(Path(folder), manifest)
        chosen = {n: t for n, t in self.tables.items() if names is None or n in names}
        targets = {name: self._target(name, table) for name, table in chosen.items()}
        for target in targets.values():
            saved.check(target)
        states = {name: saved.optimizer_state(name) for name in targets}
        for name, table in chosen.items():
            table.optimizer.load_state_dict(states[name])
            if targets[name].name not in self.in_place:
                saved.restore(targets[name])

    def _target(self, name: str, table: PlacedTable) -> Target:
        """Where table `name`'s saved rows go: its store, holding this rank's range."""
        if table.shards is None:
            return Target(name, self.file_name(name), table.store, 0, table.store.num_rows)
        start = table.shards.start(self.sharding.rank)
        return Target(name, self.file_name(name), table.store, start, table.shards.num_rows)

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

    def _stop_fetching(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for pool in (self._pins, self._fetches):
            if pool is not None:
                pool.shutdown(wait=True)
        self._pins = self._fetches = None
        for table in self.tables.values():
            table.settle()

    def close(self) -> None:
        self._stop_fetching()
        for table in self.tables.values():
            table.store.close()


# ---- table files inside a checkpoint --------------------------------------------------------
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def write_tables(folder: Path, stores: Mapping[str, RowStore]) -> dict[str, Any]:
    """Save every store into `folder` as `{name}.table` (each in its store's own format: a disk
    table's written rows, packed; an in-memory table's records; fsynced); manifest entries.

    The folder is an attachment of a checkpoint being written (`engram.checkpoint`), committed
    by the same atomic rename as the weights."""
    for name in stores:
        if not _NAME.fullmatch(name):
            raise ValueError(f"table name {name!r} must match {_NAME.pattern} (it names a file)")
    entries = {}
    for name, store in stores.items():
        file = f"{name}.table"
        store.save(folder / file)  # flushes first; the file is fsynced
        blocks = os.stat(folder / file).st_blocks * 512
        entries[name] = {**store.describe(), "file": file, "allocated_bytes": blocks}
    return entries


def restore_tables(folder: Path, stores: Mapping[str, RowStore], entries: dict[str, Any]) -> None:
    """Load every store from `folder` given the manifest entries `write_tables` returned."""
    missing = sorted(set(stores) - set(entries))
    if missing:
        raise ValueError(f"{folder} has no table named {missing} (it has {sorted(entries)})")
    for name, store in stores.items():  # check every layout before changing any store
        check_layout(store.layout, entries[name]["layout"], folder / entries[name]["file"])
    for name, store in stores.items():
        store.load(folder / entries[name]["file"])
