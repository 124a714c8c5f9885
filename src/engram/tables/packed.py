"""Packed table checkpoints: a disk table's written rows only, as (sorted ids, records).

A live `DiskStore` file addresses rows directly by id, so rows written at random each take a
filesystem block of their own (4 KiB for a 192-byte record: the 32 GB benchmark's 860,872
written rows held 165 MB of records in 3.3 GiB of blocks). A checkpoint need not be
addressable, so it packs them:

    safetensors file (https://github.com/huggingface/safetensors), readable by its library:
      rows       I64 [n]      the ids of the rows ever written, ascending
      records    F32 [n, W]   their records (value and optimiser state)
      metadata   format = "engram-packed-table-1", layout and init (JSON)

Every other row is its `RowInit` value with zero optimiser state, as in the live file. The
safetensors library writes from tensors held in memory; a table's written rows may exceed RAM,
so `write_packed` writes the same layout (8-byte little-endian header length, JSON header
padded to 8 bytes, then the data) chunk by chunk. `PackedStore` serves a packed file read-only
where it lies, memory-mapped (a lookup is a binary search of the sorted ids), which is what
inference from a checkpoint needs; `DiskStore.load` unpacks one into a live file to train on.
Legend: n written rows, W record width, U rows in one call.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram.rowinit import RowInit
from engram.tables.base import RowStore, TableLayout, initial_records

PACKED_FORMAT = "engram-packed-table-1"
_CHUNK_BYTES = 64 << 20  # records gathered and written per pass: bounds the RAM a save takes


def write_packed(
    path: Path,
    layout: TableLayout,
    init: RowInit,
    ids: np.ndarray,
    records: Callable[[np.ndarray], np.ndarray],
) -> int:
    """Write the new file `path`: rows `ids` (ascending) whose records `records(ids chunk)`
    returns [chunk, W]; fsynced. Returns the file's size in bytes."""
    n, width = int(ids.size), layout.width
    if n and not (ids[1:] > ids[:-1]).all():
        raise ValueError("packed row ids must be ascending and unique")
    meta = {"format": PACKED_FORMAT, "layout": layout.to_json(), "init": init.to_json()}
    header = {
        "__metadata__": {key: json.dumps(value) for key, value in meta.items()},
        "rows": {"dtype": "I64", "shape": [n], "data_offsets": [0, 8 * n]},
        "records": {
            "dtype": "F32",
            "shape": [n, width],
            "data_offsets": [8 * n, 8 * n + 4 * n * width],
        },
    }
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors pads
    step = max(1, _CHUNK_BYTES // (4 * width))
    with open(path, "xb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.write(ids.astype("<i8", copy=False).tobytes())
        for start in range(0, n, step):
            chunk = np.ascontiguousarray(records(ids[start : start + step]), dtype="<f4")
            if chunk.shape != (min(step, n - start), width):
                raise RuntimeError(f"records gave {chunk.shape}, expected [*, {width}]")
            f.write(chunk.tobytes())
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def is_packed(path: Path) -> bool:
    """Whether `path` starts like a packed table (a safetensors header naming our format)."""
    try:
        return read_packed_header(path)[0]["format"] == PACKED_FORMAT
    except ValueError:
        return False


def read_packed_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """(metadata, rows n, offset of the data) of a packed file; ValueError if it is not one."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 1 << 20:  # ours are a few hundred bytes; anything else is not one
                raise ValueError(f"{path} is not a packed table (header of {size} bytes)")
            header = json.loads(f.read(size))
        meta = {k: json.loads(v) for k, v in header["__metadata__"].items()}
        n = int(header["rows"]["shape"][0])
        if meta.get("format") != PACKED_FORMAT:
            raise ValueError(f"{path} has format {meta.get('format')!r}, not {PACKED_FORMAT}")
    except (OSError, struct.error, KeyError, TypeError, IndexError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable packed table: {e}") from e
    return meta, n, 8 + size


class PackedStore(RowStore):
    """A packed checkpoint file served read-only where it lies (see the module docstring)."""

    kind = "packed"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta, n, start = read_packed_header(self.path)
        layout, init = TableLayout.from_json(meta["layout"]), RowInit.from_json(meta["init"])
        super().__init__(layout, init, torch.device("cpu"))
        size = start + n * (8 + 4 * layout.width)
        if os.stat(self.path).st_size != size:
            raise ValueError(f"{self.path} has {os.stat(self.path).st_size} bytes, expected {size}")
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        self._mm.madvise(mmap.MADV_RANDOM)
        self._ids = np.frombuffer(self._mm, dtype="<i8", count=n, offset=start)
        records = np.frombuffer(self._mm, dtype="<f4", count=n * layout.width, offset=start + 8 * n)
        self._records = records.reshape(n, layout.width)
        if n and (self._ids[0] < 0 or self._ids[-1] >= layout.num_rows):
            self.close()  # release the mapping: the caller never gets this store to close
            raise ValueError(f"{self.path} holds row ids outside [0, {layout.num_rows})")

    @property
    def written_rows(self) -> int:
        return int(self._ids.size)

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids [c], records [c, W]) of the written rows, ascending, a bounded chunk at a time."""
        self._check_open()
        step = max(1, _CHUNK_BYTES // (4 * self.layout.width))
        for start in range(0, self._ids.size, step):
            end = start + step
            yield self._ids[start:end].astype(np.int64), self._records[start:end].copy()

    def _gather(self, rows: torch.Tensor, slot: str) -> torch.Tensor:
        cols = self.layout.columns(slot)
        index = rows.cpu().numpy()
        at = np.searchsorted(self._ids, index)  # [U] where each id is, or would be
        found = at < self._ids.size
        found[found] = self._ids[at[found]] == index[found]
        out = np.empty((index.size, cols.stop - cols.start), dtype=np.float32)
        out[found] = self._records[at[found], cols]
        if not found.all():
            out[~found] = initial_records(self.layout, self.init, index[~found])[:, cols]
        return torch.from_numpy(out)

    def _scatter(self, rows: torch.Tensor, slot: str, values: torch.Tensor) -> None:
        raise ValueError(f"{self.path} is a packed checkpoint, read-only")

    def close(self) -> None:
        if not self._closed:
            super().close()
            del self._ids, self._records  # they hold the mapping's buffer
            self._mm.close()

    def save(self, path: Path) -> None:
        with open(path, "xb") as f, open(self.path, "rb") as src:
            shutil.copyfileobj(src, f)
            f.flush()
            os.fsync(f.fileno())

    def load(self, path: Path) -> None:
        raise ValueError(f"{self.path} is a packed checkpoint, read-only")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "written_rows": self.written_rows}
