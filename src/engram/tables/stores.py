"""Placements: where a table's records live. One tensor on a device or in host memory, or a file.

- `DeviceStore`: the records on any torch device, what `nn.Embedding` does today (plus the
  optimiser state in the same tensor). The fastest tier, bounded by accelerator memory.
- `HostStore`: the records in CPU memory, *pinned* when an accelerator is present, and reads
  returned in pinned buffers, so that the copy of a batch's rows to the accelerator can be
  asynchronous (`.to(device, non_blocking=True)`) and overlap compute. The paper keeps a
  100B-parameter table in host memory this way at under 3% inference overhead (section 6).
- `DiskStore`: one sparse file per table, addressed directly by row id (below).

The in-memory stores materialise every row at construction from the deterministic `RowInit`,
so they start from the same bits as a `DiskStore` whose rows are still untouched. A checkpoint
of one is a safetensors file holding the record tensor, with the layout and init as metadata.

A disk table may be far larger than RAM: the file is memory-mapped, so the kernel pages rows in
on demand and writes dirty pages back, and only the pages a batch touches are ever resident.
The file is created at its full logical size with `ftruncate`, which allocates no blocks:
untouched rows cost no disk space (a touched row costs one filesystem block, 4 KiB on ext4,
until its neighbours share it). Until first written a row reads as its `RowInit` value with
zero optimiser state, so the result never depends on when a row is first touched.

    [0, 4096)              header: MAGIC line, then JSON {format, kind, layout, init}, zero padded
    [4096, 4096 + B)       touched map: one byte per row (1 = written); B = N rounded up to 4096
    [D, D + N * W * 4)     records, row-major float32; D = 4096 + B (page aligned)

The mapping never writes to a hole: a write through a mapping to a page the file system cannot
allocate is answered with SIGBUS, which kills the process with no message. So the touched map's
blocks are allocated (`posix_fallocate`) when the file is opened for writing, and a row's first
write goes through `pwrite`, which fails on a full disk with an `OSError` (ENOSPC) naming the
file; later writes of the row go through the mapping, to its allocated page.

The touched map lives in the same file, so a table is self-describing. A byte per row (not a
bit) keeps updates to different rows independent (no shared read-modify-write of a byte), which
the cache's concurrent loads and write-backs rely on; it costs 1/(4 W) of the records' size.
Rows are read and written with numpy fancy indexing on the mapping: one vectorised gather per
batch instead of one pread per row.

A checkpoint (`save`) holds the written rows only, packed (`engram.tables.packed`): scattered
rows each take a 4 KiB block in the live file but 8 + 4 W bytes there. `load` unpacks one into
a new live file; it also reads a checkpoint of the whole file (as saved before packing), copied
by `copy_sparse`, which copies only a file's data extents (SEEK_DATA / SEEK_HOLE).
Legend: N rows, W record width, U rows in one call.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from engram.files import (
    delete_in_background,
    fsync_dir,
    fsync_file,
    remove_later,
    save_tensors,
    trash_name,
)
from engram.rowinit import RowInit, fill_initial
from engram.tables.base import ALL, RowStore, TableLayout, check_layout, initial_records
from engram.tables.packed import PackedStore, is_packed, write_packed


def pinning_available() -> bool:
    """Whether host memory can be page-locked (needs an accelerator runtime)."""
    return torch.cuda.is_available()


class TensorStore(RowStore):
    """All N records in one [N, W] float32 tensor on `device`; `pin` page-locks a CPU tensor."""

    kind = "tensor"

    def __init__(
        self, layout: TableLayout, init: RowInit, device: str | torch.device, pin: bool = False
    ) -> None:
        super().__init__(layout, init, torch.device(device))
        if pin and self.device.type != "cpu":
            raise ValueError(f"pin=True needs a CPU tensor, got device {self.device}")
        self.pinned = pin
        # Zeros first: the state slots start at zero, like torch's Adam and Adagrad states.
        self._records = torch.zeros(
            layout.num_rows, layout.width, dtype=torch.float32, device=self.device, pin_memory=pin
        )
        fill_initial(self._records, init, layout.dim)

    def _gather(self, rows: torch.Tensor, slot: str) -> torch.Tensor:
        # A strided view of the slot's columns: index_select reads only those, not whole records.
        source = self._records[:, self.layout.columns(slot)]
        index = rows.to(self.device)
        if not self.pinned:
            return source.index_select(0, index)
        out = torch.empty(index.numel(), source.shape[1], pin_memory=True)
        return torch.index_select(source, 0, index, out=out)

    def _scatter(self, rows: torch.Tensor, slot: str, values: torch.Tensor) -> None:
        # index_copy_ on the column view writes through to the records tensor.
        target = self._records[:, self.layout.columns(slot)]
        target.index_copy_(0, rows.to(self.device), values.to(self.device))

    def save(self, path: Path) -> None:
        path = Path(path)
        if path.exists():
            raise ValueError(f"{path} exists; save writes a new file")
        records = self._records.detach().cpu().contiguous()
        save_tensors({"records": records}, path, metadata={"table": json.dumps(self.describe())})
        fsync_file(path)

    def load(self, path: Path) -> None:
        self._check_open()
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["table"])
                check_layout(self.layout, meta["layout"], path)
                records = f.get_tensor("records")
        except (OSError, KeyError, json.JSONDecodeError, SafetensorError) as e:
            raise ValueError(f"{path} is not a saved table: {e}") from e
        self._records.copy_(records)

    def close(self) -> None:
        super().close()
        self._records = torch.empty(0, self.layout.width)  # release the memory now


class DeviceStore(TensorStore):
    """The table in one tensor on `device` (an accelerator, or "cpu" for tests)."""

    kind = "device"

    def __init__(self, layout: TableLayout, init: RowInit, device: str | torch.device) -> None:
        super().__init__(layout, init, device, pin=False)


class HostStore(TensorStore):
    """The table in CPU memory, pinned (with pinned reads) when an accelerator is present."""

    kind = "host"

    def __init__(self, layout: TableLayout, init: RowInit) -> None:
        super().__init__(layout, init, "cpu", pin=pinning_available())


# ---- disk ----------------------------------------------------------------------------------------
MAGIC = b"ENGRAM-TABLE\n"
DISK_FORMAT = 1
PAGE = 4096
_COPY_CHUNK = 8 << 20


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def file_size(layout: TableLayout) -> int:
    """Logical size in bytes of a disk table of this layout."""
    return PAGE + _round_up(layout.num_rows, PAGE) + layout.nbytes


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a disk table file; ValueError if `path` is not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(PAGE)
    except OSError as e:
        raise ValueError(f"cannot read disk table {path}: {e}") from e
    if not head.startswith(MAGIC):
        raise ValueError(f"{path} is not an engram disk table (no {MAGIC!r} header)")
    try:
        header = json.loads(head[len(MAGIC) :].rstrip(b"\0"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} has a corrupt header: {e}") from e
    if header.get("format") != DISK_FORMAT:
        raise ValueError(f"{path} has format {header.get('format')!r}; expected {DISK_FORMAT}")
    return header


def _checked_write(fd: int, path: Path, data: np.ndarray, offset: int) -> None:
    """`pwrite` all of `data` (C-contiguous) at `offset`; a full disk is OSError naming `path`."""
    view = memoryview(data).cast("B")
    try:
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e


def copy_sparse(src: Path, dst: Path) -> int:
    """Copy src to the new file dst keeping holes as holes; returns the bytes actually copied."""
    copied = 0
    fin = os.open(src, os.O_RDONLY)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            size = os.fstat(fin).st_size
            os.ftruncate(fout, size)  # full logical size, all holes
            pos = 0
            while pos < size:
                try:
                    start = os.lseek(fin, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                        break
                    raise
                end = os.lseek(fin, start, os.SEEK_HOLE)
                copied += _copy_range(fin, fout, start, end)
                pos = end
            os.fsync(fout)
        finally:
            os.close(fout)
    finally:
        os.close(fin)
    return copied


def _copy_range(fin: int, fout: int, start: int, end: int) -> int:
    pos = start
    while pos < end:
        chunk = os.pread(fin, min(_COPY_CHUNK, end - pos), pos)
        if not chunk:
            break
        os.pwrite(fout, chunk, pos)
        pos += len(chunk)
    return pos - start


class DiskStore(RowStore):
    """A table in one sparse, memory-mapped file. `DiskStore.create(path, ...)` makes one;
    `DiskStore(path)` opens an existing one (its layout and init come from the header).
    `read_only=True` maps it for reading only (e.g. a checkpoint's file, for inference): writes
    and `load` raise ValueError, and the file is never modified."""

    kind = "disk"

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        self.path, self.read_only = Path(path), read_only
        header = read_header(self.path)
        layout, init = TableLayout.from_json(header["layout"]), RowInit.from_json(header["init"])
        super().__init__(layout, init, torch.device("cpu"))
        self._map()

    @classmethod
    def create(cls, path: str | Path, layout: TableLayout, init: RowInit) -> DiskStore:
        """A new table file at `path` (which must not exist), every row untouched."""
        layout.validate()
        init.validate()
        path = Path(path)
        header = {"format": DISK_FORMAT, "kind": cls.kind, "layout": layout.to_json()}
        header["init"] = init.to_json()
        blob = MAGIC + json.dumps(header).encode()
        if len(blob) > PAGE:
            raise ValueError(f"table header of {len(blob)} bytes exceeds {PAGE}: {header}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError as e:
            raise ValueError(f"{path} exists; open it with DiskStore(path)") from e
        try:
            os.pwrite(fd, blob, 0)
            os.ftruncate(fd, file_size(layout))  # sparse: no blocks behind the rows yet
        finally:
            os.close(fd)
        return cls(path)

    # ---- mapping ---------------------------------------------------------------------------------
    def _map(self) -> None:
        N, W = self.layout.num_rows, self.layout.width
        size = os.stat(self.path).st_size
        if size != file_size(self.layout):
            raise ValueError(f"{self.path} has {size} bytes, expected {file_size(self.layout)}")
        self._fd = os.open(self.path, os.O_RDONLY if self.read_only else os.O_RDWR)
        if not self.read_only:
            try:  # the touched map's blocks, all of them: 1 / (4 W) of the records' size
                os.posix_fallocate(self._fd, PAGE, _round_up(N, PAGE))
            except OSError as e:
                os.close(self._fd)
                raise OSError(e.errno, e.strerror, str(self.path)) from e
        access = mmap.ACCESS_READ if self.read_only else mmap.ACCESS_WRITE
        self._mm = mmap.mmap(self._fd, size, access=access)
        self._mm.madvise(mmap.MADV_RANDOM)  # random rows: no read-around (read_ahead_kb per fault)
        self._touched = np.frombuffer(self._mm, dtype=np.uint8, count=N, offset=PAGE)
        self._offset = PAGE + _round_up(N, PAGE)
        self._data = np.frombuffer(self._mm, dtype=np.float32, count=N * W, offset=self._offset)
        self._data = self._data.reshape(N, W)

    def _unmap(self) -> None:
        # The numpy views hold the mapping's buffer: drop them before closing it.
        del self._touched, self._data
        self._mm.close()
        os.close(self._fd)

    # ---- rows ------------------------------------------------------------------------------------
    def _fresh(self, rows: np.ndarray) -> np.ndarray:
        """Full records of never-written rows: the init value and zero state. [U, W]"""
        return initial_records(self.layout, self.init, rows)

    def _gather(self, rows: torch.Tensor, slot: str) -> torch.Tensor:
        cols = self.layout.columns(slot)
        index = rows.cpu().numpy()
        fresh = self._touched[index] == 0
        if not fresh.any():
            return torch.from_numpy(self._data[index, cols])  # a copy [U, w]; the kernel faults
        # An unwritten row is its init, whatever the file holds there (zeros, normally); its
        # page is not even faulted in, so cold reads cost neither a fault nor page cache.
        out = np.empty((index.size, cols.stop - cols.start), dtype=np.float32)
        out[fresh] = self._fresh(index[fresh])[:, cols]
        written = ~fresh
        if written.any():
            out[written] = self._data[index[written], cols]
        return torch.from_numpy(out)

    def _scatter(self, rows: torch.Tensor, slot: str, values: torch.Tensor) -> None:
        self._check_writable()
        cols = self.layout.columns(slot)
        every = index = rows.cpu().numpy()
        values = values.cpu().numpy()
        fresh = self._touched[index] == 0
        if fresh.any():  # first writes, whole records, through write(2): see _write_new
            records = values[fresh] if slot == ALL else self._fresh(index[fresh])
            if slot != ALL:  # a partial write must not leave the other columns as file zeros
                records[:, cols] = values[fresh]
            self._write_new(index[fresh], records)
            index, values = index[~fresh], values[~fresh]
        self._data[index, cols] = values
        self._touched[every] = 1  # after the data: a row is only marked once it holds its value

    def _write_new(self, ids: np.ndarray, records: np.ndarray) -> None:
        """Write never-written rows `ids` (ascending) with `pwrite`, one call per run of adjacent
        ids. Their pages may be holes: a write through the mapping to a hole that the file
        system cannot allocate is answered with SIGBUS, which kills the process with no
        message, while `pwrite` fails with ENOSPC (an OSError naming the file; the rows stay
        unmarked, so they still read as their init). Measured faster than the mapping's page
        fault too (`bench/integrity.py`)."""
        records = np.ascontiguousarray(records, dtype=np.float32)
        row_bytes = 4 * self.layout.width
        breaks = np.flatnonzero(np.diff(ids) != 1) + 1
        starts, ends = np.r_[0, breaks].tolist(), np.r_[breaks, ids.size].tolist()
        for start, end in zip(starts, ends, strict=True):
            offset = self._offset + int(ids[start]) * row_bytes
            _checked_write(self._fd, self.path, records[start:end], offset)

    # ---- durability and accounting ---------------------------------------------------------------
    def flush(self) -> None:
        if self._closed or self.read_only:
            return
        self._mm.flush()  # msync: dirty pages of the mapping to the file
        os.fsync(self._fd)

    def close(self) -> None:
        if not self._closed:
            super().close()
            self._unmap()

    @property
    def allocated_bytes(self) -> int:
        """Bytes of disk actually allocated to the file (st_blocks), not its logical size."""
        return os.stat(self.path).st_blocks * 512

    @property
    def touched_rows(self) -> int:
        """Rows written at least once (a scan of the touched map)."""
        self._check_open()
        return int(np.count_nonzero(self._touched))

    def touched(self, rows: torch.Tensor) -> torch.Tensor:
        """Whether each of `rows` (any int64 ids in range) was ever written: [U] bool."""
        self._check_open()
        index = rows.cpu().numpy()
        if index.size and (index.min() < 0 or index.max() >= self.num_rows):
            raise ValueError(f"row ids must lie in [0, {self.num_rows})")
        return torch.from_numpy(self._touched[index] != 0)

    def _unpack(self, path: Path, tmp: Path) -> None:
        """A new live file `tmp` holding the packed table `path`'s rows."""
        with PackedStore(path) as packed:
            self._check_same(packed.layout, packed.init.to_json(), path)
            with DiskStore.create(tmp, self.layout, self.init) as live:  # closing fsyncs it
                for ids, records in packed.chunks():
                    live.write(torch.from_numpy(ids), torch.from_numpy(records), ALL)

    def _check_same(self, layout: TableLayout, init: dict[str, Any], path: Path) -> None:
        check_layout(self.layout, layout.to_json(), path)
        if RowInit.from_json(init) != self.init:
            # Untouched rows read as their init: a different init would change them silently.
            raise ValueError(f"{path} was made with init {init}, this table uses {self.init}")

    def _check_writable(self) -> None:
        if self.read_only:
            raise ValueError(f"{self.path} is open read-only")

    # ---- checkpoints -----------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Write the rows ever written, packed (`engram.tables.packed`), to the new file `path`."""
        self._check_open()
        if Path(path).exists():
            raise ValueError(f"{path} exists; save writes a new file")
        self.flush()
        written = np.flatnonzero(self._touched)
        write_packed(Path(path), self.layout, self.init, written, lambda ids: self._data[ids])

    def load(self, path: Path) -> None:
        """Replace this table's file by the saved table `path` (packed, or a whole disk-table
        file as checkpoints before packing held); untouched rows stay holes."""
        self._check_open()
        self._check_writable()
        path = Path(path)
        tmp = self.path.with_name(self.path.name + ".loading")
        if tmp.exists():
            remove_later(tmp)
        if is_packed(path):
            self._unpack(path, tmp)
        else:
            header = read_header(path)
            self._check_same(TableLayout.from_json(header["layout"]), header["init"], path)
            copy_sparse(path, tmp)
        self._unmap()
        # A second link keeps the old blocks alive through the replace, so that freeing them
        # (slow for a sparse file, see engram.files) happens in the background, not here.
        old = trash_name(self.path)
        os.link(self.path, old)
        os.replace(tmp, self.path)  # atomic: the live file is the old table or the new one
        fsync_dir(self.path.parent)
        self._map()
        delete_in_background(old)
