"""One forward's chunk and the decoding state of Engram in a Hugging Face model (`engram.hf`).

State. Beside the K/V, the next chunk of each sequence needs the last N-1 canonical ids
(`HashState`), whether its last real token was an EOS, and each Engram layer's conv window.
`EngramState` holds them on the cache object itself (`cache.engram_state`). `adopt` switches a
cache to a subclass of its own class that also reorders, selects, repeats, resets and rolls back
that state whenever `generate()` does so to the K/V (beam search, contrastive search, a deferred
stop check).

PreparedChunk. `prepare_chunk` reorders each row of a forward's ids stably so that its pads
(attention_mask 0) come first, as `engram.model.decode_cache` does: the row's real tokens then
directly follow its cached state, so no N-gram and no conv window ever contains a pad. It hashes
the chunk once for every Engram layer and advances the state. `engram_output` runs one layer's
Engram in that order and puts its output back in the caller's order, zero at pads.

Legend: B batch, T chunk length, d hidden size, H heads (all orders), R conv window.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache

from engram.hashing import HashState, NgramHasher
from engram.model.decode_cache import document_starts, pads_first
from engram.module import Engram

SNAPSHOTS = 4  # whole forwards that `cache.crop` can undo (generate undoes at most one)


@dataclass
class EngramState:
    """What the next chunk of each sequence needs from its past, beside the K/V."""

    hash_state: HashState  # last N-1 canonical ids per row, pad where not visible
    last_eos: torch.Tensor  # [B] bool: the row's last real token ended a document
    windows: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, R, 1, d]
    length: int = 0  # slots consumed, pads included: equals the cache's sequence length

    def clone(self) -> EngramState:
        history = HashState(self.hash_state.history.clone(), self.hash_state.pad_id)
        windows = {k: w.clone() for k, w in self.windows.items()}
        return EngramState(history, self.last_eos.clone(), windows, self.length)

    def select(self, index: torch.Tensor) -> None:
        """Keep rows `index` (long indices or a bool mask over the batch), in that order."""
        history = self.hash_state.history
        self.hash_state = HashState(history[index.to(history.device)], self.hash_state.pad_id)
        self.last_eos = self.last_eos[index.to(self.last_eos.device)]
        self.windows = {k: w[index.to(w.device)] for k, w in self.windows.items()}


class EngramCacheMixin:
    """Mixed into a `transformers` cache class: keeps `engram_state` in step with the K/V."""

    engram_state: EngramState | None = None
    engram_snapshots: deque[EngramState] | None = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._engram_select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._engram_select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.engram_state is not None:
            rows = self.engram_state.last_eos.shape[0]
            self._engram_select(torch.arange(rows).repeat_interleave(repeats))

    def reset(self) -> None:
        super().reset()
        self.engram_state, self.engram_snapshots = None, None

    def crop(self, tokens_to_remove: int) -> None:
        # Checked before the K/V are cropped, so a refused crop leaves the cache as it was.
        if tokens_to_remove != 0 and self.engram_state is not None:
            self._engram_rollback(tokens_to_remove)
        super().crop(tokens_to_remove)

    def _engram_select(self, index: torch.Tensor) -> None:
        if self.engram_state is not None:
            self.engram_state.select(index)
        self.engram_snapshots = None  # snapshots keep the old batch order

    def _engram_rollback(self, tokens_to_remove: int) -> None:
        target = self.engram_state.length + tokens_to_remove if tokens_to_remove < 0 else -1
        snapshots = self.engram_snapshots or deque()
        if target < 0 or all(s.length != target for s in snapshots):
            raise ValueError(
                f"cannot crop {tokens_to_remove} tokens: Engram's N-gram and conv state can only "
                f"be rolled back by whole forward calls (one of the last {SNAPSHOTS}); "
                "assisted or speculative decoding is not supported"
            )
        while snapshots[-1].length != target:  # each snapshot is the state before a forward
            snapshots.pop()
        self.engram_state = snapshots.pop()


_CACHE_CLASSES: dict[type, type] = {}


def adopt(cache: Cache) -> EngramCacheMixin:
    """Give `cache` Engram's state handling by switching it to a subclass of its own class."""
    if isinstance(cache, EngramCacheMixin):
        return cache
    cls = type(cache)
    if cls not in _CACHE_CLASSES:
        _CACHE_CLASSES[cls] = type(f"Engram{cls.__name__}", (EngramCacheMixin, cls), {})
    # generate() creates the cache itself and keeps its own reference to it: changing the
    # object's class is the one way to make that very object carry the state along.
    cache.__class__ = _CACHE_CLASSES[cls]
    return cache


def state_for(
    cache: Cache, hasher: NgramHasher, batch_size: int, device: torch.device
) -> EngramState:
    """The cache's Engram state, checked against its K/V; a snapshot is kept for `crop`."""
    cache = adopt(cache)
    seen = cache.get_seq_length()
    state = cache.engram_state
    if state is None:
        if seen != 0:
            raise ValueError(
                f"the cache already holds {seen} tokens that Engram has not seen: "
                "start from an empty cache after adding Engram"
            )
        empty = torch.zeros(batch_size, dtype=torch.bool, device=device)
        state = cache.engram_state = EngramState(hasher.initial_state(batch_size, device), empty)
    elif state.length != seen or state.last_eos.shape[0] != batch_size:
        raise ValueError(
            f"the cache holds {seen} tokens but Engram's state {state.length} tokens of "
            f"{state.last_eos.shape[0]} rows (this batch: {batch_size}): the cache was changed "
            "outside the model or belongs to another batch"
        )
    if cache.engram_snapshots is None:
        cache.engram_snapshots = deque(maxlen=SNAPSHOTS)
    cache.engram_snapshots.append(state.clone())
    return state


