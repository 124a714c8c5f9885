"""Backbone layers: rotary embeddings, grouped-query attention, SwiGLU feed-forward.

Legend: B batch, T time, d model width, nh query heads, nkv key/value heads, hd head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engram.model.config import ModelConfig
from engram.model.decode_cache import Chunk, DecodeCache


class Rotary(nn.Module):
    """Rotary position embeddings (RoFormer), cos/sin tables built once for max_seq_len."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(max_seq_len).float(), inv_freq)  # [T, hd/2]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Rotate x [B, h, T, hd] for positions start..start+T-1."""
        T = x.shape[-2]
        if start + T > self.cos.shape[0]:
            raise ValueError(
                f"sequence of {start + T} positions exceeds max_seq_len={self.cos.shape[0]}"
            )
        cos = self.cos[start : start + T].to(x.dtype)
        sin = self.sin[start : start + T].to(x.dtype)
        return _rotate(x, cos, sin)

    def at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x [B, h, T, hd] for per-row positions [B, T] (padded or cached sequences),
        each below max_seq_len: `cached_chunk` checks them once per forward, where reading
        them to the host costs one sync instead of two per layer."""
        cos = self.cos[positions].unsqueeze(1).to(x.dtype)  # [B, 1, T, hd/2]
        sin = self.sin[positions].unsqueeze(1).to(x.dtype)
        return _rotate(x, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    """Causal grouped-query attention through `scaled_dot_product_attention`."""

    def __init__(self, config: ModelConfig, rotary: Rotary, layer: int = 0) -> None:
        super().__init__()
        self.layer = layer  # which of the cache's K/V buffers is this block's
        self.n_heads, self.n_kv, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        d, hd = config.d_model, config.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=False)
        self.kv_proj = nn.Linear(d, 2 * self.n_kv * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)
        self.rotary = rotary

    def forward(
        self, x: torch.Tensor, chunk: Chunk | None = None, cache: DecodeCache | None = None
    ) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d]; with a cache, attends over its slots and adds this chunk's."""
        B, T, d = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, nh, T, hd]
        kv = self.kv_proj(x).view(B, T, 2, self.n_kv, self.head_dim)
        k, v = kv.unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, nkv, T, hd]
        gqa = self.n_kv != self.n_heads
        if chunk is None or chunk.mask is None:  # training: one causal sequence per row
            q, k = self.rotary(q), self.rotary(k)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            q, k = self.rotary.at(q, chunk.positions), self.rotary.at(k, chunk.positions)
            if cache is not None:
                k, v = cache.write(self.layer, k, v)  # [B, nkv, S, hd], every slot so far
            mask = chunk.mask  # [B, 1, T, S]
            y = F.scaled_dot_product_attention(
                q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, enable_gqa=gqa
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, d))  # [B, T, d]


class SwiGLU(nn.Module):
    """FFN(x) = W_down (SiLU(W_gate x) * W_up x), the LLaMA / DeepSeek feed-forward."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)
