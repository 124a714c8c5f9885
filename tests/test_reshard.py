"""Checkpoints of row-sharded tables read at any world size (`engram.tables.reshard`): every
rank's shard written into one folder as a multi-rank run does, then restored at another world
size (or unsharded) in every placement, bit for bit; incomplete or inconsistent checkpoints are
refused; a sharded run loads for inference as one model. No process group is needed: each
rank's `PlacedTables` is built in this process with its `ShardGroup` (group None)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from small_runs import small_config

from engram.checkpoint import file_digests, read_manifest, write_manifest
from engram.cli import main
from engram.inference.load import inference_plan, load_trained
from engram.module import HashedMemory, lazy_tables
from engram.tables.base import ALL, initial_records
from engram.tables.cache import CachedStore
from engram.tables.placed import PlacedTables
from engram.tables.plan import LayerPlacement, TablePlan
from engram.tables.reshard import JoinedStore
from engram.tables.row_optim import make_row_optimizer
from engram.tables.sharded import RowShards, ShardGroup
from engram.tables.stores import DiskStore, HostStore
from engram.train import train

PLANS = {
    "device": TablePlan(optimizer="adagrad"),  # a device row store, sharded or not (adam embeds)
    "host": TablePlan(placement="host"),
    "disk": TablePlan(placement="disk"),
    "disk+cache": TablePlan(placement="disk", cache_rows=64),
}
STEPS = 7  # the row optimisers' step count every rank saves


def _memory(spec) -> HashedMemory:
    torch.manual_seed(0)  # every rank draws the same table seed: the same init
    with lazy_tables():
        return HashedMemory(spec, 0, 1.0)


def _ranks(spec, plan: TablePlan, folder: Path, world: int | None) -> list[PlacedTables]:
    """One `PlacedTables` per rank of `world` (None: one unsharded)."""
    groups = [None] if world is None else [ShardGroup(r, world) for r in range(world)]
    return [PlacedTables([_memory(spec)], plan, folder, sharding=g) for g in groups]


def _range(tables: PlacedTables) -> tuple[int, int]:
    """(first global row, rows) of the table `tables` holds."""
    store = tables.tables["layer0"].store
    if tables.sharding is None:
        return 0, store.num_rows
    shards = RowShards(tables.tables["layer0"].shards.num_rows, tables.sharding.world)
    return shards.start(tables.sharding.rank), shards.size(tables.sharding.rank)


def _reference(spec, plan: TablePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(every row's record [N, W] as saved, the global rows written [n]): every third row
    holds distinct known values and optimiser state, the others are still their init."""
    memory, num_rows = _memory(spec), spec.layer_rows(0)
    layout = make_row_optimizer(plan.optimizer).layout(num_rows, spec.row_dim)
    records = torch.from_numpy(initial_records(layout, memory.init, torch.arange(num_rows).numpy()))
    written = torch.arange(1, num_rows, 3)
    gen = torch.Generator().manual_seed(5)
    records[written] = torch.randn(written.numel(), layout.width, generator=gen)
    return records, written


def _save(spec, plan, folder: Path, world: int | None, steps=None) -> dict:
    """Write the reference rows into each rank's shard, save every rank into `folder/ckpt`, and
    merge the manifest entries as rank 0 does."""
    records, written = _reference(spec, plan)
    merged: dict = {"entries": {}, "optimizers": {}}
    for rank, tables in enumerate(_ranks(spec, plan, folder / "live", world)):
        table = tables.tables["layer0"]
        start, size = _range(tables)
        mine = written[(written >= start) & (written < start + size)]
        table.store.write(mine - start, records[mine], ALL)
        state = table.optimizer.state_dict()
        table.optimizer.load_state_dict({**state, "steps": (steps or {}).get(rank, STEPS)})
        saved = tables.write(folder / "ckpt")
        merged["entries"] |= saved["entries"]
        merged["optimizers"] |= saved["optimizers"]
        tables.close()
    return merged


