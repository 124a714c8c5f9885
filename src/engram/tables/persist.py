"""Crash-consistent checkpoints of a set of tables: table files and a manifest, atomic.

    root/
      step-0000100/            one checkpoint: never modified once committed
        {name}.table           each table in its store's own format (a disk table's written
                               rows, packed; an in-memory table's records), safetensors, fsynced
        manifest.json          format, step, each table's kind/layout/init/file, caller state
      latest                   the name of the newest committed checkpoint (atomically replaced)
      .tmp-XXXX/               a checkpoint being written (removed, or left by a crash)

`save_tables` runs these steps; a crash (or an exception) at any point leaves `latest` naming
the previous checkpoint, untouched and loadable:

    1. flush each store (a cache writes its dirty rows back; a disk table msyncs and fsyncs)
    2. write each table into a fresh `.tmp-*` folder; a disk table writes the rows ever written
       (`engram.tables.packed`), so the copy costs those rows, not the logical size
    3. write and fsync manifest.json, fsync the folder
    4. rename the folder to `step-XXXXXXX` (atomic), fsync root
    5. write `latest` to a temporary file, fsync, rename over `latest` (atomic), fsync root
    6. prune older checkpoints beyond `keep` (never the one `latest` names)

A checkpoint is a *new generation*: the live tables keep training while their past states stay
in `step-*` folders, and `load_tables` copies a generation back into the live stores (for a
disk table: unpacked into a temporary file, renamed over the live file). Save between
steps: the stores must not be written while they are saved (a cache's prefetch may continue;
its lock orders it after the save). The optimiser step counts and the loader position belong
in `state`, a JSON object stored in the manifest.

`write_tables` / `restore_tables` are the non-atomic inner steps (2-3 without the rename), for
a caller that commits tables inside its own atomic checkpoint folder (`engram.checkpoint`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engram.files import remove_later, sweep_trash
from engram.tables.base import RowStore, check_layout
from engram.tables.stores import fsync_dir

TABLES_FORMAT = 1
LATEST = "latest"
MANIFEST = "manifest.json"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _check_names(stores: Mapping[str, RowStore]) -> None:
    if not stores:
        raise ValueError("no tables to save")
    for name in stores:
        if not _NAME.fullmatch(name):
            raise ValueError(f"table name {name!r} must match {_NAME.pattern} (it names a file)")


def write_tables(folder: Path, stores: Mapping[str, RowStore]) -> dict[str, Any]:
    """Save every store into `folder` as `{name}.table`; returns their manifest entries."""
    _check_names(stores)
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


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    with open(folder / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _point_latest(root: Path, name: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".latest-")
    with os.fdopen(fd, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    fsync_dir(root)


def _latest_name(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text().strip()
    except FileNotFoundError:
        return None


def save_tables(
    root: str | Path,
    step: int,
    stores: Mapping[str, RowStore],
    state: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Commit `root/step-XXXXXXX` atomically (see the module docstring); returns its path."""
    if step < 0 or keep < 1:
        raise ValueError(f"step={step} must be >= 0 and keep={keep} >= 1")
    _check_names(stores)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    sweep_trash(root)
    for stale in root.glob(".tmp-*"):  # folders a crash left mid-write: never committed
        remove_later(stale)
    final = root / f"step-{step:07d}"
    if final.exists() and _latest_name(root) == final.name:
        raise ValueError(f"{final} is the latest checkpoint; save a later step")
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        tables = write_tables(tmp, stores)
        manifest = {"format": TABLES_FORMAT, "step": step, "tables": tables, "state": state or {}}
        _write_manifest(tmp, manifest)
        fsync_dir(tmp)
        if final.exists():  # committed by a run that crashed before moving `latest`
            remove_later(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _point_latest(root, final.name)
    _prune(root, keep, final.name)
    return final


def _prune(root: Path, keep: int, latest: str) -> None:
    older = [p for p in sorted(root.glob("step-*")) if p.name != latest]
    for old in older[: max(0, len(older) - (keep - 1))]:
        remove_later(old)  # freeing a disk table's extents can take minutes: not here


def find_tables(path: str | Path) -> Path:
    """A checkpoint folder, or the one `path/latest` names."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    name = _latest_name(path) if path.is_dir() else None
    if name and (path / name / MANIFEST).is_file():
        return path / name
    raise ValueError(f"no table checkpoint at {path} (no {MANIFEST}, no valid {LATEST})")


def read_tables_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a table checkpoint, with its folder under "path"."""
    folder = find_tables(path)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder} has an unreadable manifest: {e}") from e
    if manifest.get("format") != TABLES_FORMAT:
        found = manifest.get("format")
        raise ValueError(f"{folder} has format {found!r}; this library reads {TABLES_FORMAT}")
    manifest["path"] = str(folder)
    return manifest


def load_tables(path: str | Path, stores: Mapping[str, RowStore]) -> dict[str, Any]:
    """Load a checkpoint (or `latest` under a root) into `stores`; returns the manifest.

    The caller restores its own state from `manifest["state"]` (e.g. optimiser step counts).
    """
    manifest = read_tables_manifest(path)
    restore_tables(Path(manifest["path"]), stores, manifest["tables"])
    return manifest
