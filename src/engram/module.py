"""The Engram module: hashed N-gram memory, gated by the hidden state, refined by a short conv.

Paper section 2 (arXiv 2601.07372) and the official demo `Engram` (deepseek-ai/Engram
`engram_demo_v1.py`). Given the hidden states h of M hyper-connection branches and the layer's row
indices (from `engram.hashing.NgramHasher`):

    e_t   = concat over heads of table[row + offset]                 memory vector, d_mem wide
    v     = W_V e_t                                                  one value, shared by branches
    k_m   = W_K^m e_t                                                one key per branch
    s_m   = <RMSNorm(h_m), RMSNorm(k_m)> / sqrt(d)
    a_m   = sigmoid(sign(s_m) * sqrt(max(|s_m|, 1e-6)))              the demo's signed-sqrt gate
    u_m   = a_m * v
    Y_m   = u_m + SiLU(CausalDepthwiseConv1d(RMSNorm(u_m)))          kernel 4, dilation = max order

The conv starts at zero, so a new module returns Y = u. The caller adds Y to the residual stream.

`OverEncoding` is the baseline of the paper's memory-scaling comparison (Huang et al.
2025, "Over-tokenized transformer"): the same hashed tables and addresses (`HashedMemory`), but
e_t is only projected to d and added to the input token embedding: no gate, no conv, no block.

Legend: B batch, T time, M branches, d hidden size, H heads (all orders), r row dim, D = H*r.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from engram.hashing import move_pads_first
from engram.rowinit import RowInit, fill_initial
from engram.spec import HashSpec

_LAZY_TABLES: ContextVar[bool] = ContextVar("lazy_tables", default=False)


@contextmanager
def lazy_tables() -> Iterator[None]:
    """Build models whose Engram tables are not allocated (meta) until a placement decides.

    Inside the block, `HashedMemory` draws its init seed as usual (so every other weight is
    initialised exactly as without the block) but leaves its embedding on the meta device.
    """
    token = _LAZY_TABLES.set(True)
    try:
        yield
    finally:
        _LAZY_TABLES.reset(token)


@dataclass(frozen=True)
class EngramConfig:
    """Shape and ablation switches of one Engram module (addressing lives in the `HashSpec`)."""

    hidden_size: int  # d
    num_branches: int = 1  # M hyper-connection branches (the paper uses 4)
    kernel_size: int = 4
    gate: bool = True  # False: a = 1 (ablation "no gate")
    conv: bool = True  # False: Y = u (ablation "no conv"; V4.1 ships without it)
    branch_keys: bool = True  # False: one W_K shared by all branches (ablation)
    table_init_std: float = 1.0  # the demo's nn.Embedding default N(0, 1); the paper is silent

    def validate(self) -> None:
        for name in ("hidden_size", "num_branches", "kernel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.table_init_std < 0:
            raise ValueError(f"table_init_std={self.table_init_std} must be >= 0")


class BranchRMSNorm(nn.Module):
    """An independent RMSNorm per branch, applied to [..., M, d] in one call."""

    def __init__(self, num_branches: int, dim: int, eps: float | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_branches, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight


class ShortConv(nn.Module):
    """SiLU(causal depthwise Conv1d(RMSNorm(x))) over time, each branch's channels separately.

    The kernel's taps are applied one by one (K shifted multiply-adds) rather than through
    `F.conv1d`, so that a tap can be masked where it would reach back past a document start
    (an EOS inside a packed window), and so that decoding can carry the last R inputs as state.
    `self.conv` stays an `nn.Conv1d` only to hold the weight (checkpoint layout of the demo).
    """

    def __init__(self, dim: int, num_branches: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        channels = dim * num_branches
        # eps 1e-5 as the demo's ShortConv; the gate norms keep torch's default like the demo.
        self.norm = BranchRMSNorm(num_branches, dim, eps=1e-5)
        self.conv = nn.Conv1d(
            channels, channels, kernel_size, groups=channels, bias=False, dilation=dilation
        )
        nn.init.zeros_(self.conv.weight)  # the conv path starts as identity of the residual
        self.kernel_size, self.dilation = kernel_size, dilation
        self.receptive = (kernel_size - 1) * dilation  # R: past steps the conv reads

    def forward(
        self,
        x: torch.Tensor,
        starts: torch.Tensor | None = None,
        pads: torch.Tensor | None = None,
        window: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, M, d] -> [B, T, M, d].

        starts [B, T] bool: tokens that begin a document (no tap reaches before them).
        pads [B]: row b's first pads[b] tokens are padding (read as absent).
        window [B, R, M, d]: the last R inputs before this chunk (zeros where not visible); it
        is read, then overwritten in place with the window after the chunk (decoding state).
        """
        B, T, M, d = x.shape
        R, K = self.receptive, self.kernel_size
        z = self.norm(x)  # [B, T, M, d]
        if T == 1 and pads is None and window is not None:
            return self._step(z, starts, window)
        if pads is not None:
            is_pad = torch.arange(T, device=x.device)[None, :] < pads[:, None]  # [B, T]
            z = z.masked_fill(is_pad[..., None, None], 0.0)
        past = z.new_zeros(B, R, M, d) if window is None else window.to(z.dtype)
        ext = torch.cat([past, z], dim=1)  # [B, R + T, M, d]
        if pads is not None:  # [past, pads, real] -> [pads, past, real]
            ext = move_pads_first(ext, pads, R)
        reach = _reach(starts, B, T, R, x.device)  # [B, T] how far back a tap may read
        weight = self.conv.weight.view(M, d, K).to(z.dtype)  # channel m*d + j, as Conv1d's
        y = z.new_zeros(B, T, M, d)
        for k in range(K):
            lag = (K - 1 - k) * self.dilation
            tap = ext[:, R - lag : R - lag + T]  # the input `lag` steps back, [B, T, M, d]
            if lag > 0 and starts is not None:
                tap = tap * (reach >= lag)[..., None, None]
            y = y + tap * weight[..., k]
        if window is not None:
            window.copy_(_next_window(ext, reach, R))
        return F.silu(y)

    def _step(self, z: torch.Tensor, starts: torch.Tensor | None, window: torch.Tensor):
        """One decoding step (T = 1, no pads): the same result in a handful of ops."""
        past = window.to(z.dtype)  # [B, R, M, d]
        if starts is not None:  # a token that starts a document sees no past
            past = past.masked_fill(starts[:, :, None, None], 0.0)
        ext = torch.cat([past, z], dim=1)  # [B, R + 1, M, d]
        taps = ext[:, :: self.dilation]  # [B, K, M, d]: tap k reads (K - 1 - k) * dilation back
        weight = self.conv.weight.view(*z.shape[2:], self.kernel_size).to(z.dtype)  # [M, d, K]
        y = (taps * weight.permute(2, 0, 1)).sum(dim=1, keepdim=True)  # [B, 1, M, d]
        window.copy_(ext[:, 1:])
        return F.silu(y)