def _restored(spec, plan, folder: Path, manifest: dict, world: int | None) -> list:
    """Each rank of `world` after restoring `folder/ckpt`, from stores first filled with rows of
    their own (a previous run's): (tables, its rows [n, W] with state)."""
    out = []
    for tables in _ranks(spec, plan, folder / f"resumed-{world}", world):
        store = tables.tables["layer0"].store
        every = torch.arange(store.num_rows)
        store.write(every, torch.full((store.num_rows, store.layout.width), 9.0), ALL)
        tables.restore(folder / "ckpt", manifest)
        out.append((tables, store.read(every, ALL)))
    return out


# (saved world, restored world); None: unsharded
WORLDS = [(2, None), (2, 3), (None, 4), (3, 2), (2, 2), (None, None)]


@pytest.mark.parametrize("placement", list(PLANS))
@pytest.mark.parametrize("saved_world, world", WORLDS)
def test_a_checkpoint_restores_at_any_world_size(
    tiny_spec, tmp_path, placement, saved_world, world
):
    plan = PLANS[placement]
    manifest = _save(tiny_spec, plan, tmp_path, saved_world)
    records, written = _reference(tiny_spec, plan)
    covered = 0
    for tables, rows in _restored(tiny_spec, plan, tmp_path, manifest, world):
        start, size = _range(tables)
        assert torch.equal(rows, records[start : start + size])  # unwritten rows: their init
        assert tables.tables["layer0"].optimizer.steps == STEPS
        store = tables.tables["layer0"].store
        backing = store.backing if isinstance(store, CachedStore) else store
        if isinstance(backing, DiskStore):  # rebuilt sparse: only the written rows hold blocks
            mine = int(((written >= start) & (written < start + size)).sum())
            assert backing.touched_rows == mine
        covered += size
        tables.close()
    assert covered == tiny_spec.layer_rows(0)


def test_entries_name_their_table_and_rows(tiny_spec, tmp_path):
    manifest = _save(tiny_spec, PLANS["host"], tmp_path, 3)
    num_rows = tiny_spec.layer_rows(0)
    shards = RowShards(num_rows, 3)
    for rank in range(3):
        entry = manifest["entries"][f"layer0.rank{rank}-of-3"]
        assert entry["table"] == "layer0"
        assert entry["shard"] == {
            "rank": rank,
            "world": 3,
            "start": shards.start(rank),
            "rows": shards.size(rank),
            "table_rows": num_rows,
        }
    whole = _save(tiny_spec, PLANS["host"], tmp_path / "whole", None)
    assert whole["entries"]["layer0"]["table"] == "layer0"
    assert "shard" not in whole["entries"]["layer0"]


def test_a_manifest_from_before_shards_still_restores(tiny_spec, tmp_path):
    manifest = _save(tiny_spec, PLANS["disk"], tmp_path, None)
    del manifest["entries"]["layer0"]["table"]  # as written before entries named their table
    records, _ = _reference(tiny_spec, PLANS["disk"])
    for tables, rows in _restored(tiny_spec, PLANS["disk"], tmp_path, manifest, 2):
        start, size = _range(tables)
        assert torch.equal(rows, records[start : start + size])
        tables.close()


@pytest.mark.parametrize("world", [2, 3])
def test_a_missing_shard_file_is_refused(tiny_spec, tmp_path, world):
    manifest = _save(tiny_spec, PLANS["disk"], tmp_path, 2)
    (tmp_path / "ckpt/layer0.rank1-of-2.table").unlink()
    with pytest.raises(ValueError, match=r"layer0\.rank1-of-2\.table is missing"):
        _restored(tiny_spec, PLANS["disk"], tmp_path, manifest, world)


def test_a_missing_entry_is_refused(tiny_spec, tmp_path):
    manifest = _save(tiny_spec, PLANS["host"], tmp_path, 3)
    del manifest["entries"]["layer0.rank1-of-3"]  # a rank that never finished its part
    with pytest.raises(ValueError, match=r"rank\(s\) \[1\] are missing"):
        _restored(tiny_spec, PLANS["host"], tmp_path, manifest, 2)
    with pytest.raises(ValueError, match=r"no table named 'layer0'"):
        _restored(tiny_spec, PLANS["host"], tmp_path, {"entries": {}, "optimizers": {}}, 2)


