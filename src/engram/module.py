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

Legend: B batch, T time, M branches, d hidden size, H heads (all orders), r row dim, D = H*r.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engram.spec import HashSpec


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
    """SiLU(causal depthwise Conv1d(RMSNorm(x))) over time, each branch's channels separately."""

    def __init__(self, dim: int, num_branches: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        channels = dim * num_branches
        # eps 1e-5 as the demo's ShortConv; the gate norms keep torch's default like the demo.
        self.norm = BranchRMSNorm(num_branches, dim, eps=1e-5)
        self.conv = nn.Conv1d(
            channels, channels, kernel_size, groups=channels, bias=False, dilation=dilation
        )
        nn.init.zeros_(self.conv.weight)  # the conv path starts as identity of the residual
        self.receptive = (kernel_size - 1) * dilation  # past steps the conv reads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, M, d = x.shape
        z = self.norm(x).reshape(B, T, M * d).transpose(1, 2)  # [B, M*d, T]
        z = F.pad(z, (self.receptive, 0))  # causal: only zeros before the sequence
        y = F.silu(self.conv(z))  # [B, M*d, T]
        return y.transpose(1, 2).reshape(B, T, M, d)


class Engram(nn.Module):
    """One layer's Engram memory. `forward(hidden [B,T,M,d] or [B,T,d], rows [B,T,H]) -> Y`."""

    def __init__(self, spec: HashSpec, layer_id: int, config: EngramConfig) -> None:
        super().__init__()
        config.validate()
        self.spec, self.layer_id, self.config = spec, layer_id, config
        d, M, D = config.hidden_size, config.num_branches, spec.d_mem
        self.num_keys = M if config.branch_keys else 1

        # One table holds every head; head k's rows start at offsets[k].
        self.table = nn.Embedding(spec.layer_rows(layer_id), spec.row_dim)
        nn.init.normal_(self.table.weight, std=config.table_init_std)
        offsets = torch.tensor(spec.layer_offsets(layer_id), dtype=torch.int64)
        self.register_buffer("offsets", offsets, persistent=False)

        # Biases as in the demo's nn.Linear defaults; the paper writes k = W_K e, v = W_V e.
        self.value_proj = nn.Linear(D, d)
        if config.gate:  # without the gate, keys and their norms would be dead weights
            self.key_proj = nn.Linear(D, self.num_keys * d)
            self.key_norm = BranchRMSNorm(M, d)
            self.query_norm = BranchRMSNorm(M, d)
        self.conv = (
            ShortConv(d, M, config.kernel_size, dilation=spec.max_order) if config.conv else None
        )

    def forward(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        h, squeeze = self._check_inputs(hidden, rows)  # h [B, T, M, d]

        # 1. Look up every head's row and concatenate: e [B, T, D]
        e = self.table(rows + self.offsets).flatten(start_dim=-2)

        # 2. One value for all branches: v [B, T, 1, d]
        v = self.value_proj(e).unsqueeze(2)

        # 3. Context-aware gate per branch: a [B, T, M, 1]
        a = self._gate(h, e).unsqueeze(-1)

        # 4. Gated value per branch: u [B, T, M, d]
        u = a * v

        # 5. Short causal conv refines it: Y [B, T, M, d]
        y = u + self.conv(u) if self.conv is not None else u
        return y.squeeze(2) if squeeze else y

    def gates(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The gate activations a [B, T, M] (for analysis and heat maps)."""
        h, _ = self._check_inputs(hidden, rows)
        return self._gate(h, self.table(rows + self.offsets).flatten(start_dim=-2))

    def _gate(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """a [B, T, M] from hidden h [B, T, M, d] and memory e [B, T, D]."""
        B, T, M, d = h.shape
        if not self.config.gate:
            return torch.ones(B, T, M, dtype=h.dtype, device=h.device)
        k = self.key_proj(e).view(B, T, self.num_keys, d).expand(B, T, M, d)
        s = (self.query_norm(h) * self.key_norm(k)).sum(-1) / math.sqrt(d)
        return torch.sigmoid(s.sign() * s.abs().clamp_min(1e-6).sqrt())

    def _check_inputs(self, hidden: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, bool]:
        d, M, H = self.config.hidden_size, self.config.num_branches, self.spec.heads_total
        squeeze = hidden.ndim == 3
        if squeeze and M != 1:
            raise ValueError(
                f"hidden [B, T, d] is only accepted for M = 1; this module has "
                f"M = {M}: pass [B, T, {M}, {d}]"
            )
        h = hidden.unsqueeze(2) if squeeze else hidden
        if h.ndim != 4 or h.shape[2:] != (M, d):
            raise ValueError(f"hidden must be [B, T, {M}, {d}], got {list(hidden.shape)}")
        if rows.dtype not in (torch.int64, torch.int32) or rows.shape != (*h.shape[:2], H):
            raise ValueError(
                f"rows must be int [B, T, {H}] = {[*h.shape[:2], H]}, got "
                f"{rows.dtype} {list(rows.shape)}"
            )
        return h, squeeze

    # ---- accounting ----------------------------------------------------------------------------
    @property
    def table_params(self) -> int:
        return self.table.weight.numel()

    @property
    def dense_params(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("table."))

    @property
    def active_params_per_token(self) -> int:
        """Parameters a token touches: its H rows plus every dense weight."""
        return self.spec.d_mem + self.dense_params

    def flops_per_token(self) -> int:
        """Multiply-adds x2 of the forward per token: projections, gate dot products and conv."""
        d, M, D = self.config.hidden_size, self.config.num_branches, self.spec.d_mem
        proj = 2 * D * d * (1 + (self.num_keys if self.config.gate else 0))
        gate = 2 * M * d if self.config.gate else 0
        conv = 2 * M * d * self.config.kernel_size if self.conv is not None else 0
        return proj + gate + conv

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer_id}, rows={self.table.num_embeddings}, "
            f"heads={self.spec.heads_total}, d_mem={self.spec.d_mem}"
        )
