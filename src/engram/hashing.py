"""N-gram hashing: token ids -> per-head table rows, vectorised in torch on the input's device.

For each Engram layer l, order n and head k (paper section 2.2; official demo `NgramHashMapping`):

    x'          canonical ids (the compressed vocabulary applied to the token ids)
    s_j[t]      x'[t - j], or the canonical pad id before the sequence (or document) start
    mix_n[t]    s_0[t]*m_0 XOR s_1[t]*m_1 XOR ... XOR s_{n-1}[t]*m_{n-1}     (int64, no overflow)
    row[t]      mix_n[t] mod p_{l,n,k}

Heads are ordered by order, then head, which is also the order of `HashSpec.layer_primes`.

Axes: B batch, T time, L Engram layers, K shifts (max order), H heads per layer (all orders).

Hashing is a pure function of ids and spec, so it runs equally in the model and in a data loader.
`HashState` carries the last N-1 canonical ids of each sequence, so hashing chunk by chunk or token
by token (for cached decoding) gives exactly what hashing the whole sequence gives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engram.spec import HashSpec
from engram.vocab import CompressedVocab


@dataclass
class HashState:
    """What position T (the next token) sees of the past: x'[T-N+1..T-1], pad where not visible.

    `history[:, -1]` is the most recent token. Positions across a document boundary are already
    replaced by the pad id, so the state needs no separate boundary flag.
    """

    history: torch.Tensor  # [B, K-1] int64 canonical ids
    pad_id: int  # canonical pad id: what a forgotten position reads as

    @property
    def batch_size(self) -> int:
        return self.history.shape[0]

    def reset(self, rows: torch.Tensor) -> None:
        """Forget the past of the sequences selected by the bool mask `rows` [B] (new documents)."""
        self.history[rows] = self.pad_id


def check_ids(ids: torch.Tensor, vocab_size: int, name: str = "ids") -> None:
    """Raise ValueError for anything that is not a [B, T] integer tensor of ids in [0, vocab).

    Under `torch.compile` only the type, dtype and shape are checked: the range check reads
    the ids' values (`.min()`, `.max()` to Python), a data-dependent graph break. Compiled
    callers validate their ids beforehand (the training data loader hashes, and so checks,
    every batch eagerly); an id out of range there would index the lookup out of bounds.
    """
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"{name} must have an integer dtype, got {ids.dtype}")
    if ids.ndim != 2:
        raise ValueError(f"{name} must have shape [B, T], got {list(ids.shape)}")
    if ids.numel() == 0 or torch.compiler.is_compiling():
        return
    if ids.numel() <= 64:  # a decode step's few ids: one read costs less than a reduction
        values = [v for row in ids.tolist() for v in row]  # no reshape: one op less a step
        lo, hi = min(values), max(values)
    else:
        lo, hi = (int(v) for v in torch.aminmax(ids))  # one pass over the ids
    if lo < 0:
        raise ValueError(f"{name} contains a negative id ({lo})")
    if hi >= vocab_size:
        raise ValueError(f"{name} contains id {hi}, outside the tokenizer's [0, {vocab_size})")


def move_pads_first(ext: torch.Tensor, pads: torch.Tensor, state_len: int) -> torch.Tensor:
    """[state, pads, real] -> [pads, state, real] along dim 1 of ext [B, state_len + T, ...].

    Row b has pads[b] pads right after its state: afterwards its real tokens directly follow
    its state, as if the pads had never been there.
    """
    B, L = ext.shape[:2]
    i = torch.arange(L, device=ext.device)[None, :]  # [1, L]
    p = pads[:, None]  # [B, 1]
    src = torch.where(i < p, state_len + i, torch.where(i < p + state_len, i - p, i))
    index = src.view(B, L, *([1] * (ext.ndim - 2))).expand_as(ext)
    return ext.gather(1, index)


# The smallest prime `remainder_by_reciprocal` is exact for (see its docstring).
RECIPROCAL_MIN_PRIME = 1 << 12


def remainder_by_reciprocal(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`torch.remainder(x, p)` for int64 `x` and int64 primes 2^12 <= `p` < 2^62, broadcast,
    through a float64 quotient: one fused vector loop under `torch.compile`, where the plain 64-bit
    remainders compile to scalar divisions (x86 has no vector 64-bit integer division).

    Exact for every int64 x: the float quotient fl(fl(x) * fl(1/p)) carries three roundings of
    at most 2^-53 each, so it is off from x/p by at most 3.01 * 2^-53 * 2^63 / p = 3.01 * 2^10 / p
    <= 0.76 for p >= 2^12. Its floor is then q - 1, q or q + 1 for the true floor q, so
    r = x - floor * p (exact in wrapping int64 arithmetic, as r is small) lies in [-p, 2p), and
    one correction each way lands it in [0, p). A second correction each way (free inside the
    fused loop) leaves room for a quotient off by two: a compiler allowed fast-math may take 1/p
    from an approximate reciprocal a few ulps off. tests/test_hashing.py holds it to
    torch.remainder at the int64 extremes and next to multiples of p. Eager, its passes over
    memory are slower than `torch.remainder`'s one, so the hasher uses it only while compiling.
    """
    q = torch.floor(x.double() * (1.0 / p.double())).long()  # x // p, give or take two
    return reduce_near(x - q * p, p)