def test_mismatched_or_missing_optimizer_states_are_refused(tiny_spec, tmp_path):
    manifest = _save(tiny_spec, PLANS["host"], tmp_path, 2, steps={1: STEPS + 1})
    with pytest.raises(ValueError, match="different optimiser states of layer0"):
        _restored(tiny_spec, PLANS["host"], tmp_path, manifest, 3)
    del manifest["optimizers"]["layer0.rank1-of-2"]
    with pytest.raises(ValueError, match=r"no row-optimiser state for layer0\.rank1-of-2"):
        _restored(tiny_spec, PLANS["host"], tmp_path, manifest, None)


def test_a_refused_restore_changes_no_store(tiny_spec, tmp_path):
    manifest = _save(tiny_spec, PLANS["host"], tmp_path, 2, steps={1: STEPS + 1})
    tables = PlacedTables([_memory(tiny_spec)], PLANS["host"], tmp_path, sharding=ShardGroup(0, 3))
    store = tables.tables["layer0"].store
    before = store.read(torch.arange(store.num_rows), ALL)
    with pytest.raises(ValueError, match="different optimiser states"):
        tables.restore(tmp_path / "ckpt", manifest)
    assert torch.equal(store.read(torch.arange(store.num_rows), ALL), before)
    assert tables.tables["layer0"].optimizer.steps == 0
    tables.close()