def _reach(starts: torch.Tensor | None, B: int, T: int, R: int, device) -> torch.Tensor:
    """[B, T]: steps back within the token's document (R + T where no start precedes it)."""
    pos = torch.arange(T, device=device).expand(B, T)
    if starts is None:
        return pos + R
    last = torch.where(starts, pos, torch.full_like(pos, -R - 1)).cummax(dim=1).values
    return torch.where(last >= 0, pos - last, pos + R)


def _next_window(ext: torch.Tensor, reach: torch.Tensor, R: int) -> torch.Tensor:
    """The last R inputs, zeroed where the next token's document cannot see them."""
    if R == 0:
        return ext[:, :0]
    window = ext[:, -R:]  # [B, R, M, d]
    next_reach = reach[:, -1:] + 1  # [B, 1]
    lag = torch.arange(R, 0, -1, device=ext.device)[None, :]  # entry i is R - i steps back
    return window * (lag <= next_reach)[..., None, None]


class RowSource(Protocol):
    """Rows a `HashedMemory` reads from outside itself (a placed or quantised table).

    `store` is where the rows live (an `engram.tables.RowStore`): whoever installed the source
    owns it and closes it; the module only reads through `read`.
    """

    store: Any

    def read(self, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """e [B, T, H*r] for head-local rows [B, T, H] and each head's offset [H]."""
        ...


class HashedMemory(nn.Module):
    """One layer's hashed N-gram table: `lookup(rows [B,T,H]) -> e [B,T,D]`.

    Shared by `Engram` and its `OverEncoding` baseline, so that both address the same rows.

    Where the rows live is not this module's business. By default they are an `nn.Embedding`
    (`self.table`). A placement plan (`engram.tables.plan`) may instead install a `RowSource`
    (`source.read(rows [B,T,H], offsets [H]) -> e [B,T,D]` over `source.store`) and drop the
    embedding: then the rows can sit in host memory or on disk while this module's code stays
    the same. Under
    `lazy_tables()` the embedding is built on the meta device, so a table larger than memory is
    never allocated before the plan decides where it goes.
    """

    def __init__(self, spec: HashSpec, layer_id: int, table_init_std: float) -> None:
        super().__init__()
        self.spec, self.layer_id = spec, layer_id
        # Each row is a pure function of (seed, layer, row): one draw of torch's RNG keeps the
        # init seeded by torch.manual_seed, and every placement starts from the same bits.
        seed = int(torch.randint(0, 2**62, ()))
        self.init = RowInit(seed=seed, table_id=layer_id, std=table_init_std)
        # One table holds every head; head k's rows start at offsets[k].
        self.table: nn.Embedding | None = nn.Embedding(
            spec.layer_rows(layer_id), spec.row_dim, device="meta"
        )
        if not _LAZY_TABLES.get():
            self.materialize_table()
        self.row_source: RowSource | None = None
        offsets = torch.tensor(spec.layer_offsets(layer_id), dtype=torch.int64)
        self.register_buffer("offsets", offsets, persistent=False)

    def materialize_table(self) -> None:
        """Allocate the embedding on the CPU and fill it with the rows' initial values."""
        if self.table is None:
            raise ValueError(f"layer {self.layer_id}'s table was handed to a row source")
        self.table.to_empty(device="cpu")
        with torch.no_grad():
            fill_initial(self.table.weight, self.init, self.spec.row_dim)

    def use_row_source(self, source: RowSource) -> None:
        """Read rows through `source.read(rows, offsets)` from now on; the embedding is released."""
        self.row_source, self.table = source, None

    def use_table(self, weight: torch.Tensor) -> None:
        """Hold the rows as an embedding of `weight` [rows, row_dim] again, dropping a row
        source (e.g. to export a model whose table was placed on disk)."""
        shape = (self.spec.layer_rows(self.layer_id), self.spec.row_dim)
        if tuple(weight.shape) != shape:
            raise ValueError(
                f"layer {self.layer_id}'s table must be {list(shape)}, got {list(weight.shape)}"
            )
        self.table = nn.Embedding(*shape, _weight=weight.detach().float(), device=weight.device)
        self.row_source = None

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """Every head's row, concatenated: rows [B, T, H] -> e [B, T, D]."""
        if self.row_source is not None:
            return self.row_source.read(rows, self.offsets)
        if self.table is None or self.table.weight.is_meta:
            raise ValueError(
                f"layer {self.layer_id}'s table has no storage: it was built under "
                "lazy_tables(); materialize_table() or use_row_source() first"
            )
        return self.table(rows + self.offsets).flatten(start_dim=-2)

    def _check_rows(self, rows: torch.Tensor, leading: tuple[int, ...]) -> None:
        H = self.spec.heads_total
        if rows.dtype not in (torch.int64, torch.int32) or rows.shape != (*leading, H):
            raise ValueError(
                f"rows must be int [B, T, {H}] = {[*leading, H]}, got "
                f"{rows.dtype} {list(rows.shape)}"
            )

    # ---- accounting ----------------------------------------------------------------------------
    @property
    def table_params(self) -> int:
        return self.spec.layer_rows(self.layer_id) * self.spec.row_dim

    @property
    def dense_params(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("table."))

    @property
    def active_params_per_token(self) -> int:
        """Parameters a token touches: its H rows plus every dense weight."""
        return self.spec.d_mem + self.dense_params

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer_id}, rows={self.spec.layer_rows(self.layer_id)}, "
            f"heads={self.spec.heads_total}, d_mem={self.spec.d_mem}"
        )


