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
import torch.nn.functional as F
from torch import nn

from engram.model.config import MoEConfig
from engram.model.layers import SwiGLU


def _grouped_mm_supported(x: torch.Tensor, hidden: int) -> bool:
    """Where torch's grouped GEMM runs: fp32 on the CPU (torch 2.13) and bf16 on sm80+ GPUs,
    with every row of both operands a multiple of 16 bytes (the kernels' alignment)."""
    align = 16 // x.element_size()
    if x.shape[-1] % align or hidden % align:
        return False
    if x.device.type == "cpu":
        return x.dtype == torch.float32
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return False


def _top_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """`torch.topk(x, k).indices` along the last dim (largest first). For k <= 4 as k passes of
    `max`: torch's CPU topk measured 2.3x slower at k = 2 on [4096, 64] (1.43 vs 0.63 ms,
    bench/results/moe_parts.json)."""
    if k > 4:
        return torch.topk(x, k, dim=-1).indices
    picks = []
    for j in range(k):
        picks.append(x.argmax(dim=-1, keepdim=True))  # ties: the first (topk leaves it open)
        if j + 1 < k:
            x = x.scatter(-1, picks[-1], float("-inf"))
    return torch.cat(picks, dim=-1)


class MoE(nn.Module):
    # How routed experts run (all give the same sums; tests/test_model.py compares them):
    # "loop", the readable reference, gathers and scatters each expert's tokens separately;
    # "sorted" gathers the tokens sorted by expert once, runs each expert on a contiguous slice
    # and scatters once (bitwise the loop's forward; a third fewer ops per expert);
    # "grouped" does it as two grouped GEMMs, with no loop and no host synchronisation.
    # None: "grouped" on a GPU that supports it, else "sorted", the faster on this project's
    # CPU (bench/results/moe_step.json).
    dispatch: str | None = None

    def __init__(self, d: int, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        E = config.num_routed
        self.router = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d, config.expert_hidden) for _ in range(E))
        # The shared experts are always active, so they fuse into one wider SwiGLU.
        self.shared = SwiGLU(d, config.shared_width) if config.shared_width else None
        # Balancing bias is state, not a parameter: saved in checkpoints, never given gradients.
        self.register_buffer("route_bias", torch.zeros(E))
        self.register_buffer("load", torch.zeros(E), persistent=False)  # tokens since update

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, d]

        # 1. Affinities and top-k selection (bias only for selection): idx, weights [N, k]
        idx, weights = self.route(flat)

        # 2. Each expert processes the tokens routed to it: out [N, d]
        out = getattr(self, f"_routed_{self._dispatch(flat)}")(flat, idx, weights)

        # 3. Shared experts see every token
        if self.shared is not None:
            out = out + self.shared(flat)
        if self.training:
            self.load += torch.bincount(idx.flatten(), minlength=len(self.experts)).float()
        return out.view(shape)

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's experts idx [N, k] (chosen by affinity plus bias) and their gating
        weights [N, k] (the affinities alone, normalised) for tokens flat [N, d]."""
        scores = torch.sigmoid(self.router(flat).float())  # [N, E]
        idx = _top_k(scores + self.route_bias, self.config.top_k)  # [N, k]
        weights = scores.gather(1, idx)
        return idx, (weights / weights.sum(-1, keepdim=True)).to(flat.dtype)

    def _dispatch(self, flat: torch.Tensor) -> str:
        if self.dispatch not in (None, "loop", "sorted", "grouped"):
            raise ValueError(f"MoE.dispatch={self.dispatch!r}: use loop, sorted or grouped")
        if self.dispatch == "loop":
            return "loop"
        supported = _grouped_mm_supported(flat, self.config.expert_hidden)
        if self.dispatch == "grouped" or (self.dispatch is None and flat.device.type == "cuda"):
            return "grouped" if supported else "sorted"
        return "sorted"

    def _routed_loop(
        self, flat: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """The reference: one matmul pair per expert over the tokens routed to it. [N, d]"""
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
        return out

    def _routed_sorted(
        self, flat: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """The loop's sums with one gather and one scatter: the assignments sorted by expert
        once, each expert reads a contiguous slice. [N, d]"""
        k = self.config.top_k
        order = idx.flatten().argsort(stable=True)  # [N*k] assignments, by expert
        counts = torch.bincount(idx.flatten(), minlength=len(self.experts)).tolist()
        token = order // k
        x = flat.index_select(0, token)  # [N*k, d], expert by expert
        parts = [
            expert(chunk)
            for expert, chunk, n in zip(self.experts, x.split(counts), counts, strict=True)
            if n
        ]
        y = torch.cat(parts) * weights.flatten()[order, None]  # [N*k, d]
        return torch.zeros_like(flat).index_add_(0, token, y)

    def _routed_grouped(
        self, flat: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """The same sums as `_routed_loop` as two grouped GEMMs over the assignments sorted by
        expert once: no loop over experts, no host synchronisation. [N, d]"""
        k = self.config.top_k
        order = idx.flatten().argsort(stable=True)  # [N*k] assignments, by expert
        ends = torch.bincount(idx.flatten(), minlength=len(self.experts)).cumsum(0)
        token = order // k
        dtype = flat.dtype
        gate_up = torch.stack([e.gate_up.weight for e in self.experts]).to(dtype)  # [E, 2h, d]
        down = torch.stack([e.down.weight for e in self.experts]).to(dtype)  # [E, d, h]
        offs = ends.to(torch.int32)
        h = F.grouped_mm(flat[token], gate_up.transpose(1, 2), offs=offs)  # [N*k, 2h]
        gate, up = h.chunk(2, dim=-1)
        y = F.grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offs)  # [N*k, d]
        y = y * weights.flatten()[order, None]
        return torch.zeros_like(flat).index_add_(0, token, y)

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
