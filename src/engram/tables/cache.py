"""A bounded hot-row cache in front of a slower store (host or disk), safe under prefetch.

`CachedStore(backing, capacity)` is itself a `RowStore`: the lookup and the row-wise optimisers
use it exactly like the store behind it. It keeps up to `capacity` whole records (value and
optimiser state) in one tensor, and writes dirty records back only when they are evicted or on
`flush`/`save` (write-back), so a row updated by every step costs no slow-tier write per step.

Eviction policy: LFU with aging, ties broken by least recent use. N-gram lookups are Zipfian: a
few rows are read by almost every batch, most rows once in a long while. Plain LRU lets each
batch's long tail of one-off rows push the hot rows out (scan pollution); plain LFU never
forgets rows that were hot long ago (a change of domain in the data). So each *row* has an
access count (one saturating byte per table row, kept while the row is not resident, so a row
that keeps coming back builds its count across evictions: TinyLFU's frequency history, exact
instead of a sketch); every `age_every` row accesses (default 10x the capacity, TinyLFU's
sample size) all counts are halved, which turns them into a frequency over a sliding horizon;
and the victim is the resident row of lowest count, the least recently used among equals (most
of the tail has count 0 or 1, so among cold rows this is LRU). Every miss is admitted: the
batch needs the row now and its optimiser update follows. Free slots are a stack, so a miss
takes one in O(1); when it runs dry, one vectorised `argpartition` over the slots (O(capacity))
evicts at least 1/64 of them at once (`evict_batch`), so the search is paid once per
capacity/64 misses rather than on every decode step. Aging is O(table rows) every 10 x capacity
accesses.

Concurrency (one lock, `self._cond`, guards every field below). A row in use is *pinned*
(`pin`, `unpin`, `pinned`): pinned slots are never evicted. A miss reserves its slot under the
lock, marked *loading* (and pinned by the loader), then reads the backing store *outside* the
lock, so a prefetch's slow read never blocks the consumer's hits, then installs the record
under the lock. Anyone who needs a loading row (read, write, pin) waits for it, so a load can
never overwrite a newer write, and two threads never load the same row. Dirty victims are
written back under the lock before their slot is reused, so a row is never read from the
backing store while its newest value is still only in the cache. Writes to rows that are not
resident go straight to the backing store (under the lock, for the same reason). So the
lock is held for write-backs: on a disk table a copy into the page cache, which costs a disk
read only if the kernel has dropped the page (moving write-backs off the lock would need a
map of rows in transit; the benchmarks will tell whether it pays).

Typical training use: a prefetch thread calls `pin(next_rows)` while step n computes; the step
reads and updates its pinned rows, then `unpin`s them. The capacity must hold the rows pinned
at once (the current and the prefetched batch), else `pin` raises ValueError. A read of more
rows than half the capacity is served in chunks (pinned one chunk at a time).
Legend: C capacity (slots), N table rows, W record width, U rows in one call.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram.tables.base import ALL, RowStore, check_rows
from engram.tables.stores import pinning_available

_MAX_FREQ = 255  # counts are one byte per table row
_AGE_FACTOR = 10  # halve the counts every 10 x capacity accesses (TinyLFU's sample size)
_EMPTY = np.zeros(0, dtype=np.int64)
_EVICT_DIVISOR = 64  # a victim search frees at least 1/64 of the slots


class CachedStore(RowStore):
    """Up to `capacity` hot records of `backing` on `device` (default: the backing's device)."""

    kind = "cached"

    def __init__(
        self,
        backing: RowStore,
        capacity: int,
        device: str | torch.device | None = None,
        age_every: int | None = None,
    ) -> None:
        if not 1 <= capacity <= backing.num_rows:
            raise ValueError(f"capacity={capacity} must be in [1, {backing.num_rows}]")
        if age_every is not None and age_every < 1:
            raise ValueError(f"age_every={age_every} must be >= 1")
        super().__init__(backing.layout, backing.init, backing.device if device is None else device)
        self.backing, self.capacity = backing, capacity
        self.age_every = _AGE_FACTOR * capacity if age_every is None else age_every
        # Pinned host slots let reads feed asynchronous copies to the accelerator.
        self._pin_out = self.device.type == "cpu" and pinning_available()
        self._records = torch.zeros(
            capacity, self.layout.width, device=self.device, pin_memory=self._pin_out
        )
        self._slot_row = np.full(capacity, -1, dtype=np.int64)  # [C] row held, -1 = free
        # The free slots as a stack (slot 0 on top): a miss takes its slot in O(1), and the
        # O(C) victim search runs once per `evict_batch` evictions, not once per miss.
        self._free = np.arange(capacity - 1, -1, -1, dtype=np.int64)
        self._n_free = capacity
        self.evict_batch = max(1, capacity // _EVICT_DIVISOR)
        # [N] slot + 1 of each row, 0 = not resident. np.zeros is calloc'd: only the pages
        # holding entries of rows ever cached get allocated. Random rows soon touch every page,
        # though: with the counts below, a cache costs 5 bytes of RAM per *table* row (0.83 GB
        # for the 32 GB benchmark's 166.7M rows), about 2.6% of a 192-byte record.
        self._where = np.zeros(backing.num_rows, dtype=np.int32)
        self._freq = np.zeros(backing.num_rows, dtype=np.uint8)  # [N] access counts, calloc'd too
        self._pins = np.zeros(capacity, dtype=np.int32)
        self._loading = np.zeros(capacity, dtype=bool)
        self._dirty = np.zeros(capacity, dtype=bool)
        self._tick = np.zeros(capacity, dtype=np.int64)  # [C] clock of the last access
        self._clock = 0  # one tick per access call: recency for the tie-break
        self._since_aging = 0
        self._cond = threading.Condition()

    # ---- pinning -------------------------------------------------------------------------------
    def pin(self, rows: torch.Tensor) -> None:
        """Make sorted unique `rows` resident (loading the missing ones) and pin them."""
        self._check_open()
        check_rows(rows, self.num_rows)
        self._acquire(rows.cpu().numpy())

    def unpin(self, rows: torch.Tensor) -> None:
        """Release one pin of each of `rows`; RuntimeError (unbalanced pins: our bug) if one of
        them is not pinned."""
        check_rows(rows, self.num_rows)
        index = rows.cpu().numpy()
        with self._cond:
            slots = self._where[index].astype(np.int64) - 1
            bad = (slots < 0) | (self._pins[np.maximum(slots, 0)] <= 0)
            if bad.any():
                raise RuntimeError(f"row {int(index[bad][0])} is not pinned")
            self._pins[slots] -= 1

    @contextmanager
    def pinned(self, rows: torch.Tensor) -> Iterator[None]:
        """`with cache.pinned(rows):` the rows stay resident for the block."""
        self.pin(rows)
        try:
            yield
        finally:
            self.unpin(rows)

    def resident(self, rows: torch.Tensor) -> torch.Tensor:
        """Whether each of `rows` is in the cache (loaded or loading): [U] bool."""
        check_rows(rows, self.num_rows)
        with self._cond:
            return torch.from_numpy(self._where[rows.cpu().numpy()] > 0)

    def pin_counts(self, rows: torch.Tensor) -> torch.Tensor:
        """How many pins each of `rows` holds (0 if not resident): [U] int32."""
        check_rows(rows, self.num_rows)
        with self._cond:
            slots = self._where[rows.cpu().numpy()].astype(np.int64) - 1
            return torch.from_numpy(np.where(slots >= 0, self._pins[np.maximum(slots, 0)], 0))

    # ---- the RowStore primitives ----------------------------------------------------------------
    def _gather(self, rows: torch.Tensor, slot: str) -> torch.Tensor:
        # A read of more than half the capacity (a bulk export, a checkpoint check) goes chunk by
        # chunk, each pinned while copied, leaving room for the pinned working set.
        index = rows.cpu().numpy()
        step = max(1, self.capacity // 2)
        if index.size <= step:
            return self._gather_pinned(index, slot)
        parts = [self._gather_pinned(index[i : i + step], slot) for i in range(0, index.size, step)]
        return torch.cat(parts)

    def _gather_pinned(self, index: np.ndarray, slot: str) -> torch.Tensor:
        with self._cond:  # every row resident (a decode step, a prefetched batch): one lock
            where = self._where[index]
            if where.all():
                slots = where.astype(np.int64) - 1
                if not self._loading[slots].any():
                    self._touch(index, slots)
                    self._count(hits=int(index.size))
                    return self._copy_out(slots, slot)
        slots = self._acquire(index)  # pinned for the copy below
        with self._cond:
            out = self._copy_out(slots, slot)
            self._pins[slots] -= 1
        return out

    def _copy_out(self, slots: np.ndarray, slot: str) -> torch.Tensor:
        """The records' `slot` columns at `slots` (the caller holds the lock)."""
        source = self._records[:, self.layout.columns(slot)]
        at = torch.from_numpy(slots).to(self.device)
        if not self._pin_out:
            return source.index_select(0, at)
        out = torch.empty(slots.size, source.shape[1], pin_memory=True)
        return torch.index_select(source, 0, at, out=out)

    def _scatter(self, rows: torch.Tensor, slot: str, values: torch.Tensor) -> None:
        index = rows.cpu().numpy()
        with self._cond:
            slots = self._wait_loaded(index)
            hit = slots >= 0
            if hit.any():
                mask = torch.from_numpy(hit)
                target = self._records[:, self.layout.columns(slot)]
                hit_slots = torch.from_numpy(slots[hit]).to(self.device)
                target.index_copy_(0, hit_slots, values[mask.to(values.device)].to(self.device))
                self._dirty[slots[hit]] = True
            if not hit.all():  # write-through, under the lock: no load of these rows can overlap
                miss = torch.from_numpy(~hit)
                self.backing.write(rows.cpu()[miss], values[miss.to(values.device)], slot)

    # ---- residency -------------------------------------------------------------------------------
    def _wait_loaded(self, index: np.ndarray) -> np.ndarray:
        """Slots of `index` (-1 = not resident) once none of them is loading. Holds the lock."""
        while True:
            slots = self._where[index].astype(np.int64) - 1
            if not self._loading[slots[slots >= 0]].any():
                return slots
            self._cond.wait()

    def _acquire(self, index: np.ndarray) -> np.ndarray:
        """Pin every row of `index` (sorted unique), loading the missing ones; returns slots."""
        with self._cond:
            slots = self._wait_loaded(index)
            hit = slots >= 0
            self._pins[slots[hit]] += 1  # before choosing victims, so they cannot be chosen
            missing = index[~hit]
            try:
                fresh = self._reserve(missing) if missing.size else _EMPTY
            except BaseException:  # too few evictable slots, or a failed write-back
                self._pins[slots[hit]] -= 1
                raise
            slots[~hit] = fresh
            self._touch(index, slots)
            self._count(hits=int(hit.sum()), misses=int(missing.size))
        if missing.size:
            self._load(missing, fresh)
        return slots

    def _reserve(self, missing: np.ndarray) -> np.ndarray:
        """Give each missing row a slot, marked loading and pinned by the caller. Holds the lock."""
        k = missing.size
        if self._n_free < k:
            self._evict(k - self._n_free)
        slots = self._free[self._n_free - k : self._n_free][::-1].copy()
        self._n_free -= k
        self._slot_row[slots] = missing
        self._where[missing] = (slots + 1).astype(np.int32)
        self._loading[slots] = True
        self._pins[slots] = 1
        self._dirty[slots] = False
        return slots

    def _evict(self, need: int) -> None:
        """Free at least `need` slots (and up to `evict_batch`): the unpinned loaded rows of
        lowest (count, last use), dirty ones written back first. Holds the lock."""
        candidates = np.flatnonzero((self._slot_row >= 0) & (self._pins == 0) & ~self._loading)
        if candidates.size < need:
            busy = int(np.count_nonzero(self._pins))
            raise ValueError(
                f"cache of {self.capacity} rows cannot take {need + self._n_free} new rows: "
                f"{busy} are pinned or loading; the capacity must exceed the rows pinned at once"
            )
        n = min(candidates.size, max(need, self.evict_batch))
        freq = self._freq[self._slot_row[candidates]].astype(np.int64)
        key = (freq << 40) | self._tick[candidates]  # tick < 2^40: one per access call
        chosen = candidates[np.argpartition(key, n - 1)[:n]] if n < candidates.size else candidates
        dirty = chosen[self._dirty[chosen]]
        if dirty.size:
            self._write_back(dirty)  # before the slots are reused (see the module docstring)
        self._where[self._slot_row[chosen]] = 0
        self._slot_row[chosen] = -1
        self._free[self._n_free : self._n_free + n] = chosen
        self._n_free += n
        self._count(evictions=int(n))

    def _load(self, missing: np.ndarray, slots: np.ndarray) -> None:
        """Read reserved rows from the backing store (outside the lock) and install them."""
        try:
            records = self.backing.read(torch.from_numpy(missing), ALL)
        except BaseException:
            with self._cond:  # undo the reservation, wake the waiters, let them retry
                self._where[missing] = 0
                self._slot_row[slots] = -1
                self._loading[slots] = False
                self._pins[slots] = 0
                self._free[self._n_free : self._n_free + slots.size] = slots
                self._n_free += slots.size
                self._cond.notify_all()
            raise
        with self._cond:
            index = torch.from_numpy(slots).to(self.device)
            self._records.index_copy_(0, index, records.to(self.device))
            self._loading[slots] = False
            self._cond.notify_all()

    def _write_back(self, slots: np.ndarray) -> None:
        """Write dirty slots to the backing store, in row order. Holds the lock."""
        rows = self._slot_row[slots]
        order = np.argsort(rows)
        index = torch.from_numpy(slots[order]).to(self.device)
        self.backing.write(torch.from_numpy(rows[order]), self._records.index_select(0, index), ALL)
        self._dirty[slots] = False
        self._count(writebacks=int(slots.size))

    def _touch(self, index: np.ndarray, slots: np.ndarray) -> None:
        """Count one access of each row; halve every count each `age_every` accesses."""
        counts = self._freq[index]
        self._freq[index] = counts + (counts < _MAX_FREQ)  # saturating uint8 increment
        self._tick[slots] = self._clock
        self._clock += 1
        self._since_aging += index.size
        if self._since_aging >= self.age_every:
            # Only nonzero counts are written, so pages of never-read rows stay unallocated.
            np.right_shift(self._freq, 1, out=self._freq, where=self._freq > 0)
            self._since_aging = 0

    # ---- durability ------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write every dirty row back (they stay cached, now clean), then flush the backing."""
        if self._closed:
            return
        with self._cond:
            dirty = np.flatnonzero(self._dirty & ~self._loading)
            if dirty.size:
                self._write_back(dirty)
            self.backing.flush()

    def close(self) -> None:
        if not self._closed:
            super().close()
            self.backing.close()

    def save(self, path: Path) -> None:
        """Flush, then save the backing store: the checkpoint is the slow tier's format."""
        with self._cond:
            self.flush()
            self.backing.save(path)

    def load(self, path: Path) -> None:
        """Drop every cached row (none may be pinned), then load the backing store."""
        with self._cond:
            if self._pins.any() or self._loading.any():
                raise RuntimeError("cannot load into a cache with pinned or loading rows")
            held = np.flatnonzero(self._slot_row >= 0)
            self._where[self._slot_row[held]] = 0
            self._slot_row[:] = -1
            self._free[:] = np.arange(self.capacity - 1, -1, -1)
            self._n_free = self.capacity
            self._dirty[:] = False
            self.backing.load(path)

    def describe(self) -> dict[str, Any]:
        return {**self.backing.describe(), "cache_capacity": self.capacity}

    # ---- introspection ---------------------------------------------------------------------------
    @property
    def resident_rows(self) -> int:
        with self._cond:
            return int(np.count_nonzero(self._slot_row >= 0))

    @property
    def cache_bytes(self) -> int:
        return self._records.numel() * 4

    def check_invariants(self) -> None:
        """Assert the internal bookkeeping is consistent (for tests and debugging)."""
        with self._cond:
            held = np.flatnonzero(self._slot_row >= 0)
            rows = self._slot_row[held]
            assert np.unique(rows).size == rows.size, "a row occupies two slots"
            assert (self._where[rows] == held + 1).all(), "row -> slot map disagrees"
            assert np.count_nonzero(self._where) == held.size, "a row maps to a free slot"
            free = self._slot_row < 0
            assert not (self._pins[free].any() or self._dirty[free].any()), "free slot in use"
            stack = self._free[: self._n_free]
            assert np.unique(stack).size == stack.size == free.sum(), "free stack disagrees"
            assert (self._slot_row[stack] < 0).all(), "a held slot on the free stack"
            assert (self._pins >= 0).all() and (self._pins[self._loading] > 0).all()
