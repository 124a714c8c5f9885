"""Quantised Engram tables for inference: convert a trained model's tables, save, load, install.

A served table costs the bytes fetched per row, so storing rows
as int8 or fp8 (e4m3) with float32 scales (`engram.tables.quant.QuantizedStore`) fits ~4x the
rows in the same host RAM, disk or link. This module applies that to a whole model:

    stores = quantize_tables(model, "int8", block=8)     # one QuantizedStore per Engram table
    report = quantization_report(model, stores)          # error vs the float rows, bytes/token
    save_quantized(folder, stores, report)                # layer{id}.qtable + manifest.json
    stores, meta = load_quantized(folder, model)          # checked against the model
    install_quantized(model, stores)                      # the model now reads the int8 rows

The source of a table is the model's `nn.Embedding` when it has one, else the store of the row
source that `load_trained` placed it behind (`HashedMemory.row_source.store`). Installing
replaces every table by a row source that dequantises the batch's unique rows
(`engram.tables.lookup`): the model's code is unchanged. The rows are constants: no gradient
reaches them (a quantised table is read-only), so training the model afterwards would only move
its dense weights.

A folder is tied to one model: loading checks the table names, their layout (rows, row dim),
each table's init identity (seed and layer, which differ between runs) and the hash spec digest.
Bytes per token count what one token's lookup fetches: heads x bytes per row, summed over tables.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from engram.checkpoint import FILES, file_digests, seal, unseal, verify_files
from engram.files import fsync_dir, fsync_file
from engram.module import HashedMemory, RowSource
from engram.rowinit import RowInit
from engram.tables.base import RowStore, TableLayout
from engram.tables.lookup import lookup
from engram.tables.placed import PlacedTable, table_name
from engram.tables.quant import QuantizedStore, payload_dtype, quantization_error

FORMAT = "engram-quantized-tables"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class QuantizedSource:
    """The row source installed in a `HashedMemory`: e [B, T, D] for rows [B, T, H]."""

    def __init__(self, store: QuantizedStore) -> None:
        self.store = store

    def read(self, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        # requires_grad=False: the looked-up rows are plain tensors, never leaves, so even with
        # gradients enabled nothing can accumulate for (or try to write) the read-only store.
        return lookup(self.store, rows, offsets, device=rows.device, requires_grad=False).out


class _TensorRows(RowStore):
    """A read-only RowStore view of a float [N, r] tensor (an embedding's weight), no copy."""

    kind = "tensor"

    def __init__(self, weight: torch.Tensor, init: RowInit) -> None:
        super().__init__(TableLayout(*weight.shape, ()), init, weight.device)
        self.weight = weight.detach()

    def _gather(self, rows: torch.Tensor, slot: str) -> torch.Tensor:
        return self.weight.index_select(0, rows.to(self.device)).float()

    def _scatter(self, rows: torch.Tensor, slot: str, values: torch.Tensor) -> None:
        raise RuntimeError("a tensor view is read-only")  # only our conversion reads it

    def save(self, path: Path) -> None:
        raise RuntimeError("a tensor view is not saved")

    def load(self, path: Path) -> None:
        raise RuntimeError("a tensor view is not loaded")


# ---- conversion ------------------------------------------------------------------------------
def _memories(model: torch.nn.Module) -> dict[str, HashedMemory]:
    memories = {table_name(m.layer_id): m for m in model.engram_layers}
    if not memories:
        raise ValueError("this model has no Engram tables to quantise")
    return memories


def float_source(memory: HashedMemory) -> RowStore:
    """The float rows of `memory`'s table as a RowStore: its embedding, or its placed store."""
    name = table_name(memory.layer_id)
    if isinstance(memory.row_source, QuantizedSource):
        raise ValueError(f"{name} is already quantised: load the float model again to convert it")
    if memory.row_source is not None:
        return memory.row_source.store
    if memory.table is None or memory.table.weight.is_meta:
        raise ValueError(f"{name} has no storage (built under lazy_tables())")
    return _TensorRows(memory.table.weight, memory.init)


def quantize_tables(model: torch.nn.Module, kind: str, block: int = 0) -> dict[str, QuantizedStore]:
    """One QuantizedStore per Engram table of `model` (named `layer{id}`), on the source's device.

    ValueError for an unknown kind, a block that does not divide the row dim, or a model whose
    tables are not float (none, or already quantised).
    """
    payload_dtype(kind)  # an unknown kind fails before any table is read
    stores = {}
    for name, memory in _memories(model).items():
        # Streams the source chunk by chunk (16 MiB of float32), so a disk table is never read
        # whole; the source's init travels with the rows and identifies the model at install.
        stores[name] = QuantizedStore.from_store(float_source(memory), kind, block)
    return stores


def quantization_report(
    model: torch.nn.Module, stores: dict[str, QuantizedStore]
) -> dict[str, Any]:
    """Per table: error vs the model's float rows, heads and bytes per row; totals per token.

    `model` must still hold its float tables (call this before `install_quantized`).
    """
    check_fit(model, stores)
    tables, per_token, per_token_fp32, total, total_fp32 = {}, 0, 0, 0, 0
    for name, memory in _memories(model).items():
        store, heads = stores[name], memory.spec.heads_total
        tables[name] = {
            "heads": heads,
            "bytes_per_row": store.bytes_per_row,
            "error": quantization_error(float_source(memory), store),
        }
        per_token += heads * store.bytes_per_row
        per_token_fp32 += heads * store.dim * 4
        total += store.nbytes
        total_fp32 += store.num_rows * store.dim * 4
    first = next(iter(_memories(model).values()))
    return {
        "kind": next(iter(stores.values())).kind,
        "block": next(iter(stores.values())).block,
        "spec_digest": first.spec.digest,
        "tables": tables,
        "bytes_per_token": per_token,
        "bytes_per_token_fp32": per_token_fp32,
        "table_bytes": total,
        "table_bytes_fp32": total_fp32,
    }


# ---- installing --------------------------------------------------------------------------------
def check_fit(model: torch.nn.Module, stores: dict[str, QuantizedStore]) -> None:
    """ValueError unless `stores` are exactly `model`'s tables: names, layout and init."""
    memories = _memories(model)
    if set(stores) != set(memories):
        raise ValueError(
            f"the quantised tables {sorted(stores)} are not this model's {sorted(memories)}"
        )
    for name, memory in memories.items():
        store = stores[name]
        want = (memory.spec.layer_rows(memory.layer_id), memory.spec.row_dim)
        if (store.num_rows, store.dim) != want:
            raise ValueError(
                f"{name}: the quantised table has {store.num_rows} x {store.dim} rows, this "
                f"model's has {want[0]} x {want[1]}: it was converted from another model"
            )
        if store.init != memory.init:
            # Same shape but another run (another seed): its rows mean nothing to this model.
            raise ValueError(
                f"{name}: the quantised table comes from another model (its init "
                f"{store.init.to_json()} is not this model's {memory.init.to_json()})"
            )


def install_quantized(
    model: torch.nn.Module, stores: dict[str, QuantizedStore], release: bool = True
) -> None:
    """Make every Engram table of `model` read its quantised store (checked by `check_fit`).

    The embedding is dropped (`use_row_source`); with `release`, a placed float store (from
    `load_trained`) is closed too, so its RAM or mapping is freed: the model is then inference
    only, and converting it again needs the float model reloaded. A placement's fetch ahead
    stops fetching for a table once it reads another source.
    """
    check_fit(model, stores)
    for name, memory in _memories(model).items():
        placed = memory.row_source
        memory.use_row_source(QuantizedSource(stores[name]))
        if placed is not None:
            _retire(placed, release)


def _retire(placed: RowSource, release: bool) -> None:
    """Wait for a placed table's fetch in flight, then close its store if asked."""
    if isinstance(placed, PlacedTable):
        placed.settle()
    if release:
        placed.store.close()


# ---- folders -----------------------------------------------------------------------------------
def save_quantized(
    folder: str | Path,
    stores: dict[str, QuantizedStore],
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `layer{id}.qtable` files and `manifest.json` into `folder`, atomically.

    `meta` (e.g. `quantization_report(...)` plus provenance) goes into the manifest; its
    `tables` entries are merged into the per-table ones (file, describe(), bytes per row). The
    folder is built beside its destination and renamed into place, so a reader sees the old
    folder or the complete new one; an existing folder is replaced only with `overwrite`.
    """
    folder = Path(folder)
    kinds = {(s.kind, s.block) for s in stores.values()}
    if len(kinds) != 1:
        raise ValueError(f"one folder holds one kind and block, got {sorted(kinds)}")
    if folder.exists() and not overwrite:
        raise ValueError(f"{folder} exists: remove it or choose another folder")
    meta = dict(meta or {})
    extra = meta.pop("tables", {})
    kind, block = kinds.pop()
    entries = {
        name: {
            **extra.get(name, {}),
            "file": f"{name}.qtable",
            "table": store.describe(),
            "bytes_per_row": store.bytes_per_row,
        }
        for name, store in stores.items()
    }
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, **meta, "kind": kind, "block": block}
    manifest["tables"] = entries
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}"
    old = folder.parent / f".old-{folder.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, store in stores.items():
            store.save(tmp / entries[name]["file"])  # fsynced by QuantizedStore.save
        manifest[FILES] = file_digests(tmp)  # checked by `load_quantized` before any read
        (tmp / MANIFEST).write_text(json.dumps(seal(manifest), indent=2) + "\n")
        fsync_file(tmp / MANIFEST)
        fsync_dir(tmp)
        if folder.exists():
            os.replace(folder, old)  # a directory cannot be renamed onto a non-empty one
        os.replace(tmp, folder)
        fsync_dir(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return folder


def read_quantized_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a quantised-tables folder; ValueError if `folder` is not one."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder} is not a quantised-tables folder: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a quantised-tables manifest")
    unseal(manifest, str(path))
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has version {manifest.get('version')!r}, expected 1")
    tables = manifest.get("tables")
    if not isinstance(tables, dict) or not tables or "kind" not in manifest:
        raise ValueError(f"{path} lists no tables (or no kind): the folder is incomplete")
    for name, entry in tables.items():  # a file name inside the folder, nothing else
        file = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
            raise ValueError(f"{path}: table {name!r} has no valid file name ({file!r})")
    return manifest


def load_quantized(
    folder: str | Path,
    model: torch.nn.Module | None = None,
    device: str | torch.device | None = None,
) -> tuple[dict[str, QuantizedStore], dict[str, Any]]:
    """(stores, manifest) of a folder `save_quantized` wrote; checked against `model` if given.

    `device`: where the stores live; default the CPU, or with a model where each float table
    is now (its embedding's device, or its placed store's).
    """
    folder = Path(folder)
    manifest = read_quantized_manifest(folder)
    verify_files({**manifest, "path": str(folder)})  # sizes and SHA-256 of every file
    memories = _memories(model) if model is not None else {}
    stores: dict[str, QuantizedStore] = {}
    for name, entry in manifest["tables"].items():
        where = device if device is not None else _device_of(model, memories.get(name))
        store = QuantizedStore.from_file(folder / entry["file"], where)
        if (store.kind, store.block) != (manifest["kind"], manifest["block"]):
            raise ValueError(f"{folder / entry['file']} does not hold the manifest's kind/block")
        stores[name] = store
    if model is not None:
        check_fit(model, stores)
        digest = next(iter(memories.values())).spec.digest
        if manifest.get("spec_digest") not in (None, digest):
            raise ValueError(
                f"{folder} was converted for hash spec {manifest['spec_digest']}, this model's "
                f"is {digest}"
            )
    return stores, manifest


def _device_of(model: torch.nn.Module | None, memory: HashedMemory | None) -> torch.device:
    """Where `memory`'s float table lives now (the CPU when unknown)."""
    if model is None or memory is None:
        return torch.device("cpu")
    if memory.table is not None and not memory.table.weight.is_meta:
        return memory.table.weight.device
    if memory.row_source is not None:
        return memory.row_source.store.device
    return torch.device("cpu")


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The resolved quantisation in a few numbers (for eval's JSON and the CLI)."""
    return {
        "kind": report["kind"],
        "block": report["block"],
        "bytes_per_token": report["bytes_per_token"],
        "bytes_per_token_fp32": report["bytes_per_token_fp32"],
        "relative_rms_error": {
            name: t["error"]["relative_rms_error"]
            for name, t in report["tables"].items()
            if "error" in t
        },
    }
