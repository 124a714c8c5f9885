"""A checkpoint's tables read at any world size: every rank's saved shards, taken as one table.

In a multi-rank checkpoint every rank writes its shard of each table into the same `tables/`
folder (`PlacedTables.write`: `layer3.rank0-of-2.table`, ...) and rank 0 merges the manifest
entries, each of which names its table and the global rows its file holds:

    "layer3.rank1-of-2": {
        "kind": ..., "layout": ..., "init": ...,           the store's `describe()`
        "file": "layer3.rank1-of-2.table", "allocated_bytes": ...,
        "table": "layer3",
        "shard": {"rank": 1, "world": 2, "start": 50, "rows": 50, "table_rows": 100}}

An unsharded entry carries "table" only; one written before shards carries neither (its key is
the table's name). `SavedTables` restores such a checkpoint into the stores of a `PlacedTables`
sharded over any world size, or not at all, one table at a time:

    check      every rank's entry and file is there, the parts tile [0, table_rows), their
               layouts are the table's, and all ranks saved the same row-optimiser state (the
               step count): a checkpoint some ranks did not finish writing never loads
    fast path  a part that is exactly this store (its name, its range): `store.load(file)`
    copy       otherwise, for each part overlapping this store's range, the file is opened
               read-only where it lies, and its rows in the range are written whole (value and
               optimiser state, so resharding rows reshards their state) at their local ids: a
               packed disk table's written rows only, a bounded chunk at a time (a mostly
               unwritten 64 GB table is never materialised); an in-memory table's slice of
               records. Rows no part holds must read as their init: a disk store is rebuilt
               from a new sparse file (holes), an in-memory store is reset to its init first.

Init is a function of the global row (`RowInit.shard`), so a part's unwritten rows are the same
rows in any target. For inference, `open_joined` serves a sharded run's disk table read-only as
one table (`JoinedStore`): a read goes to the shards holding its rows, nothing is copied.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from engram.files import remove_later
from engram.rowinit import RowInit
from engram.tables.base import ALL, RowStore, TableLayout, check_layout, initial_records
from engram.tables.cache import CachedStore
from engram.tables.packed import PackedStore, is_packed, write_packed
from engram.tables.sharded import RowShards
from engram.tables.stores import DiskStore, read_header

_CHUNK_BYTES = 64 << 20  # records copied per pass: bounds the RAM a restore takes
_SHARD_FILE = re.compile(r"(?P<table>.+)\.rank(?P<rank>\d+)-of-(?P<world>\d+)\.table")


def part_entry(table: str, shards: RowShards | None, rank: int) -> dict[str, Any]:
    """What a manifest entry adds about its file: the table, and a shard's global rows."""
    if shards is None:
        return {"table": table}
    shard = {"rank": rank, "world": shards.world, "start": shards.start(rank)}
    shard |= {"rows": shards.size(rank), "table_rows": shards.num_rows}
    return {"table": table, "shard": shard}


def saved_entries(saved: Mapping[str, Any] | None) -> set[str]:
    """The tables a checkpoint's manifest ("tables") holds in row-store files, sharded or not."""
    entries = (saved or {}).get("entries", {})
    return {e.get("table", k) for k, e in entries.items()}


@dataclass(frozen=True)
class SavedPart:
    """One saved file of a table: rows [start, start + rows) of its `table_rows`."""

    key: str  # the manifest entry's name (the saving store's file name)
    table: str
    file: str
    layout: TableLayout
    start: int
    rows: int
    table_rows: int
    rank: int = 0
    world: int = 1

    @property
    def stop(self) -> int:
        return self.start + self.rows

    @classmethod
    def from_entry(cls, key: str, entry: Mapping[str, Any]) -> SavedPart:
        try:
            layout = TableLayout.from_json(entry["layout"])
            shard = entry.get("shard")
            if shard is None:  # a whole table (its key is its name in manifests before shards)
                rows = layout.num_rows
                return cls(key, entry.get("table", key), entry["file"], layout, 0, rows, rows)
            fields = {k: int(shard[k]) for k in ("start", "rows", "table_rows", "rank", "world")}
            part = cls(key, str(entry["table"]), str(entry["file"]), layout, **fields)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"the manifest's table entry {key!r} is malformed: {e!r}") from e
        if part.rows != layout.num_rows or not 0 <= part.rank < part.world:
            raise ValueError(f"the manifest's table entry {key!r} has a bad shard: {shard}")
        return part


