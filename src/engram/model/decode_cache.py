"""The decoding cache: everything the next chunk of tokens needs from the past, kept exact.

Cached decoding of an Engram model needs three kinds of state per sequence, not one:

- attention keys and values of every block (as any Transformer);
- per Engram layer, the N-gram history: the last N-1 canonical ids (`HashState`), so a decode
  step hashes one token instead of the whole prefix;
- per Engram layer, the short convolution's input window: its last (kernel-1) * dilation
  normalised inputs, so the conv of a step sees exactly what the full forward saw.

With this state, logits of a full forward, of a prefill in chunks of any size and of token-by-
token decoding agree (tests/test_decoding.py), and the Engram work per step is O(1) in the
length of the context.

Padding. A chunk may contain padding anywhere (`attention_mask` False, e.g. left-padded
prompts, or right-padded ones). `Chunk` reorders each row stably so that its pads come first:
inside the model a row's real tokens are then contiguous and directly follow that row's cached
state, so no N-gram and no conv window ever contains a pad. Padded slots are never attended to,
rotary positions count real tokens only, and outputs are put back in the caller's order.

Legend: B batch, T chunk length, S cache slots, M branches, d width, R conv window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engram.hashing import HashState


@dataclass
class DecodeCache:
    """Per-sequence state of a batch being decoded. Build with `EngramLM.new_cache`."""

    keys: list[torch.Tensor]  # per block [B, n_kv, S, hd]
    values: list[torch.Tensor]  # per block [B, n_kv, S, hd]
    valid: torch.Tensor  # [B, S] bool: the slot holds a real token of that row
    positions: torch.Tensor  # [B] int64: the rotary position of each row's next real token
    last_eos: torch.Tensor  # [B] bool: the row's last real token ended a document
    hash_state: HashState | None  # N-gram history of every Engram layer (shared addresses)
    conv: dict[int, torch.Tensor]  # Engram layer -> [B, R, M, d] window, zeros where unseen
    length: int = 0  # slots used so far (the same for every row; pads fill the gaps)

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Forget the sequences selected by the bool mask `rows` [B] (all when None).

        Their slots stay allocated (the batch steps together) but are never attended to again;
        the next real token of a reset row starts at position 0 with an empty history.
        """
        if rows is None:
            rows = torch.ones(self.batch_size, dtype=torch.bool, device=self.valid.device)
        self.valid[rows] = False
        self.positions[rows] = 0
        self.last_eos[rows] = False
        if self.hash_state is not None:
            self.hash_state.reset(rows)
        for window in self.conv.values():
            window[rows] = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store a chunk's k, v [B, n_kv, T, hd] of block `layer`; all slots so far."""
        T = k.shape[2]
        end = self.length + T
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def commit(self, chunk: Chunk, ids: torch.Tensor, eos_id: int | None) -> None:
        """Advance past a chunk once every layer has read and written its state."""
        T = chunk.real.shape[1]
        self.valid[:, self.length : self.length + T] = chunk.real
        self.length += T
        if chunk.pads is None:  # every row advances by T: no count to take (a decode step)
            self.positions += T
            if eos_id is not None:
                self.last_eos = ids[:, -1] == eos_id
            return
        counts = chunk.real.sum(dim=1)
        self.positions += counts
        if eos_id is not None:
            # After the pads-first reorder, a row's last real token is its last column.
            self.last_eos = torch.where(counts > 0, ids[:, -1] == eos_id, self.last_eos)


@dataclass
class Chunk:
    """Facts about the tokens of one forward that every layer shares."""

    pads: torch.Tensor | None  # [B] leading pads per row after reordering (None: no padding)
    order: torch.Tensor | None  # [B, T] the pads-first permutation applied (None: identity)
    real: torch.Tensor  # [B, T] bool, in the reordered layout
    starts: torch.Tensor | None  # [B, T] bool: the token begins a document (None: no boundaries)
    positions: torch.Tensor | None  # [B, T] rotary positions (None: 0..T-1 for every row)
    mask: torch.Tensor | None  # [B, 1, T, S] bool attention mask (None: plain causal)

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """Put a [B, T, ...] output back into the caller's token order."""
        if self.order is None:
            return x
        index = self.order.view(*self.order.shape, *([1] * (x.ndim - 2))).expand_as(x)
        return torch.empty_like(x).scatter_(1, index, x)