class Engram(HashedMemory):
    """One layer's Engram memory. `forward(hidden [B,T,M,d] or [B,T,d], rows [B,T,H]) -> Y`."""

    def __init__(self, spec: HashSpec, layer_id: int, config: EngramConfig) -> None:
        config.validate()
        super().__init__(spec, layer_id, config.table_init_std)
        self.config = config
        d, M, D = config.hidden_size, config.num_branches, spec.d_mem
        self.num_keys = M if config.branch_keys else 1

        # Biases as in the demo's nn.Linear defaults; the paper writes k = W_K e, v = W_V e.
        self.value_proj = nn.Linear(D, d)
        if config.gate:  # without the gate, keys and their norms would be dead weights
            self.key_proj = nn.Linear(D, self.num_keys * d)
            self.key_norm = BranchRMSNorm(M, d)
            self.query_norm = BranchRMSNorm(M, d)
        self.conv = (
            ShortConv(d, M, config.kernel_size, dilation=spec.max_order) if config.conv else None
        )
        # A drop-in for `_step` (same arguments and result), e.g. the compiled one that
        # engram.inference.compiled installs; None: the eager method.
        self.fast_step: Callable[..., torch.Tensor] | None = None

    def forward(
        self,
        hidden: torch.Tensor,
        rows: torch.Tensor,
        starts: torch.Tensor | None = None,
        pads: torch.Tensor | None = None,
        window: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Y for hidden [B, T, M, d] (or [B, T, d] when M = 1) and rows [B, T, H].

        `starts`, `pads` and `window` only concern the conv (see `ShortConv.forward`): document
        starts in the chunk, leading pads per row, and the decoding state updated in place.
        """
        h, squeeze = self._check_inputs(hidden, rows)  # h [B, T, M, d]
        if h.shape[1] == 1 and window is not None and pads is None:
            step = self.fast_step or self._step  # cached decoding: the same Y, fewer ops
            y = step(h, rows, starts, window)
            return y.squeeze(2) if squeeze else y

        # 1. Look up every head's row and concatenate: e [B, T, D]
        e = self._embed(rows)

        # 2. One value for all branches: v [B, T, 1, d]
        v = self.value_proj(e).unsqueeze(2)

        # 3. Context-aware gate per branch: a [B, T, M, 1]
        a = self._gate(h, e).unsqueeze(-1)

        # 4. Gated value per branch: u [B, T, M, d]
        u = a * v

        # 5. Short causal conv refines it: Y [B, T, M, d]
        y = u + self.conv(u, starts, pads, window) if self.conv is not None else u
        return y.squeeze(2) if squeeze else y

    def _step(
        self,
        h: torch.Tensor,
        rows: torch.Tensor,
        starts: torch.Tensor | None,
        window: torch.Tensor,
        stacked: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Y [B, 1, M, d] of one decoding step: steps 1-5 of `forward` in about half the ops.

        A decode step's Engram cost is op dispatch, not arithmetic (a few hundred FLOPs per
        op), so the two gate norms' weights are folded into one product and the conv reads its
        window in place. `stacked` (from `stacked_projection()`) computes the value and the
        keys in one matrix product instead of two: a decoder that snapshots the weights passes
        it. tests/test_decoding.py holds the step to the full forward's outputs.
        """
        B, _, M, d = h.shape
        e = self._embed(rows)  # [B, 1, D]
        if stacked is None:
            u = self.value_proj(e)  # [B, 1, d]
            k = self.key_proj(e) if self.config.gate else None  # [B, 1, keys * d]
        else:
            u, k = F.linear(e, *stacked).split([d, stacked[0].shape[0] - d], dim=-1)
        u = u.unsqueeze(2)  # [B, 1, 1, d]
        if self.config.gate:
            k = k.view(B, 1, self.num_keys, d)  # broadcast over branches
            w = self.query_norm.weight * self.key_norm.weight  # [M, d]
            s = (F.rms_norm(h, (d,)) * F.rms_norm(k, (d,)) * w).sum(-1) / math.sqrt(d)
            u = _signed_sqrt_gate(s).unsqueeze(-1) * u  # [B, 1, M, d]
        else:
            u = u.expand(B, 1, M, d)
        if self.conv is None:
            return u
        return u + self.conv._step(self.conv.norm(u), starts, window)

    @property
    def projections(self) -> list[nn.Linear]:
        """value_proj, then key_proj where there is a gate: what `stacked_projection` stacks."""
        return [self.value_proj, self.key_proj] if self.config.gate else [self.value_proj]

    def stacked_projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The projections' weights [d + keys * d, D] and biases, stacked (a copy: later changes
        to the weights do not reach it), for `_step`'s `stacked`."""
        with torch.no_grad():
            weight = torch.cat([proj.weight for proj in self.projections])
            bias = torch.cat([proj.bias for proj in self.projections])
        return weight, bias

    def gates(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The gate activations a [B, T, M] (for analysis and heat maps)."""
        h, _ = self._check_inputs(hidden, rows)
        return self._gate(h, self._embed(rows))

    def _embed(self, rows: torch.Tensor) -> torch.Tensor:
        """The looked-up rows e [B, T, D] in the projections' dtype: a table kept in fp32 (a
        row store, or a table its optimiser keeps exact) feeds a module that runs in bf16."""
        return self.lookup(rows).to(self.value_proj.weight.dtype)

    def _gate(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """a [B, T, M] from hidden h [B, T, M, d] and memory e [B, T, D]."""
        B, T, M, d = h.shape
        if not self.config.gate:
            return torch.ones(B, T, M, dtype=h.dtype, device=h.device)
        k = self.key_proj(e).view(B, T, self.num_keys, d).expand(B, T, M, d)
        s = (self.query_norm(h) * self.key_norm(k)).sum(-1) / math.sqrt(d)
        return _signed_sqrt_gate(s)

    def _check_inputs(self, hidden: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, bool]:
        d, M = self.config.hidden_size, self.config.num_branches
        squeeze = hidden.ndim == 3
        if squeeze and M != 1:
            raise ValueError(
                f"hidden [B, T, d] is only accepted for M = 1; this module has "
                f"M = {M}: pass [B, T, {M}, {d}]"
            )
        h = hidden.unsqueeze(2) if squeeze else hidden
        if h.ndim != 4 or h.shape[2:] != (M, d):
            raise ValueError(f"hidden must be [B, T, {M}, {d}], got {list(hidden.shape)}")
        self._check_rows(rows, tuple(h.shape[:2]))
        return h, squeeze

    def flops_per_token(self) -> int:
        """Multiply-adds x2 of the forward per token: projections, gate dot products and conv."""
        d, M, D = self.config.hidden_size, self.config.num_branches, self.spec.d_mem
        proj = 2 * D * d * (1 + (self.num_keys if self.config.gate else 0))
        gate = 2 * M * d if self.config.gate else 0
        conv = 2 * M * d * self.config.kernel_size if self.conv is not None else 0
        return proj + gate + conv


def _signed_sqrt_gate(s: torch.Tensor) -> torch.Tensor:
    """sigmoid(sign(s) * sqrt(max(|s|, 1e-6))): the demo's gate from the scaled dot product."""
    return torch.sigmoid(s.sign() * s.abs().clamp_min(1e-6).sqrt())


class OverEncoding(HashedMemory):
    """The OverEncoding baseline: `forward(rows [B,T,H]) -> [B,T,d]`, added to the input embedding.

    Over-encoding (Huang et al. 2025) adds hashed N-gram embeddings to the token embedding. Here
    the N-gram embedding is this layer's Engram lookup, so Engram and this baseline read the same
    rows of the same table; one linear map (no bias, like the embedding it joins) takes the D-wide
    concatenation to d. Nothing depends on the hidden state: no gate, no conv, no block.
    """

    def __init__(
        self, spec: HashSpec, layer_id: int, hidden_size: int, table_init_std: float
    ) -> None:
        if hidden_size < 1 or table_init_std < 0:
            raise ValueError(
                f"hidden_size={hidden_size} must be >= 1 and table_init_std={table_init_std} >= 0"
            )
        super().__init__(spec, layer_id, table_init_std)
        self.hidden_size = hidden_size
        self.proj = nn.Linear(spec.d_mem, hidden_size, bias=False)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        self._check_rows(rows, tuple(rows.shape[:2]))
        e = self.lookup(rows)  # [B, T, D]
        return self.proj(e)  # [B, T, d]

    def flops_per_token(self) -> int:
        return 2 * self.spec.d_mem * self.hidden_size
