"""What integrity costs on a 32 GB table: checksums verified on load, blocks reserved before writes.

1. Verification. A checkpoint records every file's size and SHA-256 when it is committed
   (`engram.checkpoint.file_digests`), and every load checks them before it reads a byte
   (`verify_files`). Measured on the checkpoint of a 32 GB disk table (the huge-table bench's
   sizing: 166,667,302 rows of 192-byte records), as a packed table file:
   - `trained`: the rows the huge-table bench's 200-step run had written (860,872), the size a
     checkpoint of it has: seconds to digest it (commit), to verify it, to read it once (the
     floor of any load) and to load it into a live table (`DiskStore.load`, what a resume does);
   - `full` (`--full`): every row written, the largest checkpoint such a table can have
     (33 GB): digest, verify, and one plain read.
   With root, the page cache is dropped before each timed pass, so every pass reads the disk.
2. First writes. A live disk table writes a row for the first time with `pwrite`, not through
   its memory mapping, so that a full disk is an error message, not a SIGBUS. Steps of `--new`
   first writes of random rows (the huge-table run's mean: 860,872 rows over 200 steps), into
   two 32 GB live tables, one as the store does it and one through the mapping (as it did
   before), interleaved: ms per step's write, the ratio, and the difference as a share of that
   run's measured step.

The last line of output is one JSON record (also written to --out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from engram.checkpoint import file_digests, verify_files
from engram.experiments.report import machine_info, write_json
from engram.rowinit import RowInit
from engram.tables.base import ALL
from engram.tables.packed import write_packed
from engram.tables.row_optim import RowAdam
from engram.tables.stores import DiskStore

ROOT = Path(__file__).resolve().parent.parent
HUGE = ROOT / "bench" / "results" / "huge_table.json"
ROWS, DIM = 166_667_302, 16  # the huge-table bench's 32 GB table (RowAdam: 48 floats a row)
INIT = RowInit(seed=0, table_id=0, std=0.02)


def drop_caches() -> bool:
    """Drop the page cache (root only), so that the next pass reads from disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(fn) -> dict:
    cold = drop_caches()
    t0 = time.perf_counter()
    fn()
    return {"s": time.perf_counter() - t0, "cold": cold}


def read_once(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def packed_checkpoint(folder: Path, layout, ids: np.ndarray) -> Path:
    """A checkpoint folder holding one packed table of rows `ids` (random records)."""
    (folder / "tables").mkdir(parents=True)
    block = np.random.default_rng(0).standard_normal((1 << 19, layout.width), dtype=np.float32)
    path = folder / "tables" / "layer1.table"
    write_packed(path, layout, INIT, ids, lambda chunk: block[: chunk.size])
    return path


def verification(work: Path, layout, ids: np.ndarray, load: bool) -> dict:
    folder = work / "ckpt"
    t0 = time.perf_counter()
    path = packed_checkpoint(folder, layout, ids)
    out = {"rows": int(ids.size), "bytes": path.stat().st_size}
    out["write_s"] = time.perf_counter() - t0
    digests: dict = {}
    out["digest"] = timed(lambda: digests.update(file_digests(folder)))
    manifest = {"path": str(folder), "files": digests}
    out["verify"] = timed(lambda: verify_files(manifest))
    out["read"] = timed(lambda: read_once(path))
    if load:
        live = DiskStore.create(work / "live.table", layout, INIT)
        out["load"] = timed(lambda: live.load(path))
        live.close()
        out["verify_over_load"] = out["verify"]["s"] / out["load"]["s"]
    out["verify_over_read"] = out["verify"]["s"] / out["read"]["s"]
    out["verify_gb_per_s"] = out["bytes"] / out["verify"]["s"] / 1e9
    shutil.rmtree(folder)
    (work / "live.table").unlink(missing_ok=True)
    return out


def mapped_scatter(self: DiskStore, rows: torch.Tensor, slot: str, values: torch.Tensor) -> None:
    """`DiskStore._scatter` as it was: first writes too through the mapping (a page fault on a
    hole; SIGBUS when the disk is full)."""
    cols, index = self.layout.columns(slot), rows.numpy()
    fresh = index[self._touched[index] == 0]
    if slot != ALL and fresh.size:
        self._data[fresh] = self._fresh(fresh)
    self._data[index, cols] = values.numpy()
    self._touched[index] = 1


@contextlib.contextmanager
def through_the_mapping(active: bool):
    kept = DiskStore._scatter
    if active:
        DiskStore._scatter = mapped_scatter
    try:
        yield
    finally:
        DiskStore._scatter = kept


def first_writes(work: Path, layout, steps: int, new: int) -> dict:
    """ms per step's first writes of `new` random rows: `pwrite` vs the mapping, interleaved."""
    rng = np.random.default_rng(1)
    arms = {
        "pwrite": DiskStore.create(work / "pwrite.table", layout, INIT),
        "mapping": DiskStore.create(work / "mapping.table", layout, INIT),
    }
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    values = torch.randn(new, layout.width)
    for _ in range(steps):
        for arm, store in arms.items():
            rows = torch.from_numpy(np.unique(rng.integers(0, layout.num_rows, new)))
            with through_the_mapping(arm == "mapping"):
                t0 = time.perf_counter()
                store.write(rows, values[: rows.numel()], ALL)
                times[arm].append(time.perf_counter() - t0)
    flush = {}
    for arm, store in arms.items():
        t0 = time.perf_counter()
        store.flush()  # the dirty pages' write-back, which both arms owe
        flush[arm] = time.perf_counter() - t0
        store.close()
        store.path.unlink()
    med = {arm: float(np.median(t)) * 1e3 for arm, t in times.items()}
    step_ms = 1e3 / json.loads(HUGE.read_text())["results"]["huge"]["parts"]["train"]["steps_per_s"]
    return {
        "steps": steps,
        "new_rows_per_step": new,
        "write_ms_median": med,
        "ratio_pwrite_over_mapping": med["pwrite"] / med["mapping"],
        "us_per_new_row": {arm: ms * 1e3 / new for arm, ms in med.items()},
        "flush_s": flush,
        "huge_table_step_ms": step_ms,
        "difference_share_of_step": (med["pwrite"] - med["mapping"]) / step_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/bench-integrity")
    parser.add_argument("--trained-rows", type=int, default=860_872)
    parser.add_argument("--full", action="store_true", help="also the fully written table")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--new", type=int, default=4304)
    parser.add_argument("--out", default="bench/results/integrity.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    layout = RowAdam().layout(ROWS, DIM)
    rng = np.random.default_rng(0)
    trained_ids = np.unique(rng.integers(0, ROWS, args.trained_rows))
    record = {"bench": "integrity", "machine": machine_info(), "config": vars(args)}
    record["table"] = {"rows": ROWS, "record_bytes": 4 * layout.width, "bytes": layout.nbytes}
    record["first_writes"] = first_writes(work, layout, args.steps, args.new)
    print("first writes", json.dumps(record["first_writes"]), flush=True)
    record["trained"] = verification(work, layout, trained_ids, load=True)
    print("trained", json.dumps(record["trained"]), flush=True)
    if args.full:
        record["full"] = verification(work, layout, np.arange(ROWS), load=False)
        print("full", json.dumps(record["full"]), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    write_json(Path(args.out), record)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
