"""Deterministic row initialisation: a row's initial value is a pure function of its id.

A table that lives on disk is materialised lazily: a row costs nothing until it is first written,
and until then it reads as its initial value. For that value not to depend on *when* (or in what
order, or in which placement) a row is first touched, it cannot come from a stateful RNG such as
`nn.init.normal_`; it is computed from a counter instead:

    key     = splitmix64(splitmix64(seed) ^ table_id)                 one stream per table
    k       = 2 * (row * ceil(dim / 2) + col // 2)                    counter of a pair of columns
    z1, z2  = outputs k and k + 1 of the SplitMix64 sequence seeded with key
            = mix(key + (k + 1) * G), mix(key + (k + 2) * G)          G = 0x9E3779B97F4A7C15
    u1      = ((z1 >> 11) + 1) / 2^53  in (0, 1]     u2 = (z2 >> 11) / 2^53  in [0, 1)
    value   = std * sqrt(-2 ln u1) * (cos if col is even else sin)(2 pi u2)
                                                        Box-Muller, float64 math -> float32

SplitMix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014)
passes BigCrush and is a bijection of 64-bit words, so distinct counters never collide. The
arithmetic runs on numpy uint64 arrays, which wrap modulo 2^64 exactly like the reference C code
(torch has no full uint64 arithmetic, and its int64 `>>` is arithmetic, not logical). Everything
runs on the CPU in float64, so every placement (device, host, disk) sees the same bits whatever an
accelerator's libm does; a device table copies the values over once at construction.

It lives in the core because every Engram table starts this way (`engram.module.HashedMemory`):
table_id = the Engram layer id, seed = one draw from torch's RNG at construction. So a model
trained with its tables on the device, in host memory or on disk (`engram.tables`) starts from
the same bits, and the dense weights after it draw the same random numbers in every placement.
Legend: U rows, r row dim.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio, SplitMix64's increment
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_CHUNK = 1 << 20  # elements per vectorised pass: bounds the int64/float64 temporaries to ~40 MB


def splitmix64_int(x: int) -> int:
    """SplitMix64's output function on one Python int (exact reference, used for the keys)."""
    z = (x + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function, elementwise on uint64 (numpy wraps modulo 2^64 silently)."""
    z = x + np.uint64(_GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class RowInit:
    """N(0, std) initial rows of one table: `init(rows [U], dim) -> [U, dim]` float32 on the CPU.

    seed: the run's table seed; table_id: which table (the Engram layer id), so that two tables
    of one run start differently; std: the standard deviation (0 gives zeros).
    """

    seed: int
    table_id: int
    std: float
    first_row: int = 0  # a shard of a table: its row 0 is the table's row `first_row`

    def validate(self) -> None:
        if not all(isinstance(x, int) for x in (self.seed, self.table_id, self.first_row)):
            raise ValueError(
                f"seed={self.seed!r}, table_id={self.table_id!r} and "
                f"first_row={self.first_row!r} must be ints"
            )
        if self.first_row < 0:
            raise ValueError(f"first_row={self.first_row} must be >= 0")
        if not (math.isfinite(self.std) and self.std >= 0):
            raise ValueError(f"std={self.std} must be finite and >= 0")

    @property
    def key(self) -> int:
        """The table's SplitMix64 seed (a uint64 value)."""
        return splitmix64_int(splitmix64_int(self.seed & _MASK64) ^ (self.table_id & _MASK64))

    def __call__(self, rows: torch.Tensor, dim: int) -> torch.Tensor:
        """Initial values of `rows` (any order, duplicates allowed): [U] int64 -> [U, dim]."""
        self.validate()
        if rows.dtype != torch.int64 or rows.ndim != 1:
            got = f"{rows.dtype} {list(rows.shape)}"
            raise ValueError(f"rows must be a 1-D int64 tensor, got {got}")
        if dim < 1:
            raise ValueError(f"dim={dim} must be >= 1")
        ids = rows.cpu().numpy()
        if ids.size and int(ids.min()) < 0:
            raise ValueError(f"row ids must be >= 0, got {int(ids.min())}")
        if self.first_row:
            ids = ids + self.first_row
        step = max(1, _CHUNK // dim)
        if ids.size <= step:  # the common case (a batch's rows): no second copy
            return torch.from_numpy(self._chunk(ids, dim))
        out = torch.empty(ids.size, dim, dtype=torch.float32)
        for start in range(0, ids.size, step):
            part = self._chunk(ids[start : start + step], dim)
            out[start : start + part.shape[0]] = torch.from_numpy(part)
        return out

    def _chunk(self, ids: np.ndarray, dim: int) -> np.ndarray:
        """[U] row ids -> [U, dim] float32, every SplitMix64 output of the chunk in one pass."""
        pairs = (dim + 1) // 2  # Box-Muller gives two independent normals per pair of uniforms
        k = ids.astype(np.uint64)[:, None] * np.uint64(pairs) + np.arange(pairs, dtype=np.uint64)
        k *= np.uint64(2)  # [U, r/2] counter of the pair's first output
        # Outputs k and k + 1 of the sequence seeded with key: mix(key + (k + 1) G) and
        # mix(key + (k + 2) G); `splitmix64` adds one G itself.
        state = k[..., None] + np.arange(2, dtype=np.uint64)  # [U, r/2, 2]
        state *= np.uint64(_GOLDEN)
        state += np.uint64(self.key)
        top = splitmix64(state) >> np.uint64(11)  # the top 53 bits
        top[..., 0] += np.uint64(1)  # u1 in (0, 1], safe for log; u2 in [0, 1)
        u = top.astype(np.float64) * 2.0**-53
        radius = np.sqrt(-2.0 * np.log(u[..., 0])) * self.std
        angle = (2.0 * np.pi) * u[..., 1]
        both = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=-1)
        flat = both.reshape(ids.size, 2 * pairs)[:, :dim]  # col 2j: cos, 2j+1: sin
        return flat.astype(np.float32)

    def shard(self, first_row: int) -> RowInit:
        """The init of a shard whose row 0 is this table's row `first_row`: its rows start as
        the whole table's would (`engram.tables.sharded`)."""
        return replace(self, first_row=self.first_row + first_row)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.first_row:  # files of whole tables read as they did before shards
            del data["first_row"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RowInit:
        init = cls(
            seed=int(data["seed"]),
            table_id=int(data["table_id"]),
            std=float(data["std"]),
            first_row=int(data.get("first_row", 0)),
        )
        init.validate()
        return init


def fill_initial(records: torch.Tensor, init: RowInit, dim: int) -> None:
    """Write every row's initial value into records[:, :dim] (any device), a chunk at a time.

    Used by the in-memory placements, which materialise the whole table at construction; the
    values are computed on the CPU (see the module docstring) and copied over.
    """
    num_rows = records.shape[0]
    step = max(1, (_CHUNK * 8) // dim)
    for start in range(0, num_rows, step):
        rows = torch.arange(start, min(num_rows, start + step), dtype=torch.int64)
        records[start : start + rows.numel(), :dim].copy_(init(rows, dim))
