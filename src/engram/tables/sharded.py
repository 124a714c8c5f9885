"""Row-sharded tables: every rank owns a contiguous range of a table's rows and serves them.

A table of N rows is split over a process group of W ranks into contiguous ranges, the first
N mod W ranges one row longer (`RowShards`), so the owner of a row is a closed-form function of
its id and the group. Each rank keeps only its own range, in any `RowStore` (device, host, disk,
behind a cache), with its row optimiser's state beside the rows: no rank ever holds, or
all-reduces, a dense copy of a table or of its gradient.

One lookup (`sharded_lookup`), for a batch whose rows every rank knows from its own tokens:

    requester (every rank)                          owner (every rank)
    ids [U] sorted unique global rows of its batch
    owner(ids): sorted ids are grouped by owner
    counts per owner  ───── all_to_all ──────────►  counts it will serve, per requester
    ids per owner     ───── all_to_all ──────────►  local rows asked [R] (all requesters)
                                                    uniq [V], inv = unique(local rows)
                                                    values [V, r] = store.read(uniq): a leaf
    rows [U, r]  ◄──── all_to_all (autograd) ─────  values[inv]  [R, r]
    out [..., H*r] = embedding(inverse, rows)

    backward: the gradient of rows [U, r] travels back by the transposed all_to_all and is
    summed per unique local row into values.grad [V, r]: the owner steps its own rows with it.

So the bytes exchanged per step depend on the batch's unique rows, never on the table size, and
the `Lookup` returned has the requester's output with the owner's side of the gradient (`rows`
are this rank's local row ids, `values` its leaf), which the row optimisers step as they step a
local table. Every collective is called by every rank in the same order (forward, then the
backward of the same loss): the trainer runs them from the loop, on the main thread.
Legend: U unique rows a rank asks for, R rows asked of a rank, V unique rows of those, r row dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from engram.tables.base import RowStore
from engram.tables.lookup import Lookup, global_ids


@dataclass(frozen=True)
class RowShards:
    """Contiguous row ranges of a table of `num_rows` rows over `world` ranks, in rank order."""

    num_rows: int
    world: int

    def __post_init__(self) -> None:
        if self.num_rows < 0 or self.world < 1:
            raise ValueError(f"num_rows={self.num_rows} must be >= 0 and world={self.world} >= 1")

    @property
    def _base(self) -> int:  # rows of a short range
        return self.num_rows // self.world

    @property
    def _long(self) -> int:  # ranges one row longer, first in rank order
        return self.num_rows % self.world

    def start(self, rank: int) -> int:
        """The first global row of `rank`'s range."""
        return rank * self._base + min(rank, self._long)

    def size(self, rank: int) -> int:
        return self._base + (1 if rank < self._long else 0)

    def owner(self, ids: torch.Tensor) -> torch.Tensor:
        """The rank owning each global row id (int64, any shape), in closed form."""
        base, long = self._base, self._long
        edge = long * (base + 1)  # the first row of the short ranges
        if base == 0:  # fewer rows than ranks: row i is rank i's only row
            return ids.clone()
        return torch.where(ids < edge, ids // (base + 1), long + (ids - edge) // base)


@dataclass(frozen=True)
class ShardGroup:
    """The ranks a table is sharded over: this process's `rank` of `world`, and their group.

    `grad_scale` multiplies the row gradients an owner receives before its optimiser steps: with
    each rank's loss a mean over its own batch, 1/world makes the step the one a single process
    takes on the global batch (the dense part's all-reduce averages the same way).
    """

    rank: int
    world: int
    group: dist.ProcessGroup | None = None  # None: the default group
    grad_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"rank={self.rank} must be in [0, world={self.world})")

    def suffix(self) -> str:
        """What names this rank's shard in file and checkpoint names."""
        return f"rank{self.rank}-of-{self.world}"


class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward sends each gradient back where its row came from."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return _exchange(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


