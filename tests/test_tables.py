"""engram.tables: row stores (device, host, disk, hot-row cache), deterministic init, row-wise
optimisers and the differentiable lookup. Every placement must give the bits an `nn.Embedding`
gives; every comparison of floats here is exact unless a comment says why. Checkpoints of tables:
test_table_checkpoints.py.
"""

from __future__ import annotations

import errno
import math
import os
import queue
import threading
import time

import numpy as np
import pytest
import torch
from table_helpers import INIT, PLACEMENTS, assert_same, ids, make_store
from torch import nn

from engram.module import HashedMemory
from engram.rowinit import _GOLDEN, _MASK64, RowInit, splitmix64, splitmix64_int
from engram.tables.base import ALL, VALUE, TableLayout, initial_records
from engram.tables.cache import CachedStore
from engram.tables.lookup import lookup
from engram.tables.row_optim import RowAdagrad, RowAdam, make_row_optimizer
from engram.tables.stores import DeviceStore, DiskStore, HostStore, copy_sparse, file_size


# ---- deterministic init --------------------------------------------------------------------------
def test_init_is_box_muller_of_the_splitmix64_stream():
    # The published SplitMix64 sequence from seed 0 starts e220a8397b1dcdaf, 6e789e6aa1b965f4.
    assert splitmix64_int(0) == 0xE220A8397B1DCDAF
    assert splitmix64_int(_GOLDEN) == 0x6E789E6AA1B965F4
    xs = [0, 1, 2**63 - 1, 2**63, _MASK64, 123456789123456789]
    out = splitmix64(np.array(xs, dtype=np.uint64))
    assert [int(v) for v in out] == [splitmix64_int(x) for x in xs]
    row, col, dim = 1234, 5, 7  # col 5 is the sine of pair 2; ceil(7 / 2) = 4 pairs per row
    k = 2 * (row * 4 + 2)
    z1 = splitmix64_int((INIT.key + k * _GOLDEN) & _MASK64)
    z2 = splitmix64_int((INIT.key + (k + 1) * _GOLDEN) & _MASK64)
    u1, u2 = ((z1 >> 11) + 1) * 2.0**-53, (z2 >> 11) * 2.0**-53
    expected = math.sqrt(-2 * math.log(u1)) * math.sin(2 * math.pi * u2)
    assert INIT(ids(row), dim)[0, col].item() == np.float32(expected)


def test_init_statistics():
    values = RowInit(seed=3, table_id=0, std=0.5)(torch.arange(12_500), 8).double() / 0.5
    # 1e5 values: standard errors 0.0032 (mean), 0.0022 (std), 0.0015 (P|x|<1); bounds ~6 se.
    assert values.numel() == 100_000 and abs(values.mean()) < 0.02
    assert abs(values.std() - 1) < 0.015
    assert abs((values.abs() < 1).double().mean() - 0.6827) < 0.01
    cos_sin = torch.corrcoef(torch.stack([values[:, 0], values[:, 1]]))[0, 1]
    next_row = torch.corrcoef(torch.stack([values[:-1, 2], values[1:, 2]]))[0, 1]
    assert abs(cos_sin) < 0.02 and abs(next_row) < 0.03  # 1/sqrt(12500) = 0.009


def test_init_depends_on_the_row_only():
    full = INIT(torch.arange(1000), 6)
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    assert_same(INIT(perm, 6), full[perm])
    assert_same(INIT(ids(999, 3, 3), 6), full[[999, 3, 3]])
    assert not torch.equal(RowInit(7, 2, 1.0)(torch.arange(10), 6), full[:10])
    assert not torch.equal(RowInit(8, 1, 1.0)(torch.arange(10), 6), full[:10])
    assert torch.equal(RowInit(7, 1, 0.0)(ids(5), 6), torch.zeros(1, 6))
    with pytest.raises(ValueError, match="std=-1"):
        RowInit(0, 0, -1.0)(ids(0), 2)
    with pytest.raises(ValueError, match="-4"):
        INIT(ids(-4), 2)
    with pytest.raises(ValueError, match="int64"):
        INIT(torch.tensor([1.0]), 2)


