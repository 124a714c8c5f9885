"""engram.tables.cache: the hot-row cache's RAM is bounded by its capacity, not by the table
(issue 13), and its two bounded structures (the cuckoo row -> slot map and the count-min
history sketch) answer as the exact maps they replaced would. Policy, pinning and threading
tests of the cache live in test_tables.py."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from engram.rowinit import RowInit
from engram.tables.base import ALL, RowStore, TableLayout, initial_records
from engram.tables.cache import CachedStore, _FrequencySketch, _SlotMap
from engram.tables.stores import HostStore

INIT = RowInit(seed=7, table_id=1, std=1.0)


class InitOnlyStore(RowStore):
    """A table of any number of rows that keeps only the rows written to it: the others read as
    their init. Unlike every real store it costs nothing per table row, so a test can put a
    cache in front of 10^9 rows and see what the cache alone allocates."""

    kind = "init_only"

    def __init__(self, layout: TableLayout) -> None:
        super().__init__(layout, INIT, torch.device("cpu"))
        self.written: dict[int, np.ndarray] = {}

    def _records(self, index: np.ndarray) -> np.ndarray:
        out = initial_records(self.layout, self.init, index)
        for i, row in enumerate(index.tolist()):  # a test double: a loop over a few rows
            if row in self.written:
                out[i] = self.written[row]
        return out

    def _gather(self, rows: torch.Tensor, slot: str) -> torch.Tensor:
        return torch.from_numpy(self._records(rows.numpy())[:, self.layout.columns(slot)])

    def _scatter(self, rows: torch.Tensor, slot: str, values: torch.Tensor) -> None:
        records = self._records(rows.numpy())
        records[:, self.layout.columns(slot)] = values.numpy()
        self.written.update(zip(rows.tolist(), records, strict=True))

    def save(self, path):  # pragma: no cover - not needed here
        raise NotImplementedError

    def load(self, path):  # pragma: no cover
        raise NotImplementedError


def numpy_bytes(obj: object, seen: set[int] | None = None) -> int:
    """Bytes of every numpy array reachable through the attributes of `obj` (the cache and the
    objects it owns), each counted once: whatever the cache keeps, not just what it reports."""
    seen = set() if seen is None else seen
    total = 0
    for value in vars(obj).values():
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, np.ndarray):
            total += value.nbytes if value.base is None else 0  # a view owns no bytes
        elif isinstance(value, (_SlotMap, _FrequencySketch)):
            total += numpy_bytes(value, seen)
    return total


def exercise(cache: CachedStore, rng: np.random.Generator, steps: int = 30) -> None:
    """Reads and writes of random rows over the whole table, so that evictions happen."""
    for _ in range(steps):
        rows = torch.from_numpy(np.unique(rng.integers(0, cache.num_rows, 300)))
        values = cache.read(rows, ALL)
        cache.write(rows, values + 1.0, ALL)
    cache.check_invariants()


@pytest.mark.parametrize("num_rows", [10**4, 10**9])
def test_cache_ram_does_not_grow_with_the_table(num_rows):
    capacity = 1000
    tracemalloc.start()  # numpy reports its buffers to tracemalloc; torch's records are apart
    try:
        cache = CachedStore(InitOnlyStore(TableLayout(num_rows, 4, (("m", 4),))), capacity)
        exercise(cache, np.random.default_rng(0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert cache.stats.evictions > 0 and cache.backing.written  # rows came and went
    # Slot arrays (27 B/slot and the map's sentinel), map (12 B/slot), sketch (16 B/slot): fixed
    # by the capacity, and all there is bar 56 bytes of constant offsets. The old row maps
    # alone were 5 GB for 10^9 rows.
    assert cache.bookkeeping_bytes == 55 * capacity + 8
    assert 0 <= numpy_bytes(cache) - cache.bookkeeping_bytes <= 64
    # Peak over the whole run, with the reads' temporaries and the test store's written rows
    # (2-3 MB): one byte per table row would be 1 GB at 10^9 rows; the bound is the same at 10^4.
    assert peak < 8 * 2**20, f"peak {peak} bytes"


def test_bookkeeping_is_a_few_dozen_bytes_per_slot():
    capacity = 50_000
    cache = CachedStore(InitOnlyStore(TableLayout(10**10, 4)), capacity)
    assert cache.bookkeeping_bytes / capacity == pytest.approx(55, abs=0.01)


def test_evicted_rows_keep_their_count():
    """TinyLFU's history: a hot row that was evicted comes back with its count and outlives
    rows read more recently but less often. With no history it would come back at count 1
    and be the first victim."""
    cache = CachedStore(HostStore(TableLayout(100, 2), INIT), capacity=4, age_every=10**6)
    for _ in range(10):
        cache.read(torch.tensor([0]))
    with cache.pinned(torch.tensor([1, 2, 3])):
        cache.read(torch.tensor([5]))  # row 0 is the only row it can evict
    assert not cache.resident(torch.tensor([0])).any()
    cache.read(torch.tensor([0]))  # back, with a count of 11 (evicting row 5, count 1)
    for _ in range(3):
        cache.read(torch.tensor([1, 2, 3]))  # count 4 each, and more recent than row 0
    cache.read(torch.tensor([6]))
    assert cache.resident(torch.tensor([0])).all()
    assert int(cache.resident(torch.tensor([1, 2, 3])).sum()) == 2
    cache.check_invariants()


# ---- the row -> slot map -------------------------------------------------------------------------
def churn(table: _SlotMap, reference: dict[int, int], rng: np.random.Generator, k: int) -> None:
    """Remove k random resident rows and insert k new ones, in the map and in the dict."""
    held = np.flatnonzero(table.slot_row >= 0)
    out = rng.choice(held, size=min(k, held.size), replace=False)
    rows = table.slot_row[out].copy()
    table.slot_row[out] = -1
    table.remove(rows, out)
    for row in rows.tolist():
        del reference[row]
    new = rng.choice(10**12, size=out.size, replace=False)
    new = new[~np.isin(new, table.slot_row)]
    slots = out[: new.size]
    table.slot_row[slots] = new
    table.insert(new, slots)
    reference.update(zip(new.tolist(), slots.tolist(), strict=True))


def test_slot_map_agrees_with_a_dict_through_churn():
    capacity = 5000
    rng = np.random.default_rng(1)
    table, reference = _SlotMap(capacity), {}
    rows = np.arange(capacity, dtype=np.int64) * 1_000_003  # structured ids: an arithmetic run
    table.slot_row[:] = rows
    table.insert(rows, np.arange(capacity))
    reference.update(zip(rows.tolist(), range(capacity), strict=True))
    probe = np.sort(rng.choice(10**12, 200))
    for k in (1, 30, 2000, 5000, 7):
        churn(table, reference, rng, k)
        held = np.flatnonzero(table.slot_row >= 0)
        table.check(held)
        asked = np.concatenate([table.slot_row[held[:300]], probe])
        expected = [reference.get(row, -1) for row in asked.tolist()]
        assert table.find(asked).tolist() == expected
        assert table.find(asked).tolist() == expected  # the kept answer, while unchanged
    assert table.nbytes == 12 * capacity + 8 * (capacity + 1)


def test_slot_map_rehashes_when_an_insertion_fails(monkeypatch):
    capacity = 300
    table = _SlotMap(capacity)
    rows = np.arange(200, dtype=np.int64)
    table.slot_row[:200] = rows
    place = _SlotMap._place
    calls = []

    def fail_once(self, rows, slots):
        calls.append(rows.size)
        if len(calls) > 1:
            return place(self, rows, slots)
        place(self, rows[: rows.size // 2], slots[: slots.size // 2])  # half placed, then fail
        return False

    monkeypatch.setattr(_SlotMap, "_place", fail_once)
    seed = table._seed
    table.insert(rows, np.arange(200))
    assert calls == [200, 200] and table._seed != seed  # all rows again, under a new hash
    table.check(np.arange(200))


# ---- the history sketch --------------------------------------------------------------------------
def test_sketch_never_underestimates_and_ages():
    rng = np.random.default_rng(2)
    sketch = _FrequencySketch(capacity=256)  # 1,024 counters per row
    rows = rng.choice(10**9, 3000, replace=False)  # 3x the width: many shared counters
    counts = rng.integers(1, 256, rows.size).astype(np.uint8)
    sketch.record(rows, counts)
    assert (sketch.estimate(rows) >= counts).all()
    few = np.arange(10, dtype=np.int64)
    alone = _FrequencySketch(capacity=256)
    alone.record(few, np.arange(10, dtype=np.uint8))
    assert alone.estimate(few).tolist() == list(range(10))  # 10 rows in 1,024: no collision
    alone.record(few, np.full(10, 3, dtype=np.uint8))  # raises, never lowers
    assert alone.estimate(few).tolist() == [3, 3, 3, 3, 4, 5, 6, 7, 8, 9]
    alone.halve()
    assert alone.estimate(few).tolist() == [1, 1, 1, 1, 2, 2, 3, 3, 4, 4]
    assert alone.nbytes == 4 * 1024 and _FrequencySketch(10**5).nbytes == 16 * 10**5