@dataclass
class Traffic:
    """Bytes this process sent to and received from other ranks by the row exchange (ids,
    counts, rows and their gradients; what stays on the rank is not counted)."""

    sent: int = 0
    received: int = 0

    def reset(self) -> None:
        self.sent = self.received = 0


TRAFFIC = Traffic()  # one process is one rank: its exchanges, for the logs and the benchmark


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    _count(x, out_splits, in_splits, group)
    return out


def _count(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> None:
    me = dist.get_rank(group)
    item = x.element_size() * math.prod(x.shape[1:])
    TRAFFIC.sent += item * (sum(in_splits) - in_splits[me])
    TRAFFIC.received += item * (sum(out_splits) - out_splits[me])


def _ask_owners(
    ids: torch.Tensor, shards: RowShards, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, list[int], list[int]]:
    """Send sorted unique global `ids` [U] to their owners: (local rows asked of this rank [R],
    ids sent per rank, ids received per rank). Collective."""
    world = dist.get_world_size(group)
    if world != shards.world:
        raise ValueError(f"the shards are for {shards.world} ranks, the group has {world}")
    owners = shards.owner(ids)
    send = torch.bincount(owners, minlength=world)  # ids are sorted, so grouped by owner
    recv = _exchange(send, [1] * world, [1] * world, group)
    send_splits, recv_splits = send.tolist(), recv.tolist()
    starts = torch.tensor([shards.start(r) for r in range(world)], dtype=torch.int64)
    asked = _exchange(ids - starts[owners], recv_splits, send_splits, group)
    return asked, send_splits, recv_splits


def rows_asked(
    ids: torch.Tensor, shards: RowShards, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """The sorted unique local rows [V] every rank's sorted unique global `ids` ask of this one:
    what an owner pins ahead for a batch before its lookup. Collective (ids only, no values)."""
    return torch.unique(_ask_owners(ids, shards, group)[0])


def exchange_rows(
    store: RowStore,
    ids: torch.Tensor,
    shards: RowShards,
    device: torch.device,
    group: dist.ProcessGroup | None = None,
    requires_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values of sorted unique global `ids` [U] (CPU) from their owners' `store`s.

    Returns (rows [U, r] on `device`, this rank's served local rows [V], their values [V, r]:
    a leaf when training, whose `.grad` after backward sums every rank's gradient of each row).
    Collective: every rank of `group` calls it, each with its own ids (possibly none).
    """
    asked, send_splits, recv_splits = _ask_owners(ids, shards, group)  # [R] local rows
    served, inverse = torch.unique(asked, sorted=True, return_inverse=True)  # [V], [R]
    values = store.read_to(served, device)  # [V, r], range checked against this rank's shard
    if requires_grad and torch.is_grad_enabled():
        values = values.detach().requires_grad_()
    rows = _AllToAll.apply(values[inverse.to(device)], send_splits, recv_splits, group)  # [U, r]
    return rows, served, values


def sharded_lookup(
    store: RowStore,
    rows: torch.Tensor,
    offsets: torch.Tensor,
    shards: RowShards,
    device: str | torch.device | None = None,
    group: dist.ProcessGroup | None = None,
    requires_grad: bool = True,
) -> Lookup:
    """Every head's row, concatenated, from a row-sharded table: rows [..., H] -> out [..., H*r].

    As `engram.tables.lookup.lookup`, except that `store` holds only this rank's range of the
    table (`shards`) and the rows come from their owners; the `Lookup`'s `rows`/`values` are
    this rank's served rows, for its row optimiser.
    """
    ids = global_ids(rows, offsets)
    device = rows.device if device is None else torch.device(device)
    uniq, inverse = torch.unique(ids.cpu(), sorted=True, return_inverse=True)  # [U], [..., H]
    values, served, leaf = exchange_rows(store, uniq, shards, device, group, requires_grad)
    out = F.embedding(inverse.to(device), values).flatten(start_dim=-2)  # [..., H*r]
    return Lookup(out=out, rows=served, values=leaf, inverse=inverse.to(device))