@dataclass(frozen=True)
class Target:
    """A store to fill: rows [start, start + store.num_rows) of `table` (`table_rows` rows);
    `name` is the store's own file name (`PlacedTables.file_name`)."""

    table: str
    name: str
    store: RowStore
    start: int
    table_rows: int

    @property
    def stop(self) -> int:
        return self.start + self.store.num_rows

    @property
    def table_init(self) -> RowInit:
        """The whole table's init (the store's is that of its first row)."""
        init = self.store.init
        return replace(init, first_row=init.first_row - self.start)


class SavedTables:
    """A checkpoint's `tables/` folder with its manifest entry ("entries", "optimizers"), by
    table: every part each rank saved, checked and copied into stores of any world size."""

    def __init__(self, folder: Path, manifest: Mapping[str, Any]) -> None:
        self.folder = Path(folder)
        self.optimizers: Mapping[str, Any] = manifest.get("optimizers", {})
        self.parts: dict[str, list[SavedPart]] = {}
        for key, entry in manifest["entries"].items():
            part = SavedPart.from_entry(key, entry)
            self.parts.setdefault(part.table, []).append(part)
        for parts in self.parts.values():
            parts.sort(key=lambda p: (p.start, p.rank))

    def check(self, target: Target) -> list[SavedPart]:
        """The parts of `target`'s table; ValueError unless they are complete and fit it."""
        parts = self.parts.get(target.table)
        if not parts:
            raise ValueError(
                f"{self.folder} has no table named {target.table!r} (it has {sorted(self.parts)})"
            )
        where = f"{self.folder}: table {target.table}"
        worlds = sorted({p.world for p in parts})
        ranks = sorted(p.rank for p in parts)
        if len(worlds) > 1 or ranks != list(range(worlds[0])):
            missing = sorted(set(range(max(worlds))) - set(ranks))
            raise ValueError(
                f"{where} has parts of ranks {ranks} of world {worlds}: rank(s) {missing} are "
                "missing (a checkpoint not every rank finished never loads)"
            )
        at = 0
        for part in parts:
            if part.table_rows != target.table_rows:
                raise ValueError(
                    f"{where} was saved with {part.table_rows} rows, this model's has "
                    f"{target.table_rows}"
                )
            if part.start != at:
                raise ValueError(f"{where}: rows from {at} are in no part (next is {part.key})")
            at = part.stop
            path = self.folder / part.file
            check_layout(
                replace(target.store.layout, num_rows=part.rows), part.layout.to_json(), path
            )
            if not path.is_file():
                raise ValueError(f"{path} is missing: rank {part.rank}'s part of {target.table}")
        if at != target.table_rows:
            raise ValueError(f"{where}: rows [{at}, {target.table_rows}) are in no part")
        return parts

    def optimizer_state(self, table: str) -> dict[str, Any]:
        """The row-optimiser state of `table`, which every rank must have saved alike."""
        states = {}
        for part in self.parts.get(table, []):
            if part.key not in self.optimizers:
                raise ValueError(f"{self.folder}: no row-optimiser state for {part.key}")
            states[part.key] = self.optimizers[part.key]
        if not states:
            raise ValueError(f"{self.folder} has no table named {table!r}")
        first = next(iter(states.values()))
        if any(state != first for state in states.values()):
            raise ValueError(
                f"{self.folder}: the ranks saved different optimiser states of {table}: {states}"
            )
        return first

    def restore(self, target: Target) -> None:
        """Replace every row of `target.store` by the saved rows of its range (and their state)."""
        parts = self.check(target)
        for part in parts:
            if part.key == target.name and (part.start, part.stop) == (target.start, target.stop):
                target.store.load(self.folder / part.file)  # saved by a store just like this one
                return
        overlap = [p for p in parts if p.start < target.stop and target.start < p.stop]
        store = target.store
        base = store.backing if isinstance(store, CachedStore) else store
        if isinstance(base, DiskStore):  # rebuilt sparse: rows no part holds stay holes (init)
            fresh = base.path.with_name(base.path.name + ".resharding")
            remove_later(fresh)  # left by a restore that died
            try:
                with DiskStore.create(fresh, store.layout, store.init) as rebuilt:
                    self._copy(target, overlap, rebuilt)
                store.load(fresh)
            finally:
                remove_later(fresh)
            return
        if any(_file_kind(self.folder / p.file) != "tensor" for p in overlap):
            _reset(store)  # a disk table's part holds its written rows only; the rest is init
        self._copy(target, overlap, store)

    def _copy(self, target: Target, parts: Sequence[SavedPart], dest: RowStore) -> None:
        """Write each part's rows within `target`'s range, whole records, at local ids."""
        init = target.table_init
        for part in parts:
            lo = max(part.start, target.start) - part.start  # part-local rows [lo, hi)
            hi = min(part.stop, target.stop) - part.start
            shift = part.start - target.start
            path = self.folder / part.file
            for ids, records in _part_rows(path, part.layout, init.shard(part.start), lo, hi):
                dest.write(torch.from_numpy(ids + shift), torch.from_numpy(records), ALL)