@dataclass
class PreparedChunk:
    """Facts about one forward's tokens that every Engram layer shares (pads-first layout)."""

    rows: dict[int, torch.Tensor]  # layer -> [B, T, H]
    real: torch.Tensor  # [B, T] bool
    order: torch.Tensor | None  # [B, T] the pads-first permutation (None: no attention_mask)
    pads: torch.Tensor | None  # [B] leading pads per row
    starts: torch.Tensor | None  # [B, T] bool: the token begins a document
    state: EngramState | None  # the cache's state (None: no cache)


def prepare_chunk(
    hasher: NgramHasher,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    state: EngramState | None,
    layers: tuple[int, ...],
) -> PreparedChunk:
    """Reorder pads first, hash `ids` [B, T] after `state` and advance `state` past them.

    `mask` is the model's 2D attention_mask over past and chunk ([B, past + T]); `layers` are
    the Engram layers whose rows are kept.
    """
    B, T = ids.shape
    if mask is not None and (mask.ndim != 2 or mask.shape[0] != B or mask.shape[1] < T):
        raise ValueError(
            f"Engram needs a 2D attention_mask [B, past + T] with B={B}, T={T}; got "
            f"{list(mask.shape)} (static caches build 4D masks: use the dynamic cache)"
        )
    chunk_mask = mask[:, -T:].to(ids.device) if mask is not None else None
    ids, real, order, pads = pads_first(ids, chunk_mask)
    history = state.hash_state if state is not None else None
    stacked, new_history = hasher.hash_stacked(ids, history, pads=pads)  # [L, B, T, H]
    spec_layers = hasher.spec.layer_ids
    rows = {layer: stacked[spec_layers.index(layer)] for layer in layers}
    eos = hasher.spec.eos_id
    starts = document_starts(ids, eos, real, state.last_eos if state is not None else None)
    if state is not None:
        if eos is not None:  # after the reorder a row's last real token is its last column
            state.last_eos = torch.where(real.any(dim=1), ids[:, -1] == eos, state.last_eos)
        state.hash_state, state.length = new_history, state.length + T
    return PreparedChunk(rows, real, order, pads, starts, state)


def hashed_chunk(
    hasher: NgramHasher, ids: torch.Tensor, rows: dict[int, torch.Tensor], layers: tuple[int, ...]
) -> PreparedChunk:
    """A chunk whose rows were hashed already (a training batch's, by the data loader, exactly
    as `prepare_chunk` would): no pads and no cache; documents start after each EOS."""
    real = torch.ones_like(ids, dtype=torch.bool)
    starts = document_starts(ids, hasher.spec.eos_id, real, None)
    return PreparedChunk({layer: rows[layer] for layer in layers}, real, None, None, starts, None)


def engram_output(engram: Engram, hidden: torch.Tensor, chunk: PreparedChunk) -> torch.Tensor:
    """Engram's output for hidden [B, T, d] in the caller's order, zero at pads."""
    device = hidden.device
    order = chunk.order.to(device) if chunk.order is not None else None
    pads = chunk.pads.to(device) if chunk.pads is not None else None
    starts = chunk.starts.to(device) if chunk.starts is not None else None
    window = _window(engram, hidden, chunk.state)
    rows = chunk.rows[engram.layer_id].to(device)
    if order is not None:
        hidden = hidden.gather(1, order.unsqueeze(-1).expand_as(hidden))
    y = engram(hidden, rows, starts, pads, window)  # [B, T, d]
    if window is not None and window.requires_grad:
        # The window was written from a graph (training with a cache): keep values only.
        chunk.state.windows[engram.layer_id] = window.detach()
    if order is None:
        return y
    y = y * chunk.real.to(device).unsqueeze(-1)
    return torch.empty_like(y).scatter_(1, order.unsqueeze(-1).expand_as(y), y)


def _window(engram: Engram, hidden: torch.Tensor, state: EngramState | None) -> torch.Tensor | None:
    """The layer's conv window [B, R, 1, d] in the cache (created zero on first use)."""
    if state is None or engram.conv is None:
        return None
    window = state.windows.get(engram.layer_id)
    if window is None:
        B, d = hidden.shape[0], hidden.shape[-1]
        shape = (B, engram.conv.receptive, 1, d)
        window = torch.zeros(shape, dtype=hidden.dtype, device=hidden.device)
        state.windows[engram.layer_id] = window
    return window


__all__ = [
    "SNAPSHOTS",
    "EngramCacheMixin",
    "EngramState",
    "PreparedChunk",
    "adopt",
    "engram_output",
    "hashed_chunk",
    "prepare_chunk",
    "state_for",
]