def test_shards_of_disk_tables_read_in_place_as_one_table(tiny_spec, tmp_path):
    """What inference does with a sharded run's disk table: no copy, reads of global rows."""
    plan = PLANS["disk+cache"]
    manifest = _save(tiny_spec, plan, tmp_path, 3)
    records, _ = _reference(tiny_spec, plan)
    saved = {p: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    tables = PlacedTables([_memory(tiny_spec)], plan, tmp_path / "ckpt", read_only=True)
    tables.restore(tmp_path / "ckpt", manifest)
    joined = tables.tables["layer0"].store.backing
    assert isinstance(joined, JoinedStore) and len(joined.parts) == 3
    rows = torch.tensor([0, 1, 2, 1353, 1354, 1355, 2707, 2708, 4060, 4061])  # across edges
    assert torch.equal(joined.read(rows, ALL), records[rows])
    assert torch.equal(joined.read(torch.arange(records.shape[0]), ALL), records)
    assert tables.tables["layer0"].optimizer.steps == STEPS
    with pytest.raises(ValueError, match="read-only"):
        joined.write(torch.tensor([0]), torch.zeros(1, joined.dim))
    joined.save(tmp_path / "joined.table")  # saved as one unsharded table would be
    with DiskStore.create(tmp_path / "one.table", joined.layout, joined.init) as one:
        one.load(tmp_path / "joined.table")
        assert torch.equal(one.read(torch.arange(records.shape[0]), ALL), records)
    tables.close()
    assert {p: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == saved
    (tmp_path / "ckpt/layer0.rank2-of-3.table").unlink()
    with pytest.raises(ValueError, match=r"ranks \[0, 1\] of world \[3\]"):
        PlacedTables([_memory(tiny_spec)], plan, tmp_path / "ckpt", read_only=True)


def test_inference_plan_stores_embedded_tables_saved_as_shards():
    plan = TablePlan(layers=(LayerPlacement(layer=2, placement="disk", path="/nvme"),))
    moved = inference_plan(plan, sharded=[1, 2])
    assert moved.for_layer(1).placement == "host" and moved.for_layer(2).placement == "disk"
    assert moved.for_layer(2).path == "" and moved.for_layer(3).embedded
    assert inference_plan(plan) == inference_plan(plan, sharded=[])


# ---- a sharded run, loaded for inference ------------------------------------------------------
def _shard_run(out: Path, world: int) -> None:
    """Rewrite `out`'s checkpoint as a run on `world` ranks saves it: each table as shards, one
    file per rank in tables/, the merged entries in the manifest, and no table in the model's
    weights (a shard is never a parameter)."""
    ckpt = Path(read_manifest(out)["path"])
    manifest = json.loads((ckpt / "manifest.json").read_text())
    merged: dict = {"entries": {}, "optimizers": {}}
    for rank in range(world):
        trained = load_trained(out, device="cpu")  # its memories: embeddings or placed rows
        tables = PlacedTables(
            trained.model.engram_layers,
            trained.config.tables,
            out / f"live{rank}",
            betas=(trained.config.optim.beta1, trained.config.optim.beta2),
            sharding=ShardGroup(rank, world),
        )
        if "tables" in manifest:
            tables.restore(ckpt / "tables", manifest["tables"])  # 1 -> world, the code under test
        saved = tables.write(ckpt / "tables.sharded")
        merged["entries"] |= saved["entries"]
        merged["optimizers"] |= saved["optimizers"]
        tables.close()
    shutil.rmtree(ckpt / "tables", ignore_errors=True)
    (ckpt / "tables.sharded").rename(ckpt / "tables")
    weights = load_file(ckpt / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".table." not in k}, ckpt / "model.safetensors")
    files = file_digests(ckpt)  # the rewritten files' digests, as a commit records them
    write_manifest(ckpt, {**manifest, "tables": merged, "files": files})


RUN_PLANS = {
    "device": [],
    "host": ["tables.placement=host"],
    "disk+cache": ["tables.placement=disk", "tables.cache_rows=2000"],
}


@pytest.mark.parametrize("placement", list(RUN_PLANS))
def test_a_sharded_run_loads_as_one_model(stdlib_corpus, tmp_path, placement):
    out = tmp_path / "run"
    cfg = small_config(stdlib_corpus(40), out, "steps=2", "eval_every=2", *RUN_PLANS[placement])
    train(cfg)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_trained(out, device="cpu").model(ids)
    _shard_run(out, world=2)
    trained = load_trained(out, device="cpu")
    with torch.no_grad():
        assert torch.equal(trained.model(ids), want)
    memory = trained.model.engram_layers[0]
    if placement == "device":  # restored from its shards, then the embedding the plan has
        assert not trained.tables and memory.table is not None
    elif placement == "host":
        assert isinstance(trained.tables.tables["layer1"].store, HostStore)
    else:
        assert isinstance(trained.tables.tables["layer1"].store.backing, JoinedStore)


def test_engram_eval_reads_a_sharded_run(stdlib_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    plan = ["tables.placement=disk", "tables.cache_rows=2000"]
    train(small_config(stdlib_corpus(40), out, "steps=2", "eval_every=2", *plan))
    assert main(["eval", "--ckpt", str(out), "--device", "cpu"]) == 0
    want = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["val_loss"]
    _shard_run(out, world=3)
    assert main(["eval", "--ckpt", str(out), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["val_loss"] == want


def test_live_shards_of_another_world_size_are_removed(tiny_spec, tmp_path):
    """A run resumed at a new world size drops the old world's live disk files (their rows came
    back from the checkpoint), and never a current rank's."""
    old = _ranks(tiny_spec, PLANS["disk"], tmp_path, 4) + _ranks(
        tiny_spec, PLANS["disk"], tmp_path, None
    )
    for tables in old:
        tables.close()
    new = _ranks(tiny_spec, PLANS["disk"], tmp_path, 2)
    names = {p.name for p in tmp_path.glob("*.table")}
    assert len(names) == 4 + 1 + 2
    removed = new[0].remove_stale()
    assert {p.name for p in removed} == names - {f"layer0.rank{r}-of-2.table" for r in range(2)}
    assert {p.name for p in tmp_path.glob("layer0*.table")} == {  # (trash is hidden)
        f"layer0.rank{r}-of-2.table" for r in range(2)
    }
    for tables in new:
        tables.close()