# ---- the store interface -------------------------------------------------------------------------
def test_layout_columns_and_validation():
    layout = RowAdam().layout(10, 4)
    assert layout.width == 12 and layout.nbytes == 10 * 12 * 4
    assert layout.columns(VALUE) == slice(0, 4) and layout.columns("exp_avg_sq") == slice(8, 12)
    assert TableLayout.from_json(layout.to_json()) == layout
    with pytest.raises(ValueError, match="'nope'"):
        layout.columns("nope")
    with pytest.raises(ValueError, match="num_rows=0"):
        TableLayout(0, 4).validate()
    with pytest.raises(ValueError, match="unique"):
        TableLayout(3, 4, (("m", 4), ("m", 4))).validate()


@pytest.mark.parametrize("kind", PLACEMENTS)
def test_store_rejects_misuse(kind, tmp_path):
    store = make_store(kind, RowAdam().layout(10, 4), tmp_path)
    cases = [
        (lambda: store.read(ids(3, 1)), "id 1 follows 3"),  # shows the offending pair
        (lambda: store.read(ids(1, 1)), "sorted and unique"),
        (lambda: store.read(ids(10)), "row id 10 is out of range"),
        (lambda: store.read(ids(-1)), "row id -1"),
        # Unsorted ids are range-checked in full, not at their ends only.
        (lambda: store.read(ids(2, 10, 3)), "row id 10 is out of range"),
        (lambda: store.read(ids(2, -5, 3)), "row id -5"),
        (lambda: store.read(torch.tensor([1], dtype=torch.int32)), "int64"),
        (lambda: store.read(ids(1, 2).view(1, 2)), "1-D"),
        (lambda: store.write(ids(1, 2), torch.zeros(2, 5)), r"\[2, 4\]"),
        (lambda: store.write(ids(1), torch.zeros(1, 4, dtype=torch.float64)), "float32"),
        (lambda: store.read(ids(1), "m"), "'m'"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    store.close()
    with pytest.raises(ValueError, match="closed"):
        store.read(ids(1))


@pytest.mark.parametrize("kind", PLACEMENTS)
def test_placements_behave_like_a_dense_tensor(kind, tmp_path):
    """Random reads and writes of every slot agree with a plain tensor (a cache of 8 rows evicts
    and writes back constantly here)."""
    layout = RowAdam().layout(40, 3)
    store = make_store(kind, layout, tmp_path)
    reference = torch.zeros(40, layout.width)
    reference[:, :3] = INIT(torch.arange(40), 3)  # untouched rows read as init, zero state
    gen = torch.Generator().manual_seed(1)
    for _ in range(60):
        rows = torch.randperm(40, generator=gen)[: int(torch.randint(1, 8, (1,), generator=gen))]
        rows = rows.sort().values
        slot = [VALUE, ALL, "exp_avg", "exp_avg_sq"][int(torch.randint(4, (1,), generator=gen))]
        cols = layout.columns(slot)
        if torch.rand(1, generator=gen) < 0.5:
            values = torch.randn(rows.numel(), cols.stop - cols.start, generator=gen)
            store.write(rows, values, slot)
            reference[rows, cols] = values
        assert_same(store.read(rows, slot), reference[rows, cols])
    store.flush()
    assert_same(store.read(torch.arange(40), ALL), reference)
    stats = store.stats
    assert stats.read_calls == 61 and stats.rows_read >= 40 and stats.write_calls > 10
    if kind == "cached":
        assert stats.evictions > 0 and stats.writebacks > 0 and 0 < stats.hit_rate < 1


def test_disk_table_far_larger_than_what_it_costs(tmp_path):
    layout = RowAdam().layout(1 << 22, 64)  # 3 GiB of records
    path = tmp_path / "big.table"
    store = DiskStore.create(path, layout, INIT)
    try:
        if store.allocated_bytes > 5 << 20:  # more than the touched map (4 MiB) and header
            pytest.skip("this filesystem does not create sparse files")
        assert os.stat(path).st_size > 3 << 30
        # 4 runs of 1024 rows (3 MiB) and 32 lone rows, spread over the whole file. Few extents:
        # freeing each one costs a synchronous discard on some mounts, so deletion stays fast.
        runs = [torch.arange(start, start + 1024) for start in (1 << 10, 1 << 20, 1 << 21, 3 << 20)]
        lone = torch.arange(1 << 16, 1 << 22, 1 << 17)
        rows = torch.cat([*runs, lone]).sort().values
        values = torch.randn(rows.numel(), layout.width)
        store.write(rows, values, ALL)
        store.flush()
        # 3 MiB of runs, a 4 KiB block per lone row, and the touched map (4 MiB, reserved whole
        # when the file is opened for writing: a first write can then never meet a hole there)
        written = store.allocated_bytes
        assert 7 << 20 < written < 9 << 20, f"{written} bytes allocated"
        far = ids(3, (1 << 22) - 1)  # never written: their init, zero state, no blocks
        assert_same(store.read(far), INIT(far, 64))
        assert store.touched_rows == rows.numel() == 4096 + 32 and not store.touched(far).any()
        store.close()
        reopened = DiskStore(path)
        assert_same(reopened.read(rows, ALL), values)
        reopened.close()
        copied = copy_sparse(path, tmp_path / "copy.table")  # only the data extents
        assert copied < 9 << 20 and os.stat(tmp_path / "copy.table").st_blocks * 512 < 9 << 20
        with DiskStore(tmp_path / "copy.table") as copy:
            assert copy.touched_rows == rows.numel()
            assert_same(copy.read(rows, ALL), values)
    finally:
        for name in ("big.table", "copy.table"):
            (tmp_path / name).unlink(missing_ok=True)


def test_a_full_disk_under_a_disk_table_is_an_error_naming_it(tmp_path, monkeypatch):
    """A row's first write goes through write(2), not the mapping (where a page the file system
    cannot allocate would be a SIGBUS): a full disk is an OSError naming the file, and rows it
    did not write still read as before. tests/test_faults.py fills a real disk."""
    layout = TableLayout(1001, 3)  # the records end mid-page
    path = tmp_path / "t.table"
    rows, values = torch.tensor([0, 500, 1000]), torch.ones(3, layout.width)
    with DiskStore.create(path, layout, INIT) as store:
        store.write(rows[:1], values[:1], ALL)
        with monkeypatch.context() as patch:

            def no_space(*args: object) -> None:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            patch.setattr(os, "pwrite", no_space)
            with pytest.raises(OSError) as refused:
                store.write(rows, values * 2, ALL)
            assert refused.value.errno == errno.ENOSPC and refused.value.filename == str(path)
            assert store.touched(rows).tolist() == [True, False, False]
            fresh = torch.from_numpy(initial_records(layout, INIT, rows[1:].numpy()))
            assert_same(store.read(rows[1:], ALL), fresh)
            store.write(rows[:1], values[:1] * 3, ALL)  # a row written before: no new block
            assert_same(store.read(rows[:1], ALL), values[:1] * 3)
        store.write(rows, values, ALL)
        assert os.stat(path).st_size == file_size(layout)
    with DiskStore(path) as reopened:
        assert_same(reopened.read(rows, ALL), values)


def test_disk_table_files_are_checked(tmp_path):
    DiskStore.create(tmp_path / "t.table", TableLayout(5, 2), INIT).close()
    with pytest.raises(ValueError, match="exists"):
        DiskStore.create(tmp_path / "t.table", TableLayout(5, 2), INIT)
    (tmp_path / "junk").write_bytes(b"not a table")
    with pytest.raises(ValueError, match="not an engram disk table"):
        DiskStore(tmp_path / "junk")
    other = DiskStore.create(tmp_path / "o.table", TableLayout(6, 2), INIT)
    with pytest.raises(ValueError, match="layout"):
        other.load(tmp_path / "t.table")


def test_a_read_only_disk_table_reads_and_never_writes(tmp_path):
    layout = RowAdam().layout(50, 4)
    with DiskStore.create(tmp_path / "t.table", layout, INIT) as live:
        live.write(ids(3, 7), torch.randn(2, layout.width), ALL)
        expected = live.read(torch.arange(50), ALL)
    before = (tmp_path / "t.table").read_bytes()
    table = CachedStore(DiskStore(tmp_path / "t.table", read_only=True), 8)
    assert_same(table.read(torch.arange(50), ALL), expected)  # written rows and init rows
    with pytest.raises(ValueError, match="read-only"):
        table.backing.write(ids(1), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="read-only"):
        table.backing.load(tmp_path / "t.table")
    table.flush()
    table.close()
    assert (tmp_path / "t.table").read_bytes() == before


# ---- the hot-row cache ---------------------------------------------------------------------------
def test_cache_writes_dirty_rows_back_on_eviction_and_flush(tmp_path):
    disk = DiskStore.create(tmp_path / "t.table", TableLayout(20, 2), INIT)
    cache = CachedStore(disk, capacity=4)
    cache.read(ids(0, 1, 2, 3))
    cache.write(ids(0, 1, 2, 3), torch.ones(4, 2))
    assert_same(disk.read(ids(0, 1)), INIT(ids(0, 1), 2))  # write-back: the disk waits
    cache.read(ids(4, 5, 6, 7))  # evicts all four dirty rows
    assert_same(disk.read(ids(0, 1, 2, 3)), torch.ones(4, 2))
    assert cache.stats.evictions == 4 and cache.stats.writebacks == 4
    cache.write(ids(4, 5), torch.full((2, 2), 2.0))
    cache.write(ids(9), torch.full((1, 2), 3.0))  # not resident: written through
    assert_same(disk.read(ids(9)), torch.full((1, 2), 3.0))
    cache.flush()
    assert_same(disk.read(ids(4, 5)), torch.full((2, 2), 2.0))
    cache.flush()  # clean now: nothing more to write
    assert cache.stats.writebacks == 6
    cache.check_invariants()


def test_cache_never_evicts_pinned_rows(tmp_path):
    cache = CachedStore(HostStore(TableLayout(20, 2), INIT), capacity=4)
    with cache.pinned(ids(0, 1, 2)):
        cache.read(ids(10))
        cache.read(ids(11))  # evicts 10, not a pinned row
        assert cache.resident(ids(0, 1, 2)).all() and cache.pin_counts(ids(0, 1)).tolist() == [1, 1]
        with pytest.raises(ValueError, match="3 are pinned"):
            cache.read(ids(12, 13))  # two new rows, one evictable slot
        assert cache.resident(ids(0, 1, 2)).all()
    assert cache.pin_counts(ids(0, 1, 2)).tolist() == [0, 0, 0]
    with pytest.raises(RuntimeError, match="row 1 is not pinned"):
        cache.unpin(ids(1))
    cache.read(ids(12, 13, 14, 15))  # unpinned now: all four slots are free to take
    cache.check_invariants()


def test_cache_keeps_hot_rows_through_a_scan_and_forgets_them_with_age(tmp_path):
    cache = CachedStore(HostStore(TableLayout(400, 2), INIT), capacity=16)  # ages every 160
    hot = torch.arange(8)
    for _ in range(200):  # counts 200 without aging; ~40 with it (20 reads per aging period)
        cache.read(hot)
    for start in range(100, 200, 4):  # 100 one-off rows: LRU would have dropped the hot rows
        cache.read(torch.arange(start, start + 4))
    assert cache.resident(hot).all() and cache.stats.evictions >= 90
    new = torch.arange(300, 316)
    for _ in range(60):  # a new working set: the old counts must age away for it to stay
        cache.read(new[:8])
        cache.read(new[8:])
    assert cache.resident(new).all() and not cache.resident(hot).any()
    cache.check_invariants()


class GatedStore(HostStore):
    """A host store whose reads wait for `gate` while `gated`: holds a cache load in flight."""

    def __init__(self, layout: TableLayout) -> None:
        super().__init__(layout, INIT)
        self.gated, self.gate, self.entered = False, threading.Event(), threading.Event()

    def _gather(self, rows: torch.Tensor, slot: str) -> torch.Tensor:
        if self.gated:
            self.entered.set()
            assert self.gate.wait(10)
        return super()._gather(rows, slot)


@pytest.mark.parametrize("action", ["read", "write"])
def test_cache_access_waits_for_a_load_in_flight(action):
    """A prefetch loading row 5 must neither be overwritten by nor hand out its unloaded slot."""
    backing = GatedStore(TableLayout(10, 2))
    cache = CachedStore(backing, capacity=4)
    backing.gated = True
    loader = threading.Thread(target=cache.pin, args=(ids(5),))
    loader.start()
    assert backing.entered.wait(10)  # the load is in flight, its slot reserved
    result: list[torch.Tensor] = []
    if action == "read":
        other = threading.Thread(target=lambda: result.append(cache.read(ids(5))))
    else:
        other = threading.Thread(target=cache.write, args=(ids(5), torch.full((1, 2), 9.0)))
    other.start()
    other.join(0.2)
    assert other.is_alive(), "the access did not wait for the load"
    backing.gated = False
    backing.gate.set()
    loader.join(10)
    other.join(10)
    expected = INIT(ids(5), 2) if action == "read" else torch.full((1, 2), 9.0)
    assert_same(result[0] if result else cache.read(ids(5)), expected)
    cache.unpin(ids(5))
    cache.check_invariants()


class SlowStore(HostStore):
    """A host store with the latency of a slow tier, to widen every race window: 2 ms per
    read, or with `seed` a random 0-4 ms (seeded), so that each seed is another schedule."""

    def __init__(self, layout: TableLayout, init: RowInit, seed: int | None = None) -> None:
        super().__init__(layout, init)
        self.delays = None if seed is None else np.random.default_rng(1000 + seed)
        self.lock = threading.Lock()

    def _gather(self, rows: torch.Tensor, slot: str) -> torch.Tensor:
        if self.delays is None:
            time.sleep(0.002)
        else:
            with self.lock:
                delay = float(self.delays.uniform(0, 0.004))
            time.sleep(delay)
        return super()._gather(rows, slot)


@pytest.mark.parametrize("seed", range(6))
def test_prefetch_thread_and_consumer_thread(seed):
    """The prefetch thread pins batch i+1 (and reads stray rows) while the consumer updates
    batch i and peeks at batch i+1 (perhaps mid-load): pinned rows stay resident, and the
    consumer never sees a stale value. Each seed draws other batches, other slow-tier delays
    and other compute times: another interleaving of the two threads."""
    num_rows, batch = 256, 16
    backing = SlowStore(TableLayout(num_rows, 4), INIT, seed=seed)
    # Pinned at once: the consumer's batch, the queued one, the one being pinned, a stray read
    # and the consumer's peek: at most 5 x 16 rows.
    cache = CachedStore(backing, capacity=80)
    rng = np.random.default_rng(seed)
    compute = np.random.default_rng(2000 + seed)
    zipf = 1.0 / np.arange(1, num_rows + 1)
    zipf /= zipf.sum()
    batches = [np.sort(rng.choice(num_rows, batch, replace=False, p=zipf)) for _ in range(60)]
    expected = INIT(torch.arange(num_rows), 4)  # written by the consumer only
    ready: queue.Queue = queue.Queue(maxsize=1)
    errors: list[BaseException] = []

    def prefetch() -> None:
        try:
            for rows in batches:
                cache.pin(torch.from_numpy(rows))
                ready.put(rows, timeout=30)  # blocks while the consumer is one batch behind
                stray = np.sort(rng.choice(num_rows, 8, replace=False))
                cache.read(torch.from_numpy(stray))  # eviction pressure during the step
        except BaseException as e:
            errors.append(e)
            ready.put(None)

    threading.Thread(target=prefetch, daemon=True).start()
    for i in range(len(batches)):
        rows_np = ready.get(timeout=30)
        assert rows_np is not None, errors
        rows = torch.from_numpy(rows_np)
        assert cache.resident(rows).all() and (cache.pin_counts(rows) >= 1).all()
        assert_same(cache.read(rows), expected[rows])
        new = expected[rows] * 0.5 + i
        cache.write(rows, new)
        expected[rows] = new
        time.sleep(compute.uniform(0, 0.006))  # the step, while batch i+1 loads and others evict
        peek = torch.from_numpy(batches[min(i + 1, len(batches) - 1)])
        assert_same(cache.read(peek), expected[peek])  # waits for a load in flight
        assert cache.resident(rows).all()
        assert_same(cache.read(rows), new)
        cache.unpin(rows)
        cache.check_invariants()
    assert not errors, errors
    cache.flush()
    assert_same(backing.read(torch.arange(num_rows)), expected)
    assert cache.stats.evictions > 100 and cache.stats.writebacks > 50


# ---- row-wise optimisers -------------------------------------------------------------------------
def _step_batches(num_rows: int, dim: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randperm(num_rows, generator=gen)[:6].sort().values for _ in range(steps)]
    return [(r, torch.randn(6, dim, generator=gen)) for r in rows]


def test_row_adam_matches_plain_adam_on_touched_rows(tmp_path):
    opt, lr, (b1, b2), eps = RowAdam(betas=(0.9, 0.95)), 0.05, (0.9, 0.95), 1e-8
    store = make_store("cached", opt.layout(20, 3), tmp_path, capacity=6)
    p = INIT(torch.arange(20), 3).double()
    m, v = torch.zeros(20, 3, dtype=torch.float64), torch.zeros(20, 3, dtype=torch.float64)
    for t, (rows, g) in enumerate(_step_batches(20, 3, 5), start=1):
        before = store.read(torch.arange(20), ALL)
        opt.step(store, rows, g, lr)
        g = g.double()  # textbook Adam in float64 on the touched rows only
        m[rows] = b1 * m[rows] + (1 - b1) * g
        v[rows] = b2 * v[rows] + (1 - b2) * g * g
        p[rows] -= lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m[rows] / (v[rows].sqrt() + eps)
        after = store.read(torch.arange(20), ALL)
        untouched = torch.ones(20, dtype=torch.bool).index_fill_(0, rows, False)
        assert_same(after[untouched], before[untouched])  # rows and state, bit for bit
        # fp32 against float64: a few ulps of rounding per step, relative 1e-6 covers it.
        ref = torch.cat([p, m, v], dim=1).float()
        torch.testing.assert_close(after, ref, rtol=1e-6, atol=1e-7)
    assert opt.steps == 5


def test_row_adam_is_sparse_adam_bit_for_bit(tiny_spec):
    """A real Engram table: nn.Embedding(sparse=True) + SparseAdam == store + lookup + RowAdam.

    Duplicate rows here occur at most twice: SparseAdam sums them by `coalesce` and the lookup
    by the embedding backward, and a sum of two floats does not depend on the order."""
    memory = HashedMemory(tiny_spec, layer_id=0, table_init_std=1.0)
    N, r = memory.table.num_embeddings, tiny_spec.row_dim
    memory.table.weight.data.copy_(INIT(torch.arange(N), r))
    memory.table.sparse = True
    sparse_adam = torch.optim.SparseAdam([memory.table.weight], lr=0.01, betas=(0.9, 0.95))
    opt = RowAdam(betas=(0.9, 0.95))
    store = HostStore(opt.layout(N, r), INIT)
    gen = torch.Generator().manual_seed(2)
    primes = torch.tensor(tiny_spec.layer_primes(0))
    for _ in range(4):
        rows = (torch.rand(2, 9, len(primes), generator=gen) * primes).long()
        rows[:, 1:3] = rows[:, :2]  # repeated N-grams: duplicate rows within the batch
        weights = torch.randn(2, 9, tiny_spec.d_mem, generator=gen)
        ref = memory.lookup(rows)
        (ref.tanh() * weights).sum().backward()
        sparse_adam.step()
        sparse_adam.zero_grad()
        got = lookup(store, rows, memory.offsets)
        assert_same(got.out, ref)
        (got.out.tanh() * weights).sum().backward()
        opt.step(store, *got.grads(), lr=0.01)
    state = sparse_adam.state[memory.table.weight]
    dense = torch.cat([memory.table.weight.detach(), state["exp_avg"], state["exp_avg_sq"]], 1)
    assert_same(store.read(torch.arange(N), ALL), dense)


def test_row_adagrad_matches_plain_reference():
    opt, lr = RowAdagrad(), 0.1
    store = HostStore(opt.layout(20, 3), INIT)
    p, acc = INIT(torch.arange(20), 3).double(), torch.zeros(20, 1, dtype=torch.float64)
    for rows, g in _step_batches(20, 3, 4):
        opt.step(store, rows, g, lr)
        g = g.double()
        acc[rows] += (g * g).mean(dim=1, keepdim=True)
        p[rows] -= lr * g / (acc[rows].sqrt() + 1e-10)
        # fp32 against float64: relative 1e-6 covers a few roundings per step.
        torch.testing.assert_close(
            store.read(torch.arange(20), ALL), torch.cat([p, acc], 1).float(), rtol=1e-6, atol=1e-7
        )


def test_row_optimizer_misuse_and_state():
    opt = make_row_optimizer("adam", betas=(0.9, 0.95))
    store = HostStore(opt.layout(5, 2), INIT)
    cases = [
        (lambda: opt.step(store, ids(1), torch.zeros(1, 2), -1e-3), "lr=-0.001"),
        (lambda: opt.step(store, ids(1), torch.zeros(1, 2), float("nan")), "lr=nan"),
        (lambda: opt.step(store, ids(1), torch.zeros(2, 2), 0.1), r"\[1, 2\]"),
        (lambda: opt.step(store, ids(2, 1), torch.zeros(2, 2), 0.1), "sorted"),
        (lambda: RowAdagrad().step(store, ids(1), torch.zeros(1, 2), 0.1), "state slots"),
        (lambda: make_row_optimizer("sgd"), "'sgd'"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert opt.steps == 0  # failed calls counted no step
    opt.step(store, ids(1), torch.ones(1, 2), 0.1)
    (fresh := RowAdam(betas=(0.9, 0.95))).load_state_dict(opt.state_dict())
    assert fresh.steps == 1
    with pytest.raises(ValueError, match="'adam'"):
        RowAdagrad().load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="betas"):
        RowAdam().load_state_dict(opt.state_dict())


# ---- the lookup ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", PLACEMENTS)
def test_lookup_is_embedding_bit_for_bit(kind, tmp_path):
    sizes, dim = [31, 37, 29], 8
    offsets = torch.tensor([0, 31, 68])
    store = make_store(kind, RowAdam().layout(97, dim), tmp_path, capacity=64)
    table = nn.Embedding(97, dim)
    table.weight.data.copy_(INIT(torch.arange(97), dim))
    gen = torch.Generator().manual_seed(0)
    rows = torch.stack([torch.randint(0, s, (2, 5), generator=gen) for s in sizes], dim=-1)
    rows[1, 3:] = rows[0, :2]  # duplicates across the batch
    weights = torch.randn(2, 5, 3 * dim, generator=gen)
    ref = table(rows + offsets).flatten(-2)
    (ref.tanh() * weights).sum().backward()
    got = lookup(store, rows, offsets)
    (got.out.tanh() * weights).sum().backward()
    assert_same(got.out, ref)
    uniq, grads = got.grads()
    assert_same(uniq, torch.unique(rows + offsets))
    assert_same(grads, table.weight.grad[uniq])
    assert torch.count_nonzero(table.weight.grad.abs().sum(1)) == uniq.numel()
    with torch.no_grad():
        assert not lookup(store, rows, offsets).values.requires_grad
    with pytest.raises(ValueError, match="no gradient"):
        lookup(store, rows, offsets).grads()
    with pytest.raises(ValueError, match="H = 2"):
        lookup(store, rows, offsets[:2])
    with pytest.raises(ValueError, match="out of range"):
        lookup(store, rows + 100, offsets)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an accelerator")
def test_pinned_host_rows_to_accelerator_match_device_store():
    layout, rows = TableLayout(50, 4), torch.tensor([[[1, 7], [7, 9]]])
    host, device = HostStore(layout, INIT), DeviceStore(layout, INIT, "cuda")
    assert host.pinned and host.read(ids(1, 7)).is_pinned()
    offsets = torch.tensor([0, 25])
    a = lookup(host, rows, offsets, device="cuda").out
    b = lookup(device, rows.cuda(), offsets.cuda()).out
    assert_same(a, b)
