"""Training with Engram tables placed by a `TablePlan`: the same model in every placement,
prefetch through a hot-row cache, checkpoints with table files, exact resume, bad plans."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from small_runs import small_config

from engram.assembly import build_model, get_tokenizer
from engram.checkpoint import read_manifest
from engram.cli import main
from engram.config import TrainConfig
from engram.inference.load import load_trained
from engram.module import lazy_tables
from engram.tables import CachedStore, DiskStore, placed
from engram.tables.lookup import fetch
from engram.tables.packed import PackedStore
from engram.tables.placed import PlacedTables
from engram.tables.plan import LayerPlacement, TablePlan
from engram.train import Run, train


@pytest.fixture(scope="module")
def corpus(stdlib_corpus):
    return stdlib_corpus(40)


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def config(corpus, out, *overrides: str) -> TrainConfig:
    return small_config(corpus, out, "steps=6", "eval_every=3", "eval_tokens=1024", *overrides)


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def final_table(run_dir: Path) -> torch.Tensor:
    """Layer 1's table after training, read through whatever placement the run used."""
    model = load_trained(run_dir).model
    memory = model.engram_layers[0]
    rows = torch.arange(memory.spec.layer_rows(memory.layer_id))
    H = memory.spec.heads_total
    with torch.no_grad():  # one row of head 0 per "position": read the whole table back
        e = memory.lookup(torch.stack([rows] + [torch.zeros_like(rows)] * (H - 1), -1)[None])
    return e[0, :, : memory.spec.row_dim].clone()


PLANS = {
    "host": ["tables.placement=host"],
    "disk": ["tables.placement=disk"],
    "disk+cache": ["tables.placement=disk", "tables.cache_rows=2000"],
}


def test_every_placement_trains_like_the_device(corpus, tmp_path):
    """Same seed, same data. Every row store (host, disk, disk behind a cache) runs the same
    arithmetic: bit-identical losses and rows. The embedding + SparseAdam path sums a row's
    duplicate gradients in another order (SparseAdam coalesces), so it agrees to rounding."""
    runs = {}
    for name in ("device", "host", "disk", "disk+cache"):
        summary = train(config(corpus, tmp_path / name, "log_every=1", *PLANS.get(name, [])))
        runs[name] = (summary["val_loss"], losses(tmp_path / name), final_table(tmp_path / name))
    for name in ("disk", "disk+cache"):
        assert runs[name][:2] == runs["host"][:2], name
        assert torch.equal(runs[name][2], runs["host"][2]), name
    val, curve, table = runs["host"]
    assert val == pytest.approx(runs["device"][0], rel=1e-5)
    assert curve == pytest.approx(runs["device"][1], rel=1e-5)
    # Adam turns a rounding difference in a near-zero gradient into an O(lr) step: a handful of
    # elements differ visibly (measured: under 0.5% with the MoE's per-expert loop, 0.72% with
    # its sorted dispatch, whose gradients differ from the loop's by 2e-13), the rest agree to
    # float rounding. A lost or misplaced row differs in all of its elements.
    torch.testing.assert_close(table, runs["device"][2], rtol=0, atol=1e-3)
    assert (table - runs["device"][2]).abs().gt(1e-6).float().mean() < 0.01
    manifest = read_manifest(tmp_path / "disk+cache")
    assert set(manifest["tables"]["entries"]) == {"layer1"}
    assert manifest["tables"]["optimizers"]["layer1"]["steps"] == 6


def test_tables_leave_the_model_and_its_checkpoint(corpus, tmp_path):
    run = Run(config(corpus, tmp_path / "run", "tables.placement=disk"))
    try:
        memory = run.model.engram_layers[0]
        assert memory.table is None and memory.row_source is not None
        names = [n for n, _ in run.model.named_parameters()]
        assert not any("table" in n for n in names)
        assert "tables" not in run.optim.named  # the row optimiser steps it instead
        assert (tmp_path / "run/tables/layer1.table").is_file()
    finally:
        run.close()