def _file_kind(path: Path) -> str:
    """How a table file was saved: "packed" (a disk table's written rows), "disk" (a whole
    disk-table file, as before packing) or "tensor" (an in-memory table's records)."""
    if is_packed(path):
        return "packed"
    try:
        read_header(path)
    except ValueError:
        return "tensor"
    return "disk"


def _part_rows(
    path: Path, layout: TableLayout, init: RowInit, lo: int, hi: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids [c], records [c, W]) of the rows in [lo, hi) the file `path` holds, ascending, a
    bounded chunk at a time; ValueError unless it holds a table of `layout` and `init`."""
    step = max(1, _CHUNK_BYTES // (4 * layout.width))
    kind = _file_kind(path)
    if kind == "tensor":
        yield from _tensor_rows(path, layout, lo, hi, step)
        return
    with PackedStore(path) if kind == "packed" else DiskStore(path, read_only=True) as store:
        _check_file(store, layout, init, path)
        if isinstance(store, PackedStore):  # only the written rows are visited
            for ids, records in store.chunks():
                if ids[-1] < lo:
                    continue
                if ids[0] >= hi:
                    break
                keep = (ids >= lo) & (ids < hi)
                yield ids[keep], records[keep]
            return
        for start in range(lo, hi, step):
            ids = torch.arange(start, min(hi, start + step))
            ids = ids[store.touched(ids)]
            if ids.numel():
                yield ids.numpy(), store.read(ids, ALL).numpy()


def _tensor_rows(
    path: Path, layout: TableLayout, lo: int, hi: int, step: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Rows [lo, hi) of an in-memory table's saved records, read a slice at a time."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            check_layout(layout, json.loads((f.metadata() or {})["table"])["layout"], path)
            records = f.get_slice("records")
            chunks = [(s, min(hi, s + step)) for s in range(lo, hi, step)]
            for start, stop in chunks:
                rows = np.arange(start, stop, dtype=np.int64)
                yield rows, np.ascontiguousarray(records[start:stop], dtype=np.float32)
    except (OSError, KeyError, json.JSONDecodeError, SafetensorError) as e:
        raise ValueError(f"{path} is not a saved table: {e!r}") from e


def _check_file(store: RowStore, layout: TableLayout, init: RowInit, path: Path) -> None:
    check_layout(layout, store.layout.to_json(), path)
    if store.init != init:  # its unwritten rows would come back as another table's
        raise ValueError(f"{path} was made with init {store.init.to_json()}, not {init.to_json()}")


def _reset(store: RowStore) -> None:
    """Every row of an in-memory `store` back to its init, with zero optimiser state."""
    step = max(1, _CHUNK_BYTES // (4 * store.layout.width))
    for start in range(0, store.num_rows, step):
        ids = torch.arange(start, min(store.num_rows, start + step))
        fresh = initial_records(store.layout, store.init, ids.numpy())
        store.write(ids, torch.from_numpy(fresh), ALL)


# ---- a sharded run's disk table, read in place ----------------------------------------------
class JoinedStore(RowStore):
    """The packed shards of one table, as every rank saved them, served read-only as the whole
    table: a read is split by the shard holding each row (sorted ids: contiguous runs)."""

    kind = "joined"

    def __init__(
        self,
        parts: Sequence[PackedStore],
        starts: Sequence[int],
        layout: TableLayout,
        init: RowInit,
    ) -> None:
        super().__init__(layout, init, torch.device("cpu"))
        self.parts, self.starts = list(parts), list(starts)
        self._starts = torch.tensor(self.starts, dtype=torch.int64)

    @property
    def written_rows(self) -> int:
        return sum(part.written_rows for part in self.parts)

    def _gather(self, rows: torch.Tensor, slot: str) -> torch.Tensor:
        rows = rows.cpu()
        edges = [*torch.searchsorted(rows, self._starts).tolist(), rows.numel()]
        reads = [
            part.read(rows[lo:hi] - start, slot)
            for part, start, lo, hi in zip(self.parts, self.starts, edges, edges[1:], strict=False)
            if hi > lo
        ]
        return torch.cat(reads)

    def _scatter(self, rows: torch.Tensor, slot: str, values: torch.Tensor) -> None:
        raise ValueError(f"{self} is a sharded checkpoint's table, read-only")

    def save(self, path: Path) -> None:
        """The whole table's written rows, packed, as one unsharded disk table would save them."""
        self._check_open()
        ids = [
            ids + start
            for part, start in zip(self.parts, self.starts, strict=True)
            for ids, _ in part.chunks()
        ]
        written = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        records = lambda chunk: self.read(torch.from_numpy(chunk), ALL).numpy()  # noqa: E731
        write_packed(Path(path), self.layout, self.init, written, records)

    def load(self, path: Path) -> None:
        raise ValueError(f"{self} is a sharded checkpoint's table, read-only")

    def close(self) -> None:
        if not self._closed:
            super().close()
            for part in self.parts:
                part.close()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "shards": len(self.parts), "written_rows": self.written_rows}