def document_starts(ids: torch.Tensor, eos_id: int | None, real=None, last_eos=None):
    """[B, T] bool: tokens whose predecessor (the previous real token) is an EOS; or None.

    `real` [B, T] marks the real tokens, pads first (None: every token is real); `last_eos` [B]
    says whether each row's last cached real token was an EOS (None: no cache)."""
    if eos_id is None:
        return None
    if ids.shape[1] == 1 and last_eos is not None:  # a decode step: its token follows the cache
        return last_eos[:, None] if real is None else real & last_eos[:, None]
    starts = torch.zeros_like(ids, dtype=torch.bool)
    prev_eos = ids[:, :-1] == eos_id
    if real is not None:
        prev_eos = prev_eos & real[:, :-1]
    starts[:, 1:] = prev_eos
    if last_eos is not None:
        # The first real token follows the cache's last real token (pads come first).
        if real is None:
            starts[:, 0] |= last_eos
        else:
            first = real & ~torch.cat([torch.zeros_like(real[:, :1]), real[:, :-1]], dim=1)
            starts |= first & last_eos[:, None]
    return starts


def plain_chunk(ids: torch.Tensor, eos_id: int | None) -> Chunk:
    """A chunk without cache or padding: the training forward."""
    real = torch.ones_like(ids, dtype=torch.bool)
    return Chunk(None, None, real, document_starts(ids, eos_id), None, None)


def pads_first(
    ids: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(ids, real, order, pads): each row of ids [B, T] with its pads moved to the front.

    order [B, T] is the permutation and pads [B] the leading pads per row; both are None when
    `mask` (True = a real token) is None or has no pad, and ids come back unchanged.
    """
    real = torch.ones_like(ids, dtype=torch.bool)
    if mask is None or bool(mask.bool().all()):
        return ids, real, None, None
    mask = mask.bool()
    # A stable sort on "is real" moves pads to the front and keeps real tokens in order.
    order = torch.sort(mask.int(), dim=1, stable=True).indices  # [B, T]
    ids, real = ids.gather(1, order), mask.gather(1, order)
    return ids, real, order, (~real).sum(dim=1)


def cached_chunk(
    ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: DecodeCache,
    eos_id: int | None,
    max_positions: int,
) -> tuple[torch.Tensor, Chunk]:
    """Reorder `ids` pads-first and describe the chunk against `cache`; returns (ids, chunk).

    ValueError when a rotary position would reach `max_positions` (the model's max_seq_len):
    checked here once per forward, not by every layer's rotary."""
    B, T = ids.shape
    if cache.batch_size != B:
        raise ValueError(f"the cache holds {cache.batch_size} sequences, the chunk has {B}")
    if cache.length + T > cache.capacity:
        raise ValueError(
            f"the cache has room for {cache.capacity} tokens; {cache.length} are used and the "
            f"chunk adds {T}: build a larger cache"
        )
    if attention_mask is not None and attention_mask.shape != ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of ids {list(ids.shape)}, got "
            f"{list(attention_mask.shape)}"
        )
    ids, real, order, pads = pads_first(ids, attention_mask)
    positions = cache.positions[:, None] + (real.cumsum(dim=1) - 1).clamp_min(0)  # [B, T]
    # A row's positions count its real tokens, so they stay below the slots used: only past
    # that bound do they need reading (a host sync).
    if cache.length + T > max_positions and int(positions.max()) >= max_positions:
        raise ValueError(
            f"position {int(positions.max())} exceeds max_seq_len={max_positions}: the cache "
            "holds longer sequences than the model's rotary table"
        )
    # Without padding every token is real: no mask to combine the document starts with.
    starts = document_starts(ids, eos_id, None if pads is None else real, cache.last_eos)
    return ids, Chunk(pads, order, real, starts, positions, _attention_mask(real, cache))


def _attention_mask(real: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
    """[B, 1, T, S]: a query sees the real slots at or before its own; a pad sees itself only
    (a query with nothing to attend to would turn into NaN, and its output is discarded)."""
    B, T = real.shape
    S = cache.length + T
    keys = torch.cat([cache.valid[:, : cache.length], real], dim=1)  # [B, S]
    slot = torch.arange(S, device=real.device)
    query = cache.length + torch.arange(T, device=real.device)
    causal = slot[None, :] <= query[:, None]  # [T, S]
    own = slot[None, :] == query[:, None]
    return ((keys[:, None, :] & causal[None]) | own[None])[:, None]  # [B, 1, T, S]


__all__ = [
    "Chunk",
    "DecodeCache",
    "cached_chunk",
    "document_starts",
    "pads_first",
    "plain_chunk",
]