def test_a_trained_disk_table_is_read_in_place_read_only(corpus, tmp_path):
    out = tmp_path / "run"
    train(config(corpus, out, "tables.placement=disk", "tables.cache_rows=2000", "steps=2"))
    ckpt = Path(read_manifest(out)["path"])
    saved = (ckpt / "tables/layer1.table").read_bytes()
    model = load_trained(out).model
    disk = model.engram_layers[0].row_source.store.backing
    assert isinstance(disk, PackedStore) and disk.path == ckpt / "tables/layer1.table"  # no copy
    with torch.no_grad():
        model(torch.randint(0, 300, (4, 80)))
    with pytest.raises(ValueError, match="read-only"):
        disk.write(torch.tensor([0]), torch.zeros(1, disk.dim))
    del model  # closes the mapping
    assert (ckpt / "tables/layer1.table").read_bytes() == saved


def test_placed_tables_become_embeddings_only_if_they_fit(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(config(corpus, out, "tables.placement=disk", "tables.cache_rows=2000", "steps=2"))
    trained = load_trained(out)
    model = trained.model
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        expected = model(ids)
    monkeypatch.setattr(placed.os, "sysconf", lambda name: 1)  # one byte of free RAM
    with pytest.raises(ValueError, match="cannot become embeddings"):
        trained.tables.embed()
    monkeypatch.undo()
    trained.tables.embed()
    assert not model._rows_hooks and not trained.tables  # nothing left to fetch ahead
    assert model.engram_layers[0].table is not None
    with torch.no_grad():
        assert torch.equal(model(ids), expected)


def test_adagrad_row_optimiser_differs_and_resumes(corpus, tmp_path):
    plan = ["tables.optimizer=adagrad"]  # a device RowStore: not the embedding any more
    adam = train(config(corpus, tmp_path / "adam"))
    full = train(config(corpus, tmp_path / "full", *plan))
    assert full["val_loss"] != adam["val_loss"]
    train(config(corpus, tmp_path / "half", *plan, "steps=3"))
    resumed = train(config(corpus, tmp_path / "half", *plan), resume=True)
    assert resumed["val_loss"] == full["val_loss"]


def test_disk_cache_run_resumes_exactly_with_prefetch(corpus, tmp_path):
    plan = ["tables.placement=disk", "tables.cache_rows=2000"]
    full = train(config(corpus, tmp_path / "full", "log_every=1", *plan))
    train(config(corpus, tmp_path / "half", "log_every=1", *plan, "steps=3"))
    # The live table moves on after the checkpoint: resume must restore the checkpoint's rows.
    live = DiskStore(tmp_path / "half/tables/layer1.table")
    live.write(torch.tensor([0, 1]), torch.full((2, live.dim), 7.0))
    live.close()
    resumed = train(config(corpus, tmp_path / "half", "log_every=1", *plan), resume=True)
    assert resumed["val_loss"] == full["val_loss"]
    assert losses(tmp_path / "half") == losses(tmp_path / "full")


def test_prefetch_pins_batch_ahead_and_releases_everything(corpus, tmp_path):
    run = Run(config(corpus, tmp_path / "run", "tables.placement=host", "tables.cache_rows=2000"))
    try:
        store = run.tables.tables["layer1"].store
        assert isinstance(store, CachedStore)
        batches = iter(run.loader)
        ahead = run.tables.pin_ahead(next(batches))
        for _ in range(3):
            batch, pins = ahead.result()
            ahead = run.tables.pin_ahead(next(batches))  # the next batch, while this one trains
            ids = pins[0][1]
            assert bool(store.pin_counts(ids).ge(1).all())  # resident while this batch trains
            run.train_step(batch)
            run.tables.release(pins)
        run.tables.release(ahead.result()[1])  # the batch pinned but never trained
        store.check_invariants()
        assert int(store._pins.sum()) == 0
        assert store.stats.hits > 0
    finally:
        run.close()


def test_a_cache_smaller_than_a_batch_fails_clearly(corpus, tmp_path):
    cfg = config(corpus, tmp_path / "run", "tables.placement=host", "tables.cache_rows=8")
    with pytest.raises(ValueError, match="cache of 8 rows"):
        train(cfg)


def test_bad_plans_are_rejected(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"tables\.placement='ssd'"):
        config(corpus, tmp_path, "tables.placement=ssd").validate()
    with pytest.raises(ValueError, match="a device table needs no cache"):
        config(corpus, tmp_path, "tables.cache_rows=4").validate()
    plan = TablePlan(layers=(LayerPlacement(layer=7, placement="host"),))
    tok = get_tokenizer("bpe:400", str(corpus))
    with lazy_tables():
        model, _ = build_model(config(corpus, tmp_path).model, tok, "t.json")
    with pytest.raises(ValueError, match=r"names layer\(s\) \[7\]"):
        PlacedTables(model.engram_layers, plan, tmp_path)


def test_a_trained_embedding_converts_into_a_store(corpus, tmp_path):
    """A model built with its table (e.g. trained on the device) keeps its rows when placed."""
    tok = get_tokenizer("bpe:400", str(corpus))
    model, _ = build_model(config(corpus, tmp_path).model, tok, "t.json")
    memory = model.engram_layers[0]
    with torch.no_grad():
        memory.table.weight.mul_(3.0)
    rows = torch.randint(0, 50, (2, 5, memory.spec.heads_total))
    want = memory.lookup(rows)
    tables = PlacedTables(model.engram_layers, TablePlan(placement="disk"), tmp_path / "t")
    try:
        assert torch.equal(memory.lookup(rows), want)
    finally:
        tables.close()


def test_cli_trains_a_disk_table_and_evaluates_it(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    args = [f"data={corpus}", f"out_dir={out}", "tokenizer=bpe:400", "seq_len=32"]
    args += ["batch_size=4", "steps=2", "eval_tokens=512", "progress=false"]
    assert main(["train", *args, "tables.placement=disk", "tables.cache_rows=2000"]) == 0
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(out)]) == 0
    assert "val_loss" in capsys.readouterr().out
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["tables"]["placement"] == "disk"