def reduce_near(r: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """r mod p for int64 r in [-2p, 3p) (p > 0, broadcast): two corrections each way."""
    for _ in range(2):
        r = r + ((r >> 63) & p)  # r < 0: add p
    for _ in range(2):
        over = r - p
        r = torch.where(over >= 0, over, r)
    return r  # in [0, p)


def _canonical(ids: torch.Tensor, lookup: torch.Tensor) -> torch.Tensor:
    """lookup[ids] for ids [B, T]: index_select on the flat ids is faster than advanced
    indexing on one thread."""
    return lookup.index_select(0, ids.reshape(-1).long()).view(ids.shape)


class NgramHasher:
    """Maps token ids [B, T] to row indices [B, T, H] per Engram layer, bit-exact with the demo."""

    def __init__(self, spec: HashSpec, vocab: CompressedVocab) -> None:
        if (
            vocab.fingerprint != spec.vocab_map_fingerprint
            or vocab.size != spec.compressed_vocab_size
        ):
            raise ValueError(
                "this vocab map is not the one the spec was built with (map "
                f"{vocab.fingerprint[:12]}, {vocab.size} ids vs spec "
                f"{spec.vocab_map_fingerprint[:12]}, {spec.compressed_vocab_size} ids): "
                "wrong tokenizer or compression setting"
            )
        self.spec = spec
        self._lookup = torch.from_numpy(vocab.lookup.copy())  # [V]
        self._multipliers = torch.tensor(spec.multipliers, dtype=torch.int64)  # [L, K]
        self._primes = torch.tensor(spec.primes, dtype=torch.int64)  # [L, H]
        self._reciprocal_ok = min(min(layer) for layer in spec.primes) >= RECIPROCAL_MIN_PRIME
        self._on_device: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        # A drop-in for `hash_one` (same arguments and results), e.g. the compiled one that
        # engram.inference.compiled installs; None: the eager method.
        self.fast_hash_one: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        # Cached per device so the hasher follows its input without naming a device itself.
        if device not in self._on_device:
            self._on_device[device] = tuple(
                t.to(device) for t in (self._lookup, self._multipliers, self._primes)
            )
        return self._on_device[device]

    # ---- public API ----------------------------------------------------------------------------
    def canonicalize(self, ids: torch.Tensor) -> torch.Tensor:
        """Canonical ids x' of `ids` [B, T] (validated)."""
        check_ids(ids, self.spec.vocab_size)
        return _canonical(ids, self._constants(ids.device)[0])

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> HashState:
        """The state before any token: every past position reads as the pad id."""
        history = torch.full(
            (batch_size, self.spec.max_order - 1),
            self.spec.canonical_pad_id,
            dtype=torch.int64,
            device=device,
        )
        return HashState(history, self.spec.canonical_pad_id)

    def __call__(
        self, ids: torch.Tensor, doc_starts: torch.Tensor | None = None
    ) -> dict[int, torch.Tensor]:
        """Row indices per layer id: {layer: [B, T, H] int64, each in [0, prime)}."""
        stacked, _ = self.hash_stacked(ids, doc_starts=doc_starts)
        return dict(zip(self.spec.layer_ids, stacked.unbind(0), strict=True))

    def step(
        self,
        ids: torch.Tensor,
        state: HashState,
        doc_starts: torch.Tensor | None = None,
        pads: torch.Tensor | None = None,
    ) -> tuple[dict[int, torch.Tensor], HashState]:
        """Hash the next chunk (one token or many) after `state`; returns rows and the new state.

        `pads` [B]: row b's first pads[b] tokens are padding. Its real tokens continue `state`
        as if the pads were absent; the pads' own rows are meaningless (mask them out).
        """
        stacked, new_state = self.hash_stacked(ids, state=state, doc_starts=doc_starts, pads=pads)
        return dict(zip(self.spec.layer_ids, stacked.unbind(0), strict=True)), new_state

    def hash_stacked(
        self,
        ids: torch.Tensor,
        state: HashState | None = None,
        doc_starts: torch.Tensor | None = None,
        pads: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, HashState]:
        """Rows of every layer as one [L, B, T, H] tensor, and the state after the chunk.

        `doc_starts` [B, T] bool marks tokens that begin a new document (no N-gram reaches back
        past them). With `spec.doc_boundaries`, the token after each EOS is such a start too.
        """
        check_ids(ids, self.spec.vocab_size)
        lookup, multipliers, primes = self._constants(ids.device)
        B, T = ids.shape
        if state is None:
            state = self.initial_state(B, ids.device)
        elif state.history.shape != (B, self.spec.max_order - 1):
            raise ValueError(
                f"state holds {list(state.history.shape)} history, expected "
                f"[{B}, {self.spec.max_order - 1}] for this batch"
            )
        if T == 1 and doc_starts is None and pads is None:
            hash_one = self.fast_hash_one or self.hash_one
            history = state.history  # `.to` of a tensor already there is still an op a step
            if history.device != ids.device:
                history = history.to(ids.device)
            rows, history = hash_one(ids, history, lookup, multipliers, primes)
            return rows, HashState(history, self.spec.canonical_pad_id)
        canon = _canonical(ids, lookup)  # [B, T]
        starts = self._document_starts(ids, doc_starts, pads)  # [B, T] bool or None
        dist = self._distance_to_start(starts, B, T, ids.device)  # [B, T]
        ext = torch.cat([state.history.to(ids.device), canon], dim=1)  # [B, K-1+T]
        if pads is not None:  # [history, pads, real] -> [pads, history, real]
            ext = move_pads_first(ext, pads.to(ids.device), self.spec.max_order - 1)
        shifts = self._shifts(ext, dist, T)  # [K, B, T]
        rows = self._rows(shifts, multipliers, primes)  # [L, B, T, H]
        new_state = self._next_state(ext, ids, dist, T)
        if pads is not None:  # a row of nothing but pads keeps its state
            empty = (pads.to(ids.device) == T)[:, None]
            new_state.history = torch.where(empty, state.history.to(ids.device), new_state.history)
        return rows, new_state

    def hash_one(
        self,
        ids: torch.Tensor,
        history: torch.Tensor,
        lookup: torch.Tensor,
        multipliers: torch.Tensor,
        primes: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A decoding step's hash: ids [B, 1] (validated) after `history` [B, K-1] -> rows
        [L, B, 1, H] and the next history. One token per row, no pads, no explicit starts: the
        same rows as the general path in a third of the ops. The history already reads as pad
        past a boundary, so only an EOS just seen needs handling.

        A pure function of its tensors (the constants come in as arguments), so that
        `engram.inference.compiled` can export and compile it as it stands.
        """
        K, heads = self.spec.max_order, self.spec.config.heads_per_order
        canon = _canonical(ids, lookup)  # [B, 1]
        ext = torch.cat([history, canon], dim=1)  # [B, K], oldest first
        products = ext[:, None] * multipliers.flip(1)  # [B, L, K]: column i is s_{K-1-i} m_{K-1-i}
        mix, mixes = products[..., K - 1], []
        for n in range(2, K + 1):
            mix = mix ^ products[..., K - n]
            if n in self.spec.orders:
                mixes.append(mix)
        layers = primes.shape[0]
        p = primes.view(layers, len(mixes), heads)  # [L, orders, heads]
        rows = self._remainder(torch.stack(mixes, -1)[..., None], p)  # [B, L, orders, heads]
        rows = rows.view(-1, layers, p[0].numel()).transpose(0, 1).unsqueeze(2)  # [L, B, 1, H]
        history = ext[:, 1:]  # [B, K-1]
        if self.spec.eos_id is not None:
            history = torch.where(ids == self.spec.eos_id, self.spec.canonical_pad_id, history)
        return rows, history

    # ---- the computation, step by step ---------------------------------------------------------
    def _document_starts(
        self, ids: torch.Tensor, doc_starts: torch.Tensor | None, pads: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        if doc_starts is not None and (
            doc_starts.shape != ids.shape or doc_starts.dtype != torch.bool
        ):
            raise ValueError(
                f"doc_starts must be a bool tensor of shape {list(ids.shape)}, got "
                f"{doc_starts.dtype} {list(doc_starts.shape)}"
            )
        eos = self.spec.eos_id
        if eos is None or (ids.shape[1] == 1 and doc_starts is None):
            return doc_starts  # a one-token chunk's EOS predecessor lives in the state
        after_eos = torch.zeros_like(ids, dtype=torch.bool)
        after_eos[:, 1:] = ids[:, :-1] == eos
        if pads is not None:  # a pad may share the EOS id (as in many HF tokenizers)
            real = torch.arange(ids.shape[1], device=ids.device)[None, :] >= pads[:, None]
            after_eos[:, 1:] &= real[:, :-1]
        return after_eos if doc_starts is None else after_eos | doc_starts

    def _distance_to_start(
        self, starts: torch.Tensor | None, B: int, T: int, device: torch.device
    ) -> torch.Tensor | None:
        """How many past positions each token may see (the state's K-1 count as visible);
        None when no token of the chunk starts a document (all of the state is visible)."""
        if starts is None:
            return None
        pos = torch.arange(T, device=device).expand(B, T)
        visible = self.spec.max_order - 1
        # Index of the latest start at or before t; -visible where none (the history counts).
        last_start = torch.where(starts, pos, torch.full_like(pos, -visible)).cummax(dim=1).values
        return pos - last_start

    def _shifts(self, ext: torch.Tensor, dist: torch.Tensor, T: int) -> torch.Tensor:
        """s_j[t] = x'[t-j] where visible, else pad; stacked over j = 0..K-1."""
        K = self.spec.max_order
        pad = self.spec.canonical_pad_id
        shifts = []
        for j in range(K):
            s = ext[:, K - 1 - j : K - 1 - j + T]
            if j > 0 and dist is not None:
                s = torch.where(dist >= j, s, pad)
            shifts.append(s)
        return torch.stack(shifts)  # [K, B, T]

    def _rows(
        self, shifts: torch.Tensor, multipliers: torch.Tensor, primes: torch.Tensor
    ) -> torch.Tensor:
        """XOR-mix the shifts for every layer and order, then reduce modulo each head's prime.

        The remainders are computed head-major ([L, H, B, T] in memory) and returned as a
        [L, B, T, H] view: a long inner loop over positions is what makes the 64-bit divisions
        (which x86 cannot vectorise) run at full speed; see docs/benchmarks.md.
        """
        mixes = self._mixes(shifts, multipliers)  # [L, O, B, T]
        p = primes.view(*mixes.shape[:2], self.spec.config.heads_per_order, 1, 1)  # [L, O, h, 1, 1]
        rows = self._remainder(mixes.unsqueeze(2), p)  # [L, O, heads, B, T]
        return rows.flatten(1, 2).permute(0, 2, 3, 1)  # [L, B, T, H] (strided view)

    def _remainder(self, mixes: torch.Tensor, primes: torch.Tensor) -> torch.Tensor:
        """mixes mod primes (broadcast): by reciprocal while compiling, where it fuses into one
        vector loop, else `torch.remainder`; the same rows either way."""
        if self._reciprocal_ok and torch.compiler.is_compiling():
            return remainder_by_reciprocal(mixes, primes)
        return torch.remainder(mixes, primes)

    def _mixes(self, shifts: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
        """mix_n for every layer and order: [L, O, B, T] int64 (before the primes)."""
        mix = shifts[0] * multipliers[:, 0, None, None]  # [L, B, T]
        mixes = []
        for n in range(2, self.spec.max_order + 1):
            mix = mix ^ (shifts[n - 1] * multipliers[:, n - 1, None, None])
            if n in self.spec.orders:
                mixes.append(mix)
        return torch.stack(mixes, dim=1)

    def _next_state(
        self, ext: torch.Tensor, ids: torch.Tensor, dist: torch.Tensor | None, T: int
    ) -> HashState:
        """The K-1 ids that position T will see, with pad past a boundary."""
        K1, pad, eos = self.spec.max_order - 1, self.spec.canonical_pad_id, self.spec.eos_id
        history = ext[:, T:].clone()  # [B, K-1], oldest first
        if T == 0 or (dist is None and eos is None):
            return HashState(history, pad)
        if dist is None:  # no start in the chunk: all visible, unless it ended with an EOS
            ended = (ids[:, -1] == eos)[:, None]
            return HashState(torch.where(ended, pad, history), pad)
        next_dist = dist[:, -1] + 1  # [B]
        if eos is not None:
            next_dist = torch.where(ids[:, -1] == eos, 0, next_dist)
        back = torch.arange(K1, 0, -1, device=ids.device)  # column i is K1-i steps back
        visible = back[None, :] <= next_dist[:, None]
        return HashState(torch.where(visible, history, pad), pad)
