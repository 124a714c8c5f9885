"""Quantised tables for inference: int8 or fp8 rows with float32 scales, read-only.

The paper trains its tables in float and serves them from host memory (section 6), where the
cost of a lookup is the bytes fetched per row: from host memory, over PCIe, from disk. Stored
as int8 or fp8 a row costs `dim` bytes plus its scales instead of `4 dim`, about a quarter of
float32 (half of bf16), so the same host RAM, disk or link holds or moves ~4x the rows. Serving
needs no optimiser state, so a quantised table keeps the value columns only, and it is
read-only: train a float table and convert it (`from_store`, which streams the source chunk by
chunk, so a disk table larger than RAM is never read whole).

Symmetric absmax scaling, per row or per block of `block` columns (`block` divides `dim`):

    a = max |x| over the block        s = a / Q          Q = 127 (int8), 448 (fp8 e4m3fn max)
    int8: q = round(x / s) in [-127, 127]          x' = q s     |x - x'| <= s / 2
    fp8:  q = e4m3(x / s), nearest even            x' = q s     |x - x'| <= max(|x| / 17, s / 1024)

e4m3 has 3 mantissa bits: a normal y = x / s in [2^e, 2^(e+1)) rounds by at most half an ulp,
2^(e-4), which is at most |y| / 17 (attained at y = 2^e (1 + 2^-4)); below 2^-6, subnormals are
spaced 2^-9, an absolute s / 1024. (The tests come within 1% of both bounds; float32 arithmetic
adds a few 2^-24 |x|.) So int8's error is uniform and fp8's relative. A block of zeros has s = 0
and dequantises to exactly 0. The scale granularity is the trade-off: one scale per row costs 4
bytes a row, but an outlier stretches s for the whole row, and int8 rounds its other values to a
few levels (to 0 at a 1000x outlier); fp8 only suffers once the outlier pushes them below its
normal range (a ratio above 448 / 2^-6 = 28672). A scale per block of 32 columns costs 4 bytes
per 32 and confines the outlier to its block.

`read` dequantises to float32 on the store's device; `read_raw` returns the payload and scales
as stored, so a caller can move the small bytes to the accelerator and `dequantize` there. The
stats count what `read` returns (float32 bytes); `bytes_per_row` is the stored cost of a row.
A checkpoint is a safetensors file (`payload`, `scales`, and `describe()` as JSON metadata).
Legend: N rows, r row dim, U rows in one call, b blocks per row (1 when block = 0).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from engram.files import fsync_file, save_tensors
from engram.rowinit import RowInit
from engram.tables.base import VALUE, RowStore, TableLayout, check_layout, check_rows

QMAX = {"int8": 127.0, "fp8": 448.0}  # largest magnitude a scaled value may take
READ_ONLY = (
    "quantised tables are read-only: they are for inference; train with a float table and convert"
)
_CHUNK_BYTES = 16 << 20  # float32 bytes per chunk when streaming a source table


def payload_dtype(kind: str) -> torch.dtype:
    """The stored dtype of `kind`; ValueError for an unknown kind or a torch without fp8."""
    if kind == "int8":
        return torch.int8
    if kind == "fp8":
        dtype = getattr(torch, "float8_e4m3fn", None)
        if dtype is None:
            raise ValueError(f"torch {torch.__version__} has no float8_e4m3fn; use kind='int8'")
        return dtype
    raise ValueError(f"kind={kind!r} must be one of {sorted(QMAX)}")


def _blocks(dim: int, block: int) -> int:
    """b, the scales per row; ValueError unless block is 0 or a divisor of dim."""
    if block < 0 or (block > 0 and dim % block):
        raise ValueError(f"block={block} must be 0 (per row) or a divisor of dim={dim}")
    return 1 if block == 0 else dim // block


def quantize(x: torch.Tensor, kind: str, block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Float rows [U, r] -> (payload [U, r] of `kind`, float32 scales [U, b]). See the docstring."""
    dtype = payload_dtype(kind)
    x = x.detach().to(torch.float32)
    if x.ndim != 2:
        raise ValueError(f"values must be [rows, dim], got {list(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("values hold NaN or inf: they cannot be quantised")
    n, dim = x.shape
    b = _blocks(dim, block)
    blocks = x.reshape(n, b, dim // b)
    scales = blocks.abs().amax(dim=-1) / QMAX[kind]  # [U, b]; 0 for a block of zeros
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    scaled = (blocks / safe.unsqueeze(-1)).clamp(-QMAX[kind], QMAX[kind])
    payload = scaled.round().to(dtype) if kind == "int8" else scaled.to(dtype)
    return payload.reshape(n, dim), scales


def dequantize(payload: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(payload [U, r], scales [U, b]) -> float32 rows [U, r], on the payload's device."""
    n, dim = payload.shape
    b = scales.shape[1]
    values = payload.to(torch.float32).reshape(n, b, dim // b) * scales.unsqueeze(-1)
    return values.reshape(n, dim)


class QuantizedStore(RowStore):
    """A read-only table of int8 or fp8 rows with float32 scales (see the module docstring).

    Build one with `from_values` or `from_store`, or `from_file` from a saved one; the
    constructor takes the payload [N, r] and scales [N, b] as `quantize` produces them.
    """

    def __init__(
        self,
        payload: torch.Tensor,
        scales: torch.Tensor,
        kind: str,
        block: int = 0,
        init: RowInit | None = None,
    ) -> None:
        if payload.ndim != 2:
            raise ValueError(f"payload must be [rows, dim], got {list(payload.shape)}")
        layout = TableLayout(int(payload.shape[0]), int(payload.shape[1]), ())
        init = RowInit(seed=0, table_id=0, std=0.0) if init is None else init
        super().__init__(layout, init, payload.device)
        self.kind = kind  # type: ignore[misc]  # per instance: "int8" or "fp8"
        self.block = block
        self._payload, self._scales = self._checked(payload, scales)

    def _checked(
        self, payload: torch.Tensor, scales: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The tensors on this store's device, after checking dtypes and shapes."""
        N, dim = self.layout.num_rows, self.layout.dim
        shape = (N, _blocks(dim, self.block))
        if payload.dtype != payload_dtype(self.kind) or tuple(payload.shape) != (N, dim):
            got = f"{payload.dtype} {list(payload.shape)}"
            raise ValueError(f"payload must be {payload_dtype(self.kind)} [{N}, {dim}], got {got}")
        if scales.dtype != torch.float32 or tuple(scales.shape) != shape:
            got = f"{scales.dtype} {list(scales.shape)}"
            raise ValueError(f"scales must be float32 {list(shape)}, got {got}")
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise ValueError("scales must be finite and >= 0")
        return payload.to(self.device).contiguous(), scales.to(self.device).contiguous()

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_values(
        cls,
        values: torch.Tensor,
        kind: str,
        block: int = 0,
        init: RowInit | None = None,
        device: str | torch.device | None = None,
        chunk_rows: int | None = None,
    ) -> QuantizedStore:
        """Quantise float rows [N, r] (on `device`, default the values' own), chunk by chunk."""
        if values.ndim != 2 or not values.is_floating_point():
            raise ValueError(f"values must be a float [rows, dim] tensor, got {values.dtype}")
        device = values.device if device is None else torch.device(device)
        N, dim = values.shape
        step = _chunk_rows(dim, chunk_rows)
        payload = torch.empty(N, dim, dtype=payload_dtype(kind), device=device)
        scales = torch.empty(N, _blocks(dim, block), dtype=torch.float32, device=device)
        for start in range(0, N, step):
            q, s = quantize(values[start : start + step], kind, block)
            payload[start : start + step], scales[start : start + step] = q, s
        return cls(payload, scales, kind, block, init)

    @classmethod
    def from_store(
        cls,
        store: RowStore,
        kind: str,
        block: int = 0,
        chunk_rows: int | None = None,
        device: str | torch.device | None = None,
    ) -> QuantizedStore:
        """Quantise the value columns of `store` (its optimiser state is dropped), streaming
        `chunk_rows` rows at a time (default: 16 MiB of float32) through `store.read`."""
        device = store.device if device is None else torch.device(device)
        N, dim = store.num_rows, store.dim
        step = _chunk_rows(dim, chunk_rows)
        payload = torch.empty(N, dim, dtype=payload_dtype(kind), device=device)
        scales = torch.empty(N, _blocks(dim, block), dtype=torch.float32, device=device)
        for start in range(0, N, step):
            rows = torch.arange(start, min(N, start + step), dtype=torch.int64)
            q, s = quantize(store.read(rows, VALUE), kind, block)
            payload[start : start + step], scales[start : start + step] = q, s
        return cls(payload, scales, kind, block, store.init)

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu") -> QuantizedStore:
        """A store holding the table that `save` wrote to `path`."""
        meta, payload, scales = _read_file(Path(path))
        init = RowInit.from_json(meta["init"])
        store = cls(payload.to(device), scales.to(device), meta["kind"], int(meta["block"]), init)
        check_layout(store.layout, meta["layout"], path)
        return store

    # ---- rows --------------------------------------------------------------------------------
    def _gather(self, rows: torch.Tensor, slot: str) -> torch.Tensor:
        index = rows.to(self.device)
        return dequantize(self._payload.index_select(0, index), self._scales.index_select(0, index))

    def read_to(self, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Crosses to another device as stored (int8/fp8 and scales: about a quarter of the
        bytes of float32) and is dequantised there."""
        if device == self.device:
            return self.read(rows)
        payload, scales = self.read_raw(rows)
        nb = {"non_blocking": True}
        return dequantize(payload.to(device, **nb), scales.to(device, **nb))

    def read_raw(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(payload [U, r], scales [U, b]) of sorted unique `rows`, as stored: for `dequantize`
        after the copy to the accelerator, which then moves `bytes_per_row` per row."""
        self._check_open()
        check_rows(rows, self.num_rows)
        index = rows.to(self.device)
        out = self._payload.index_select(0, index), self._scales.index_select(0, index)
        self._count(
            read_calls=1, rows_read=rows.numel(), bytes_read=rows.numel() * self.bytes_per_row
        )
        return out

    def write(self, rows: torch.Tensor, values: torch.Tensor, slot: str = VALUE) -> None:
        raise ValueError(READ_ONLY)

    def _scatter(self, rows: torch.Tensor, slot: str, values: torch.Tensor) -> None:
        raise ValueError(READ_ONLY)

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def bytes_per_row(self) -> int:
        """Stored bytes of one row: r payload bytes plus 4 per scale."""
        return self.dim * self._payload.element_size() + self._scales.shape[1] * 4

    @property
    def nbytes(self) -> int:
        """Stored bytes of the whole table (payload and scales)."""
        return self.num_rows * self.bytes_per_row

    # ---- lifetime and checkpoints ------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "block": self.block, "bytes": self.nbytes}

    def save(self, path: Path) -> None:
        self._check_open()
        path = Path(path)
        if path.exists():
            raise ValueError(f"{path} exists; save writes a new file")
        tensors = {"payload": self._payload.cpu(), "scales": self._scales.cpu()}
        save_tensors(tensors, path, metadata={"table": json.dumps(self.describe())})
        fsync_file(path)

    def load(self, path: Path) -> None:
        """Replace the rows by those `save` wrote to `path`: same kind, block and layout."""
        self._check_open()
        meta, payload, scales = _read_file(Path(path))
        check_layout(self.layout, meta["layout"], path)
        if (meta["kind"], meta["block"]) != (self.kind, self.block):
            found = f"kind={meta['kind']!r} block={meta['block']}"
            raise ValueError(f"{path} holds {found}; this table is {self.kind!r} {self.block}")
        self._payload, self._scales = self._checked(payload, scales)
        self.init = RowInit.from_json(meta["init"])

    def close(self) -> None:
        super().close()
        self._payload = self._payload[:0]  # release the memory now
        self._scales = self._scales[:0]

    def __repr__(self) -> str:
        return (
            f"QuantizedStore({self.kind}, rows={self.num_rows}, dim={self.dim}, block={self.block})"
        )


def _chunk_rows(dim: int, chunk_rows: int | None) -> int:
    if chunk_rows is None:
        return max(1, _CHUNK_BYTES // (4 * dim))
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be >= 1")
    return chunk_rows


def _read_file(path: Path) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """(metadata, payload, scales) of a saved quantised table; ValueError if it is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["table"])
            payload, scales = f.get_tensor("payload"), f.get_tensor("scales")
        if meta["kind"] not in QMAX or not isinstance(meta["block"], int):
            raise ValueError(f"kind={meta['kind']!r} block={meta['block']!r}")
    except (OSError, KeyError, TypeError, ValueError, SafetensorError) as e:
        raise ValueError(f"{path} is not a saved quantised table: {e}") from e
    return meta, payload, scales


def quantization_error(
    reference: RowStore, quantized: RowStore, chunk_rows: int | None = None
) -> dict[str, float]:
    """How far `quantized` is from `reference` (value columns), over every row, chunk by chunk.

    max_abs_error: max |x - x'|; rms_error: sqrt(mean (x - x')^2); relative_rms_error:
    sqrt(sum (x - x')^2 / sum x^2) (0 when the reference is all zeros and the error too).
    """
    if (reference.num_rows, reference.dim) != (quantized.num_rows, quantized.dim):
        raise ValueError(
            f"tables differ in shape: {reference.num_rows} x {reference.dim} rows vs "
            f"{quantized.num_rows} x {quantized.dim}"
        )
    N, dim = reference.num_rows, reference.dim
    step = _chunk_rows(dim, chunk_rows)
    max_abs, err_sq, ref_sq = 0.0, 0.0, 0.0
    for start in range(0, N, step):
        rows = torch.arange(start, min(N, start + step), dtype=torch.int64)
        x = reference.read(rows, VALUE).to(torch.float64).cpu()
        diff = quantized.read(rows, VALUE).to(torch.float64).cpu() - x
        max_abs = max(max_abs, float(diff.abs().max()))
        err_sq += float(diff.square().sum())
        ref_sq += float(x.square().sum())
    relative = math.sqrt(err_sq / ref_sq) if ref_sq > 0 else (0.0 if err_sq == 0 else math.inf)
    return {
        "max_abs_error": max_abs,
        "rms_error": math.sqrt(err_sq / (N * dim)),
        "relative_rms_error": relative,
    }
