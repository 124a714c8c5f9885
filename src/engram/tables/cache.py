"""A bounded hot-row cache in front of a slower store (host or disk), safe under prefetch.

`CachedStore(backing, capacity)` is itself a `RowStore`: the lookup and the row-wise optimisers
use it exactly like the store behind it. It keeps up to `capacity` whole records (value and
optimiser state) in one tensor, and writes dirty records back only when they are evicted or on
`flush`/`save` (write-back), so a row updated by every step costs no slow-tier write per step.

Eviction policy: LFU with aging, ties broken by least recent use. N-gram lookups are Zipfian: a
few rows are read by almost every batch, most rows once in a long while. Plain LRU lets each
batch's long tail of one-off rows push the hot rows out (scan pollution); plain LFU never
forgets rows that were hot long ago (a change of domain in the data). So each row has an
access count (a saturating byte): exact in its slot while the row is resident, and kept when it
is evicted in a count-min sketch, TinyLFU's frequency history, so a row that keeps coming back
builds its count across evictions; every `age_every` row accesses (default 10x the capacity,
TinyLFU's sample size) all counts are halved, the sketch's too, which turns them into a
frequency over a sliding horizon; and the victim is the resident row of lowest count, the least
recently used among equals (most of the tail has count 0 or 1, so among cold rows this is
LRU). Every miss is admitted: the batch needs the row now and its optimiser update follows.
Free slots are a stack, so a miss takes one in O(1); when it runs dry, one vectorised
`argpartition` over the slots (O(capacity)) evicts at least 1/64 of them at once
(`evict_batch`), so the search is paid once per capacity/64 misses rather than on every decode
step. Aging is O(capacity) every 10 x capacity accesses.

Memory is bounded by the capacity, never by the table (`bookkeeping_bytes`): besides the
records (C x W floats), each slot costs 27 bytes of slot arrays (its row, the free stack, count,
pins, flags, last use), 12 of row -> slot map (`_SlotMap`, a cuckoo hash table of 3 entries per
slot) and 16 of history (`_FrequencySketch`, 4 rows of 4 one-byte counters per slot): 55 bytes
per slot, 29% of a 192-byte record. The exact per-row count and row -> slot maps this replaced
cost 5 bytes per *table* row: 0.83 GB for 166.7M rows, 50 GB for 10^10. The sketch makes
the counts of evicted rows approximate (an estimate can only be too high, where other rows
share all of its counters). On the `demo` stream (bench/cache_hit_rate.py, the table at 1x and
16x) hit rates stay within 0.003 of the exact counts' with prefetch, within 0.007 for every
cache that holds one batch's rows, and drop by up to 0.023 for smaller caches, whose history
must cover ~10x more rows than they have slots. The price is time: a lookup hashes each row and
reads 3 candidate entries where a dense map read one, so the cache's bookkeeping takes 1.4-2.3x
as long on that stream (x16 and x1, prefetch) and 2-3x on small decode-sized calls.

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

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram.rowinit import splitmix64
from engram.tables.base import ALL, RowStore, check_rows
from engram.tables.stores import pinning_available

_MAX_FREQ = 255  # counts are saturating bytes
_AGE_FACTOR = 10  # halve the counts every 10 x capacity accesses (TinyLFU's sample size)
_EMPTY = np.zeros(0, dtype=np.int64)
_EVICT_DIVISOR = 64  # a victim search frees at least 1/64 of the slots
_FREE_ENTRY = -1  # a slot map entry that holds no slot
_MAP_CHOICES = 3  # candidate entries per row (H; three hashes are written out below)
_MAP_ENTRIES_PER_SLOT = 3  # the slot map is at most a third full
_SALT = np.uint64(0xD1B54A32D192ED03)  # an odd multiplier: a third hash from one mixed id
_MAP_MAX_ROUNDS = 500  # displacement rounds before an insertion gives up and rehashes
_MAP_REHASH_TRIES = 8
_MAP_KEPT = 4  # answers the slot map keeps for reuse: a step's pins, reads, writes, unpins
_HIGH = np.uint64(32)
_LOW_MASK = np.uint64(0xFFFFFFFF)
_SKETCH_SALTS = np.array(  # one odd multiplier per sketch row: four hashes of one mixed id
    [0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93],
    dtype=np.uint64,
)[:, None]
_SKETCH_COUNTERS_PER_SLOT = 4  # counters per sketch row, per slot
_SKETCH_MIN_WIDTH = 1024  # small caches keep an all but exact history for 4 KiB


def _fastrange(z: np.ndarray, size: int) -> np.ndarray:
    """Well-mixed uint64 `z` onto [0, size) by their top 32 bits (Lemire's multiply-shift)."""
    return ((z >> _HIGH) * np.uint64(size) >> _HIGH).astype(np.int64)


class _SlotMap:
    """Row -> slot of the resident rows in O(capacity) memory: a cuckoo hash table (Pagh and
    Rodler, "Cuckoo hashing", J. Algorithms 2004; H = 3 choices, Fotakis et al., "Space
    efficient hash tables with worst case constant access time", 2005) of int32 entries.

    The map has 3 parts of `capacity` entries; a row lives in one of its H = 3 candidate
    entries, one per part, all taken from one SplitMix64 of the row id. So a lookup of U rows
    is a fixed handful of vectorised gathers, with no probe loop whose length the unluckiest row
    would set (linear probing's longest chain costs a numpy pass per entry: about 3x slower
    here, measured). An entry holds only the slot; its row is `slot_row[slot]`, an array this
    map owns and the cache fills: a row's slot is set there before `insert` and cleared before
    `remove`. Free entries are -1, which indexes the sentinel -1 after the last slot, so a free
    entry never matches a row. Removal frees the entry: no tombstones.

    At most a third full (3-choice cuckoo hashing works up to 91%), most rows find a free
    candidate at once and the chains of displacements stay short: an insertion of 20 rows takes
    1.2 vectorised rounds on average (2.2 at half full, where the map would cost 8 bytes per
    slot instead of 12). A chain that runs too long (a cycle, rare) rebuilds the map from
    `slot_row` under a new hash seed. The cache's lock guards every call.
    """

    def __init__(self, capacity: int) -> None:
        self._slot_row_ext = np.full(capacity + 1, -1, dtype=np.int64)  # [C + 1]: sentinel
        self.slot_row = self._slot_row_ext[:capacity]  # [C] row held by each slot, -1 = free
        self._part = math.ceil(_MAP_ENTRIES_PER_SLOT * capacity / _MAP_CHOICES)
        self._entries = np.full(_MAP_CHOICES * self._part, _FREE_ENTRY, dtype=np.int32)
        self._part_start = np.arange(_MAP_CHOICES)[:, None] * self._part  # [H, 1]
        self._seed = np.uint64(0)
        self.live = 0
        self._version = 0  # one more at every change of the map
        self._kept: list[tuple[np.ndarray, np.ndarray, int, bool]] = []  # recent answers

    def _positions(self, rows: np.ndarray) -> np.ndarray:
        """The candidate entries of each of `rows`, one in each part: [H, U]."""
        mixed = splitmix64(rows.astype(np.uint64) ^ self._seed)
        hashes = np.empty((_MAP_CHOICES, rows.size), dtype=np.uint64)  # three 32-bit hashes
        np.right_shift(mixed, _HIGH, out=hashes[0])
        np.bitwise_and(mixed, _LOW_MASK, out=hashes[1])
        np.right_shift(np.multiply(mixed, _SALT, out=mixed), _HIGH, out=hashes[2])
        # Lemire's multiply-shift maps each onto [0, part), then into its part of the map.
        np.right_shift(np.multiply(hashes, np.uint64(self._part), out=hashes), _HIGH, out=hashes)
        positions = hashes.view(np.int64)  # < 2^32: the same bits
        positions += self._part_start
        return positions

    def find(self, rows: np.ndarray) -> np.ndarray:
        """The slot of each of `rows` [U], -1 where it is not resident.

        A training step looks its rows up four times (pin, read, write, unpin), with the
        prefetch's pin of the next batch in between: so the last few answers are kept, and one
        is reused for equal rows while it still holds: the map has not changed since, or every
        row was resident and `slot_row` still holds each at its slot (pinned rows never move).
        """
        for kept, slots, version, complete in self._kept:
            if np.array_equal(kept, rows) and (
                version == self._version
                or (complete and np.array_equal(self.slot_row[slots], rows))
            ):
                return slots.copy()
        slots = self._lookup(rows)
        self.keep(rows, slots)
        return slots

    def keep(self, rows: np.ndarray, slots: np.ndarray) -> None:
        """Remember that `rows` are at `slots` (-1: not resident) now, for `find`."""
        entry = (rows.copy(), slots.copy(), self._version, bool((slots >= 0).all()))
        self._kept = [entry, *self._kept[: _MAP_KEPT - 1]]

    def _lookup(self, rows: np.ndarray) -> np.ndarray:
        entries = np.take(self._entries, self._positions(rows))  # [H, U] (take: faster than [])
        match = np.take(self._slot_row_ext, entries) == rows
        return np.where(match, entries, -1).max(axis=0).astype(np.int64)  # one match at most

    def insert(self, rows: np.ndarray, slots: np.ndarray) -> None:
        """Map `rows` (none of them resident) to `slots`."""
        self.live += rows.size
        self._version += 1
        for _ in range(_MAP_REHASH_TRIES):
            if self._place(rows, slots):
                return
            self._seed = splitmix64(np.array([self._seed + np.uint64(1)]))[0]  # a fresh hash
            held = np.flatnonzero(self.slot_row >= 0)
            self._entries.fill(_FREE_ENTRY)
            rows, slots = self.slot_row[held], held
        raise AssertionError(f"cuckoo insertion failed {_MAP_REHASH_TRIES} times")

    def _place(self, rows: np.ndarray, slots: np.ndarray) -> bool:
        """Cuckoo insertion of all `rows` at once; False if displacements ran too long."""
        kick = np.zeros(slots.size, dtype=np.int64)  # the part to displace from if all are taken
        cand = self._positions(rows)  # [H, k]
        for _ in range(_MAP_MAX_ROUNDS):
            if not slots.size:
                return True
            free = self._entries[cand] < 0  # [H, k]
            # A free candidate first (most rows have one: short chains, few numpy passes).
            part = np.where(free[0], 0, np.where(free[1], 1, np.where(free[2], 2, kick)))
            pos = cand[part, np.arange(slots.size)]
            old = self._entries[pos]
            # Every row claims its entry; the one whose slot stands there won it and displaced
            # the occupant (the same for every claimant), which moves on and, if it must
            # displace in turn, does so in the next part. The losers try again, one part on.
            self._entries[pos] = slots
            won = self._entries[pos] == slots
            displaced = won & (old >= 0)
            moved = old[displaced].astype(np.int64)
            lost = ~won
            cand = cand[:, lost]
            if moved.size:
                cand = np.concatenate([cand, self._positions(self.slot_row[moved])], axis=1)
            slots = np.concatenate([slots[lost], moved])
            kick = np.concatenate([part[lost] + 1, part[displaced] + 1]) % _MAP_CHOICES
        return not slots.size

    def remove(self, rows: np.ndarray, slots: np.ndarray) -> None:
        """Unmap `rows`, which `slots` held (their `slot_row` already cleared)."""
        cand = self._positions(rows)
        held = self._entries[cand] == slots  # [H, k]
        at = np.where(held[0], cand[0], np.where(held[1], cand[1], cand[2]))
        assert (self._entries[at] == slots).all(), "removing a row that is not mapped"
        self._entries[at] = _FREE_ENTRY
        self.live -= rows.size
        self._version += 1

    def clear(self) -> None:
        self._entries.fill(_FREE_ENTRY)
        self.live = 0
        self._version += 1

    @property
    def nbytes(self) -> int:
        return self._entries.nbytes + self._slot_row_ext.nbytes

    def check(self, held: np.ndarray) -> None:
        """Assert the map holds exactly the slots `held` [resident], each once, findable."""
        mapped = np.sort(self._entries[self._entries >= 0])
        assert self.live == held.size and np.array_equal(mapped, held), "slot map disagrees"
        assert (self._lookup(self.slot_row[held]) == held).all(), "row -> slot map disagrees"


class _FrequencySketch:
    """The access counts of rows that left the cache: a count-min sketch (Cormode and
    Muthukrishnan 2005) of 4 rows of saturating uint8 counters, as TinyLFU keeps its history
    (Einziger, Friedman and Manes, "TinyLFU", ACM ToS 2017). A row's estimate is the least of
    its 4 counters, never below its true count and above it only where other rows share all 4.
    `record` raises each counter to at least the count it is given (the conservative update),
    `halve` ages every counter with the cache's own counts. A sketch row has 4 counters per
    cache slot (at least 1,024), measured on the `demo` stream at 1/8 of the table: 2 per slot
    cost 0.015 of hit rate against exact counts, 4 cost 0.003, 8 cost 0.001."""

    def __init__(self, capacity: int) -> None:
        self.width = width = max(_SKETCH_MIN_WIDTH, _SKETCH_COUNTERS_PER_SLOT * capacity)
        self._counts = np.zeros(len(_SKETCH_SALTS) * width, dtype=np.uint8)  # [4 x width]
        self._row_start = np.arange(len(_SKETCH_SALTS))[:, None] * width

    def _cells(self, rows: np.ndarray) -> np.ndarray:
        """The 4 counters of each of `rows`: [4, U] indexes into the flat counts."""
        mixed = splitmix64(rows.astype(np.uint64))  # sequential ids -> independent bits
        return _fastrange(mixed[None, :] * _SKETCH_SALTS, self.width) + self._row_start

    def estimate(self, rows: np.ndarray) -> np.ndarray:
        """[U] uint8 counts of `rows` (0 for rows never recorded, bar collisions)."""
        return self._counts[self._cells(rows)].min(axis=0)

    def record(self, rows: np.ndarray, counts: np.ndarray) -> None:
        """Raise the counters of `rows` to at least `counts` [U] uint8."""
        cells = self._cells(rows).ravel()
        counts = np.broadcast_to(counts, (len(_SKETCH_SALTS), counts.size)).ravel()
        # Rows that share a counter write it together and one write stands: the others raise
        # it again while it is below their count (np.maximum.at does this, 6x slower).
        while cells.size:
            self._counts[cells] = np.maximum(self._counts[cells], counts)
            low = self._counts[cells] < counts
            cells, counts = cells[low], counts[low]

    def halve(self) -> None:
        np.right_shift(self._counts, 1, out=self._counts)

    @property
    def nbytes(self) -> int:
        return self._counts.nbytes


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
        # Every array below is sized by the capacity, none by the table (see the docstring).
        self._map = _SlotMap(capacity)  # row -> slot of the resident rows
        self._slot_row = self._map.slot_row  # [C] row held, -1 = free (the map's own array)
        # The free slots as a stack (slot 0 on top): a miss takes its slot in O(1), and the
        # O(C) victim search runs once per `evict_batch` evictions, not once per miss.
        self._free = np.arange(capacity - 1, -1, -1, dtype=np.int32)
        self._n_free = capacity
        self.evict_batch = max(1, capacity // _EVICT_DIVISOR)
        self._freq = np.zeros(capacity, dtype=np.uint8)  # [C] access count of each slot's row
        self._history = _FrequencySketch(capacity)  # the counts of rows no longer resident
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
            slots = self._map.find(index)
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
            return torch.from_numpy(self._map.find(rows.cpu().numpy()) >= 0)

    def pin_counts(self, rows: torch.Tensor) -> torch.Tensor:
        """How many pins each of `rows` holds (0 if not resident): [U] int32."""
        check_rows(rows, self.num_rows)
        with self._cond:
            slots = self._map.find(rows.cpu().numpy())
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
            slots = self._map.find(index)
            if (slots >= 0).all() and not self._loading[slots].any():
                self._touch(slots)
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
            slots = self._map.find(index)
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
            self._map.keep(index, slots)  # for this step's reads, writes and unpin
            self._touch(slots)
            self._count(hits=int(hit.sum()), misses=int(missing.size))
        if missing.size:
            self._load(missing, fresh)
        return slots

    def _reserve(self, missing: np.ndarray) -> np.ndarray:
        """Give each missing row a slot, marked loading and pinned by the caller. Holds the lock."""
        k = missing.size
        if self._n_free < k:
            self._evict(k - self._n_free)
        slots = self._free[self._n_free - k : self._n_free][::-1].astype(np.int64)
        self._n_free -= k
        self._slot_row[slots] = missing
        self._map.insert(missing, slots)
        self._freq[slots] = self._history.estimate(missing)  # its count when it last left
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
        freq = self._freq[candidates].astype(np.int64)
        key = (freq << 40) | self._tick[candidates]  # tick < 2^40: one per access call
        chosen = candidates[np.argpartition(key, n - 1)[:n]] if n < candidates.size else candidates
        dirty = chosen[self._dirty[chosen]]
        if dirty.size:
            self._write_back(dirty)  # before the slots are reused (see the module docstring)
        rows = self._slot_row[chosen]
        counts = self._freq[chosen]
        keep = counts > 0
        self._history.record(rows[keep], counts[keep])  # the count outlives the eviction
        self._slot_row[chosen] = -1
        self._map.remove(rows, chosen)
        self._free[self._n_free : self._n_free + n] = chosen
        self._n_free += n
        self._count(evictions=int(n))

    def _load(self, missing: np.ndarray, slots: np.ndarray) -> None:
        """Read reserved rows from the backing store (outside the lock) and install them."""
        try:
            records = self.backing.read(torch.from_numpy(missing), ALL)
        except BaseException:
            with self._cond:  # undo the reservation, wake the waiters, let them retry
                self._slot_row[slots] = -1
                self._map.remove(missing, slots)
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

    def _touch(self, slots: np.ndarray) -> None:
        """Count one access of each slot's row; halve every count each `age_every` accesses."""
        counts = self._freq[slots]
        self._freq[slots] = counts + (counts < _MAX_FREQ)  # saturating uint8 increment
        self._tick[slots] = self._clock
        self._clock += 1
        self._since_aging += slots.size
        if self._since_aging >= self.age_every:  # resident and past rows age alike
            np.right_shift(self._freq, 1, out=self._freq)
            self._history.halve()
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
            self._history.record(self._slot_row[held], self._freq[held])
            self._slot_row[:] = -1
            self._map.clear()
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

    @property
    def bookkeeping_bytes(self) -> int:
        """Host RAM of everything but the records (slot arrays, slot map, history sketch):
        O(capacity), whatever the size of the table behind the cache."""
        arrays = (self._free, self._freq, self._pins, self._loading, self._dirty, self._tick)
        return sum(a.nbytes for a in arrays) + self._map.nbytes + self._history.nbytes

    def check_invariants(self) -> None:
        """Assert the internal bookkeeping is consistent (for tests and debugging)."""
        with self._cond:
            held = np.flatnonzero(self._slot_row >= 0)
            rows = self._slot_row[held]
            assert np.unique(rows).size == rows.size, "a row occupies two slots"
            self._map.check(held)
            free = self._slot_row < 0
            assert not (self._pins[free].any() or self._dirty[free].any()), "free slot in use"
            stack = self._free[: self._n_free]
            assert np.unique(stack).size == stack.size == free.sum(), "free stack disagrees"
            assert (self._slot_row[stack] < 0).all(), "a held slot on the free stack"
            assert (self._pins >= 0).all() and (self._pins[self._loading] > 0).all()
