"""The differentiable lookup of one batch's rows from any `RowStore`.

`HashedMemory.lookup` reads `table(rows + offsets)` from an `nn.Embedding` and lets autograd
produce a gradient for the table. With a table outside autograd's reach (host memory, disk,
behind a cache) the lookup instead:

    ids      = rows + offsets                           [B, T, H]  global row ids
    uniq, inv = unique(ids, sorted, inverse)             [U], [B, T, H]  each row read once
    values   = store.read(uniq) -> device               [U, r]     a leaf tensor (requires grad)
    e        = embedding(inv, values).flatten(-2)       [B, T, H*r]

After `backward`, `values.grad` [U, r] is the gradient of each *unique* row, summed over its
duplicates, which `Lookup.grads()` hands with `uniq` to a row-wise optimiser. The gather is
`F.embedding` over the unique rows, so its backward is the very kernel `nn.Embedding` runs
(duplicates accumulated in order of occurrence into a zeroed buffer): outputs and gradients are
bit-identical in fp32 to an `nn.Embedding` of the same table, whatever the placement (tested).
The leaf is where autograd stops, so no custom `autograd.Function` is needed and the lookup
composes with everything downstream (checkpointing, compile) like any other input.

Reading rows sorted and unique is also what the stores want: a disk table sees one sequential
sweep per batch, a cache one residency check per row. From pinned host memory the copy to the
accelerator is asynchronous (`non_blocking`), ordered on the current stream before any use.
`fetch` + `finish` split the same lookup in two, so that the read and the copy (on a CUDA side
stream) can run in a background thread while earlier layers compute (see `engram.tables.placed`).
Legend: B batch, T time, H heads (all orders), r row dim, U unique rows of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engram.tables.base import RowStore


@dataclass
class Lookup:
    """One batch's read of one table: the output and what its gradient needs."""

    out: torch.Tensor  # e [B, T, H*r]
    rows: torch.Tensor  # [U] sorted unique global row ids, int64
    values: torch.Tensor  # [U, r] the rows as read: a leaf, requires grad when training
    inverse: torch.Tensor  # [B, T, H] index of each (b, t, h) into `rows`

    def grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [U], gradient [U, r] summed over duplicates), for `RowOptimizer.step`."""
        if self.values.grad is None:
            raise ValueError(
                "this lookup has no gradient: call backward on a loss that uses `out` first "
                "(and look up with gradients enabled)"
            )
        return self.rows, self.values.grad


def global_ids(rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Head-local rows [..., H] plus each head's offset [H] -> global row ids [..., H] int64."""
    if not isinstance(rows, torch.Tensor) or rows.dtype not in (torch.int32, torch.int64):
        got = rows.dtype if isinstance(rows, torch.Tensor) else type(rows)
        raise ValueError(f"rows must be an int32 or int64 tensor [..., H], got {got}")
    if offsets.dtype != torch.int64 or offsets.ndim != 1:
        raise ValueError(f"offsets must be int64 [H], got {offsets.dtype} {list(offsets.shape)}")
    if rows.ndim < 1 or rows.shape[-1] != offsets.numel():
        raise ValueError(
            f"rows {list(rows.shape)} must end in H = {offsets.numel()} (one id per head)"
        )
    return rows.to(torch.int64) + offsets.to(rows.device)


def lookup(
    store: RowStore,
    rows: torch.Tensor,
    offsets: torch.Tensor,
    device: str | torch.device | None = None,
    requires_grad: bool = True,
) -> Lookup:
    """Every head's row, concatenated: rows [..., H] (head-local) -> `Lookup.out` [..., H*r].

    `device`: where `out` is computed (default: the device of `rows`). `requires_grad`: build
    the gradient path (it is also off under `torch.no_grad()`, e.g. for inference).
    """
    ids = global_ids(rows, offsets)
    device = rows.device if device is None else torch.device(device)
    uniq, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    values = store.read_to(uniq, device)  # [U, r], range checked by the store
    return _assemble(uniq, values, inverse.to(device), requires_grad)


@dataclass
class Fetched:
    """The first half of a lookup, done ahead of its layer (`fetch`): rows read and on their way."""

    rows: torch.Tensor  # [U] sorted unique global row ids, int64, on the CPU
    inverse: torch.Tensor  # [B, T, H] index of each (b, t, h) into `rows`, on the device
    values: torch.Tensor  # [U, r] on the device (being copied there while `ready` is pending)
    ready: torch.cuda.Event | None = None  # end of the copies on a side stream


def fetch(
    store: RowStore, ids: torch.Tensor, device: torch.device, stream: torch.cuda.Stream | None
) -> Fetched:
    """Read global `ids` [B, T, H] (CPU) from `store` and start their copy to `device`.

    Meant for a background thread while earlier layers compute: the host-side gather runs here,
    and with a CUDA `stream` (a side stream) the copies to the device are queued on it, so they
    overlap the compute stream's kernels instead of waiting behind them. `finish` makes the
    compute stream wait for them.
    """
    uniq, inverse = torch.unique(ids.cpu(), sorted=True, return_inverse=True)
    if stream is None:
        return Fetched(uniq, inverse.to(device), store.read_to(uniq, device))
    with torch.cuda.stream(stream):  # this thread's current stream: the copies go on it
        values = store.read_to(uniq, device)
        inverse = inverse.pin_memory().to(device, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(stream)
    return Fetched(uniq, inverse, values, ready)


def finish(fetched: Fetched, requires_grad: bool = True) -> Lookup:
    """The lookup of `fetched` rows, on the current stream: the same `Lookup` as `lookup`."""
    if fetched.ready is not None:
        current = torch.cuda.current_stream(fetched.values.device)
        current.wait_event(fetched.ready)
        # Made on the side stream, used on this one: the allocator must not reuse their memory
        # before this stream is done with them.
        fetched.values.record_stream(current)
        fetched.inverse.record_stream(current)
    return _assemble(fetched.rows, fetched.values, fetched.inverse, requires_grad)


def _assemble(
    rows: torch.Tensor, values: torch.Tensor, inverse: torch.Tensor, requires_grad: bool
) -> Lookup:
    """out = values[inverse] flattened over heads; `values` a leaf when training."""
    if requires_grad and torch.is_grad_enabled():
        values = values.detach().requires_grad_()
    out = F.embedding(inverse, values).flatten(start_dim=-2)  # [..., H, r] -> [..., H*r]
    return Lookup(out=out, rows=rows, values=values, inverse=inverse)
