"""engram.tables' checkpoints: atomic commits of every placement, bit-identical resumes, crash
safety, deferred removal, and the packed files of disk tables (written rows only).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from table_helpers import INIT, PLACEMENTS, assert_same, ids, make_store

from engram import checkpoint
from engram.rowinit import RowInit
from engram.tables import packed
from engram.tables.base import ALL, RowStore, TableLayout
from engram.tables.lookup import lookup
from engram.tables.packed import PackedStore, write_packed
from engram.tables.placed import restore_tables, write_tables
from engram.tables.row_optim import RowAdagrad, RowAdam
from engram.tables.stores import DiskStore, HostStore, copy_sparse


# ---- checkpoints ---------------------------------------------------------------------------------
def _train(stores: dict[str, RowStore], opts: dict, steps: range) -> list[float]:
    """A toy problem: two tables looked up by step-seeded rows, fit to a fixed target."""
    losses = []
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        loss = torch.zeros(())
        looked = {}
        for name, store in stores.items():
            rows = torch.randint(0, 25, (4, 6, 2), generator=gen)
            looked[name] = lookup(store, rows, torch.tensor([0, 25]))
            loss = loss + ((looked[name].out.sum(-1) - 1.0) ** 2).mean()
        loss.backward()
        for name, store in stores.items():
            opts[name].step(store, *looked[name].grads(), lr=0.05)
        losses.append(loss.item())
    return losses


def _fresh(kind: str, folder: Path) -> tuple[dict[str, RowStore], dict]:
    folder.mkdir(parents=True, exist_ok=True)
    opts = {"a": RowAdam(betas=(0.9, 0.95)), "b": RowAdagrad()}
    stores = {n: make_store(kind, o.layout(50, 4), folder / n, 12) for n, o in opts.items()}
    return stores, opts


def _snapshot(stores: dict[str, RowStore]) -> dict[str, torch.Tensor]:
    return {n: s.read(torch.arange(s.num_rows), ALL) for n, s in stores.items()}


def save_tables(root: Path, step: int, stores: dict[str, RowStore], state: dict | None = None):
    """A checkpoint of tables alone, committed as the trainer commits its own."""
    return checkpoint.commit(
        root, step, lambda tmp: {"tables": write_tables(tmp, stores), "state": state or {}}
    )


def load_tables(path: Path, stores: dict[str, RowStore]) -> dict:
    folder = checkpoint.find_checkpoint(path)
    manifest = json.loads((folder / "manifest.json").read_text())
    restore_tables(folder, stores, manifest["tables"])
    return manifest


def _assert_snapshot(stores: dict[str, RowStore], expected: dict[str, torch.Tensor]) -> None:
    for name, snap in _snapshot(stores).items():
        assert_same(snap, expected[name])


@pytest.mark.parametrize("kind", ["host", "cached"])
def test_resume_is_bit_identical_and_crashes_keep_the_last_checkpoint(kind, tmp_path, monkeypatch):
    stores, opts = _fresh(kind, tmp_path / "straight")
    straight = _train(stores, opts, range(8))
    final = _snapshot(stores)

    stores, opts = _fresh(kind, tmp_path / "first")
    first = _train(stores, opts, range(4))
    state = {n: o.state_dict() for n, o in opts.items()}
    save_tables(tmp_path / "ckpt", 4, stores, state)
    at_4 = _snapshot(stores)
    _train(stores, opts, range(4, 6))
    for point in ("write_manifest", "_point_latest", "fsync_dir"):  # crash between the steps
        with monkeypatch.context() as patch:
            patch.setattr(checkpoint, point, _raise)
            with pytest.raises(RuntimeError, match="crash"):
                save_tables(tmp_path / "ckpt", 6, stores, {})
        assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step-0000004"
        assert not list((tmp_path / "ckpt").glob(".tmp-*"))

    dead = tmp_path / "ckpt" / ".tmp-killed"  # what a killed process leaves mid-checkpoint
    dead.mkdir()
    (dead / "a.table").write_bytes(b"half a table")
    unmoved = tmp_path / "ckpt" / ".latest-killed"  # ... or mid-way through moving `latest`
    unmoved.write_text("step-0000006\n")

    stores, opts = _fresh(kind, tmp_path / "resumed")
    manifest = load_tables(tmp_path / "ckpt", stores)
    assert manifest["step"] == 4
    _assert_snapshot(stores, at_4)
    for name, opt in opts.items():
        opt.load_state_dict(manifest["state"][name])
    resumed = _train(stores, opts, range(4, 6))
    save_tables(tmp_path / "ckpt", 6, stores, {})  # replaces the uncommitted step-6 leftover
    assert not dead.exists() and not unmoved.exists()
    at_6 = _snapshot(stores)
    resumed += _train(stores, opts, range(6, 8))
    assert first + resumed == straight
    _assert_snapshot(stores, final)
    save_tables(tmp_path / "ckpt", 8, stores, {})  # keep=2: prunes step 4
    names = sorted(p.name for p in (tmp_path / "ckpt").glob("step-*"))
    assert names == ["step-0000006", "step-0000008"]
    load_tables(tmp_path / "ckpt" / "step-0000006", stores)
    _assert_snapshot(stores, at_6)


def _raise(*args: object) -> None:
    raise RuntimeError("crash")


@pytest.mark.parametrize("kind", PLACEMENTS)
def test_checkpoint_restores_every_placement(kind, tmp_path):
    layout = RowAdam().layout(30, 2)
    store = make_store(kind, layout, tmp_path, capacity=5)
    store.write(ids(1, 2, 28), torch.randn(3, layout.width), ALL)
    saved = store.read(torch.arange(30), ALL)
    path = save_tables(tmp_path / "ckpt", 1, {"t": store})
    store.write(ids(0, 2, 3), torch.randn(3, layout.width), ALL)  # later changes
    load_tables(tmp_path / "ckpt", {"t": store})
    assert_same(store.read(torch.arange(30), ALL), saved)
    with pytest.raises(ValueError, match="latest"):
        save_tables(tmp_path / "ckpt", 1, {"t": store})
    with pytest.raises(ValueError, match="no table named"):
        load_tables(path, {"u": store})
    with pytest.raises(ValueError, match="layout"):
        load_tables(path, {"t": HostStore(TableLayout(30, 2), INIT)})
    if kind in ("disk", "cached"):
        assert (path / "t.table").stat().st_blocks * 512 < 64 << 10  # 3 rows: a few blocks


def test_remove_later_hides_at_once_and_frees_in_the_background(tmp_path):
    from engram.files import TRASH, remove_later, sweep_trash

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "layer1.table").write_bytes(b"x" * 10)
    worker = remove_later(folder)
    assert not folder.exists()  # gone for every reader before the delete finishes
    worker.join(timeout=10)
    assert not list(tmp_path.iterdir())
    assert remove_later(tmp_path / "missing") is None
    left = tmp_path / f"{TRASH}abc-step-0000001"  # what a process that exited first leaves
    left.mkdir()
    sweep_trash(tmp_path)
    for _ in range(100):
        if not left.exists():
            break
        time.sleep(0.05)
    assert not left.exists()


def test_disk_load_replaces_the_live_file_and_frees_the_old_one_later(tmp_path):
    layout = TableLayout(64, 4, ())
    live = DiskStore.create(tmp_path / "live.table", layout, INIT)
    live.write(torch.tensor([3]), torch.full((1, 4), 2.0))
    saved = tmp_path / "saved.table"
    live.save(saved)
    live.write(torch.tensor([3, 5]), torch.full((2, 4), 9.0))
    live.load(saved)
    assert live.read(torch.tensor([3, 5])).tolist() == [
        [2.0] * 4,
        INIT(torch.tensor([5]), 4)[0].tolist(),
    ]
    for _ in range(100):  # the old inode's second link goes away in the background
        if not list(tmp_path.glob(".trash-*")):
            break
        time.sleep(0.05)
    assert not list(tmp_path.glob(".trash-*"))
    live.close()


# ---- packed checkpoints of disk tables -----------------------------------------------------------
def written_disk_table(
    path: Path, rows: int = 5000
) -> tuple[DiskStore, torch.Tensor, torch.Tensor]:
    layout = RowAdam().layout(rows, 8)
    store = DiskStore.create(path, layout, INIT)
    written = torch.unique(
        torch.randint(0, rows, (300,), generator=torch.Generator().manual_seed(0))
    )
    values = torch.randn(written.numel(), layout.width)
    store.write(written, values, ALL)
    return store, written, values


def test_a_disk_checkpoint_packs_the_written_rows_only(tmp_path, monkeypatch):
    monkeypatch.setattr(packed, "_CHUNK_BYTES", 4096)  # many chunks on save and on load
    store, written, values = written_disk_table(tmp_path / "live.table")
    store.save(tmp_path / "ckpt.table")
    W = store.layout.width
    size = os.stat(tmp_path / "ckpt.table").st_size
    assert size < 1024 + written.numel() * (8 + 4 * W)  # the header and the written rows only
    with safe_open(tmp_path / "ckpt.table", framework="pt") as f:  # plain safetensors
        assert torch.equal(f.get_tensor("rows"), written)
        assert torch.equal(f.get_tensor("records"), values)
    every = torch.arange(store.num_rows)
    with PackedStore(tmp_path / "ckpt.table") as served:  # read in place: as the live table
        assert served.written_rows == written.numel()
        assert_same(served.read(every, ALL), store.read(every, ALL))
        with pytest.raises(ValueError, match="read-only"):
            served.write(written[:1], values[:1], ALL)
    store.write(written, torch.zeros_like(values), ALL)  # the live table moves on
    store.write(ids(0, 1, 2), torch.ones(3, W), ALL)
    store.load(tmp_path / "ckpt.table")  # and comes back, unwritten rows included
    with PackedStore(tmp_path / "ckpt.table") as served:
        assert_same(store.read(every, ALL), served.read(every, ALL))
    assert store.touched_rows == written.numel()
    store.close()


def test_a_checkpoint_from_before_packing_still_loads(tmp_path):
    store, written, values = written_disk_table(tmp_path / "live.table")
    store.flush()
    copy_sparse(tmp_path / "live.table", tmp_path / "old.table")  # what save wrote before
    store.write(written, torch.zeros_like(values), ALL)
    store.load(tmp_path / "old.table")
    assert_same(store.read(written, ALL), values)
    store.close()


def test_packed_files_are_checked(tmp_path):
    store, *_ = written_disk_table(tmp_path / "live.table")
    store.save(tmp_path / "ckpt.table")
    blob = (tmp_path / "ckpt.table").read_bytes()
    (tmp_path / "short.table").write_bytes(blob[:-4])
    with pytest.raises(ValueError, match="bytes, expected"):
        PackedStore(tmp_path / "short.table")
    (tmp_path / "junk.table").write_bytes(b"\x10" + blob[1:])
    with pytest.raises(ValueError, match="not a readable packed table"):
        PackedStore(tmp_path / "junk.table")
    other = DiskStore.create(tmp_path / "other.table", store.layout, RowInit(1, 1, 0.02))
    with pytest.raises(ValueError, match="init"):
        other.load(tmp_path / "ckpt.table")
    with pytest.raises(ValueError, match="ascending"):
        write_packed(tmp_path / "bad.table", store.layout, INIT, np.array([3, 1]), lambda i: i)
    store.close()
    other.close()
