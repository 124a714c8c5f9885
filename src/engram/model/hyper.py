"""Residual connections: the plain residual (M = 1) and manifold-constrained hyper-connections.

Hyper-connections (Zhu et al., 2024) widen the residual stream into M branches x [B, T, M, d]. A
sublayer F reads a weighted mix of the branches and writes back to each, while the branches mix:

    x' = H_res x + H_post^T F(H_pre x)

mHC (DeepSeek, 2025; the Engram paper's backbone with M = 4) constrains the mixing so that deep
stacks stay stable: H_res is projected onto the doubly stochastic matrices by Sinkhorn-Knopp
iterations (so it neither amplifies nor drains the stream), H_pre = sigmoid(.) and
H_post = 2 sigmoid(.) are non-negative. Each coefficient is a static bias plus a small dynamic term
computed from the normalised stream (scaled by alpha, which starts small).

Legend: B batch, T time, M branches, d width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Sublayer = Callable[[torch.Tensor], torch.Tensor]  # [B, T, d] -> [B, T, d]


def sinkhorn(logits: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """Project exp(logits) [..., M, M] onto (approximately) doubly stochastic matrices."""
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iterations):
        m = m / m.sum(dim=-1, keepdim=True)
        m = m / m.sum(dim=-2, keepdim=True)
    return m


class Residual(nn.Module):
    """M = 1: x' = x + F(x)."""

    def forward(self, x: torch.Tensor, fn: Sublayer) -> torch.Tensor:
        return x + fn(x.squeeze(2)).unsqueeze(2)


class HyperConnection(nn.Module):
    """mHC around one sublayer, for M >= 2 branches."""

    def __init__(self, d: int, branches: int, sinkhorn_iters: int = 20) -> None:
        super().__init__()
        M = branches
        self.M, self.iters = M, sinkhorn_iters
        self.norm = nn.RMSNorm(M * d)
        # One projection yields the dynamic parts of H_pre [M], H_post [M] and H_res [M, M].
        self.dynamic = nn.Linear(M * d, 2 * M + M * M, bias=False)
        nn.init.zeros_(self.dynamic.weight)
        self.alpha = nn.Parameter(torch.full((3,), 0.01))
        # Static biases: the sublayer reads the mean of the branches (sigmoid(b) = 1/M), writes
        # its output to every branch (2 sigmoid(0) = 1), and the branches start unmixed.
        self.pre_bias = nn.Parameter(torch.full((M,), -torch.log(torch.tensor(M - 1.0)).item()))
        self.post_bias = nn.Parameter(torch.zeros(M))
        self.res_bias = nn.Parameter(torch.eye(M) * 8.0)

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B, T, M, d = x.shape
        z = self.dynamic(self.norm(x.reshape(B, T, M * d)))  # [B, T, 2M + M*M]
        pre, post, res = z.split([M, M, M * M], dim=-1)
        h_pre = torch.sigmoid(self.alpha[0] * pre + self.pre_bias)  # [B, T, M]
        h_post = 2 * torch.sigmoid(self.alpha[1] * post + self.post_bias)  # [B, T, M]
        h_res = sinkhorn(self.alpha[2] * res.view(B, T, M, M) + self.res_bias, self.iters)
        return h_pre, h_post, h_res

    def forward(self, x: torch.Tensor, fn: Sublayer) -> torch.Tensor:
        h_pre, h_post, h_res = self.coefficients(x)
        y = fn(torch.einsum("btm,btmd->btd", h_pre, x))  # [B, T, d]
        mixed = torch.einsum("btmn,btnd->btmd", h_res, x)  # [B, T, M, d]
        return mixed + h_post.unsqueeze(-1) * y.unsqueeze(2)


def residual_for(d: int, branches: int) -> nn.Module:
    return Residual() if branches == 1 else HyperConnection(d, branches)


__all__ = ["HyperConnection", "Residual", "residual_for", "sinkhorn"]
