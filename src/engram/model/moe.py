"""DeepSeekMoE feed-forward: shared experts plus fine-grained routed experts, top-k routing.

Routing follows DeepSeek-V3: sigmoid affinities s = sigmoid(W_r x); the top-k experts are chosen
by s + b, where b is a per-expert bias that is *not* trained by gradients but nudged after every
optimiser step towards balance (auxiliary-loss-free load balancing): b_e += gamma * sign(mean load
- load_e). The gating weights are s of the chosen experts, normalised to sum to 1, so the bias
steers selection without distorting the output.

Legend: N tokens (B*T flattened), d width, E routed experts, k experts per token.
"""

from __future__ import annotations

import torch
from torch import nn

from engram.model.config import MoEConfig
from engram.model.layers import SwiGLU


class MoE(nn.Module):
    def __init__(self, d: int, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        E = config.num_routed
        self.router = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d, config.expert_hidden) for _ in range(E))
        # The shared experts are always active, so they fuse into one wider SwiGLU.
        self.shared = (
            SwiGLU(d, config.expert_hidden * config.num_shared) if config.num_shared else None
        )
        # Balancing bias is state, not a parameter: saved in checkpoints, never given gradients.
        self.register_buffer("route_bias", torch.zeros(E))
        self.register_buffer("load", torch.zeros(E), persistent=False)  # tokens since update

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, d]

        # 1. Affinities and top-k selection (bias only for selection): idx, weights [N, k]
        scores = torch.sigmoid(self.router(flat).float())  # [N, E]
        _, idx = torch.topk(scores + self.route_bias, self.config.top_k, dim=-1)
        weights = scores.gather(1, idx)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)

        # 2. Each expert processes the tokens routed to it: out [N, d]
        # Assignments sorted by expert (stable: by token, then slot, within an expert, the order
        # nonzero() would give); one host sync for the counts instead of one per expert.
        k = self.config.top_k
        order = idx.flatten().argsort(stable=True)  # [N*k]
        counts = torch.bincount(idx.flatten(), minlength=len(self.experts)).tolist()
        out = torch.zeros_like(flat)
        start = 0
        for expert, n in zip(self.experts, counts, strict=True):
            if n:
                pick = order[start : start + n]
                token, slot = pick // k, pick % k
                out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
                start += n

        # 3. Shared experts see every token
        if self.shared is not None:
            out = out + self.shared(flat)
        if self.training:
            self.load += torch.bincount(idx.flatten(), minlength=len(self.experts)).float()
        return out.view(shape)

    @torch.no_grad()
    def update_route_bias(self) -> dict[str, float]:
        """One balancing step from the load counted since the last call; returns routing stats."""
        load = self.load
        total = float(load.sum())
        if total == 0:
            return {}
        share = load / total
        stats = {
            "max_load": float(share.max() * len(load)),
            "min_load": float(share.min() * len(load)),
        }
        self.route_bias += self.config.bias_update_rate * torch.sign(load.mean() - load)
        self.load.zero_()
        return stats

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert."""
        return sum(p.numel() for p in self.experts[0].parameters())