def test_per_layer_entries_override_the_default(corpus, tmp_path):
    cfg = config(corpus, tmp_path / "run", "tables.placement=host")
    cfg = replace(cfg, tables=replace(cfg.tables, layers=(LayerPlacement(layer=1),)))
    run = Run(cfg)
    try:
        assert not run.tables  # layer 1, the only table, is back on the device
        assert run.model.engram_layers[0].table is not None
    finally:
        run.close()


def test_inference_fetches_each_forward_ahead_and_leaves_nothing_pinned(
    corpus, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    train(config(corpus, out, "tables.placement=disk", "tables.cache_rows=2000", "steps=2"))
    trained = load_trained(out)
    model, table = trained.model, trained.tables.tables["layer1"]
    assert trained.tables.fetches_ahead(training=False) == ["layer1"]
    fetches = count_fetches(monkeypatch)
    ids = torch.randint(0, 300, (4, 80))  # 4 x 80 x 4 heads: above PREFETCH_MIN_LOOKUPS
    with torch.no_grad():
        first = model(ids)
        assert fetches == [[4, 80, 4]]
        trained.tables.fetch(model.hash(ids), training=False)  # a forward that stopped early
        assert table.inflight is not None
        again = model(ids)
        step = model(ids[:, :1])  # a decode-sized forward reads through the cache directly
        assert table.inflight is None
    assert torch.equal(first, again)
    assert torch.equal(step, model(ids[:, :1]))
    store = table.store
    store.check_invariants()
    assert int(store._pins.sum()) == 0 and store.stats.hits > 0
    trained.tables._stop_fetching()  # the same logits without the fetch ahead
    assert not model._rows_hooks
    with torch.no_grad():
        assert torch.equal(model(ids), first)


def count_fetches(monkeypatch) -> list[list[int]]:
    """The shapes of the ids every fetch ahead reads, as it happens."""
    calls: list[list[int]] = []

    def counted(store, ids, device, stream):
        calls.append(list(ids.shape))
        return fetch(store, ids, device, stream)

    monkeypatch.setattr(placed, "fetch", counted)
    return calls


def test_training_with_rows_fetched_ahead_is_unchanged(corpus, tmp_path, monkeypatch):
    """What an accelerator does with host or disk tables (read a forward's rows in a thread,
    copy them on a side stream), forced on the CPU: the same losses and rows to the bit."""
    plan = ["log_every=1", *PLANS["disk+cache"]]
    plain = train(config(corpus, tmp_path / "plain", *plan))
    monkeypatch.setattr(placed, "PREFETCH_MIN_LOOKUPS", 1)  # every forward
    fetches = count_fetches(monkeypatch)
    run = Run(config(corpus, tmp_path / "ahead", *plan))
    assert run.tables.fetches_ahead(training=True) == []  # on the CPU the pins suffice
    # As for tables off the device: every training forward's rows are read in a thread.
    monkeypatch.setattr(PlacedTables, "_fetches_ahead", lambda self, table, training: True)
    ahead = train(run.config, run=run)
    assert len(fetches) >= 6  # one per training forward at least
    assert ahead["val_loss"] == plain["val_loss"]
    assert losses(tmp_path / "ahead") == losses(tmp_path / "plain")
    assert torch.equal(final_table(tmp_path / "ahead"), final_table(tmp_path / "plain"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_copies_host_rows_on_a_side_stream(corpus, tmp_path, monkeypatch):
    plan = ["log_every=1", "device=cuda", "tables.placement=host"]
    with monkeypatch.context() as patch:  # every read in its layer, on the compute stream
        patch.setattr(PlacedTables, "_fetches_ahead", lambda self, table, training: False)
        plain = train(config(corpus, tmp_path / "plain", *plan))
    fetches = count_fetches(monkeypatch)
    run = Run(config(corpus, tmp_path / "ahead", *plan))
    assert run.tables.fetches_ahead(training=True) == ["layer1"]  # host rows: off the device
    ahead = train(run.config, run=run)
    assert fetches and ahead["val_loss"] == plain["val_loss"]
    assert losses(tmp_path / "ahead") == losses(tmp_path / "plain")


def test_a_crash_while_writing_tables_keeps_the_previous_checkpoint(corpus, tmp_path, monkeypatch):
    plan = ["tables.placement=disk", "tables.cache_rows=2000"]
    out = tmp_path / "run"
    full = train(config(corpus, tmp_path / "full", *plan))
    train(config(corpus, out, *plan, "steps=3"))
    before = read_manifest(out)["path"]

    def crash(self, folder):  # the table files are half written when the process dies
        folder.mkdir(parents=True)
        (folder / "layer1.table").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(PlacedTables, "write", crash)
    with pytest.raises(OSError, match="disk full"):
        train(config(corpus, out, *plan), resume=True)
    monkeypatch.undo()
    assert read_manifest(out)["path"] == before  # latest still names the step-3 checkpoint
    assert not list((out / "checkpoints").glob(".tmp-*"))
    resumed = train(config(corpus, out, *plan), resume=True)
    assert resumed["val_loss"] == full["val_loss"]


def test_resume_without_a_checkpoint_starts_the_disk_table_fresh(corpus, tmp_path):
    plan = ["tables.placement=disk"]
    fresh = train(config(corpus, tmp_path / "fresh", *plan))
    out = tmp_path / "run"
    run = Run(config(corpus, out, *plan))  # a run that died before its first checkpoint ...
    run.close()
    live = DiskStore(out / "tables/layer1.table")
    live.write(torch.tensor([0, 1, 2]), torch.full((3, live.dim), 5.0))  # ... with stale rows
    live.close()
    again = train(config(corpus, out, *plan), resume=True)
    assert again["val_loss"] == fresh["val_loss"]


def test_runs_sharing_a_tables_path_keep_their_own_live_files(corpus, tmp_path):
    shared = tmp_path / "nvme"
    plan = ["tables.placement=disk", f"tables.path={shared}"]
    runs = [Run(config(corpus, tmp_path / name, *plan)) for name in ("a", "b")]
    try:
        files = sorted(shared.glob("*/layer1.table"))
        assert len(files) == 2 and files[0].parent != files[1].parent
    finally:
        for run in runs:
            run.close()