def open_joined(folder: Path, name: str, layout: TableLayout, init: RowInit) -> JoinedStore | None:
    """Table `name` of a checkpoint's `folder` saved as shards (`{name}.rank{r}-of-{W}.table`),
    read in place as one table of `layout` and `init`; None if it has no such files. ValueError
    if a rank's shard is missing or the shards do not make up this table."""
    found = {}
    for path in Path(folder).glob(f"{glob.escape(name)}.rank*-of-*.table"):
        match = _SHARD_FILE.fullmatch(path.name)
        if match and match["table"] == name:
            found[int(match["world"]), int(match["rank"])] = path
    if not found:
        return None
    worlds = sorted({world for world, _ in found})
    ranks = sorted(rank for world, rank in found if world == worlds[0])
    if len(worlds) > 1 or ranks != list(range(worlds[0])):
        raise ValueError(
            f"{folder} holds shards of table {name} of ranks {ranks} of world {worlds}, "
            "not one shard per rank of one world"
        )
    parts: list[PackedStore] = []
    starts, at = [], 0
    try:
        for rank in ranks:
            path = found[worlds[0], rank]
            parts.append(PackedStore(path))  # ValueError unless a packed table
            _check_file(
                parts[-1], replace(layout, num_rows=parts[-1].num_rows), init.shard(at), path
            )
            starts.append(at)
            at += parts[-1].num_rows
        if at != layout.num_rows:
            raise ValueError(
                f"the shards of {name} in {folder} hold {at} rows, not {layout.num_rows}"
            )
    except BaseException:
        for part in parts:
            part.close()
        raise
    return JoinedStore(parts, starts, layout, init)
