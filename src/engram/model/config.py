"""Typed configuration of the Engram language model, with presets kept as data.

A model is a decoder-only Transformer: RMSNorm, rotary grouped-query attention, SwiGLU feed-forward
(dense, or a DeepSeekMoE layer of shared plus fine-grained routed experts), optional
manifold-constrained hyper-connections with M residual branches, and Engram memory at chosen blocks
(before attention, as the paper places it). Swapping MoE for dense is one field: `moe=None`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

from engram.module import EngramConfig
from engram.spec import SpecConfig
from engram.spec import preset as spec_preset


@dataclass(frozen=True)
class MoEConfig:
    """DeepSeekMoE: `num_shared` always-on experts plus top-k of `num_routed` routed experts.

    The shared experts run as one fused SwiGLU of width `shared_width`: `num_shared *
    expert_hidden` unless `shared_hidden` sets it. Setting it lets the routed experts be cut
    finer (`granular`) while the shared part keeps its width, as DeepSeekMoE's fine-grained
    segmentation does.
    """

    num_routed: int
    top_k: int
    expert_hidden: int  # SwiGLU hidden size of one (fine-grained) expert
    num_shared: int = 1
    bias_update_rate: float = 1e-3  # auxiliary-loss-free balancing step (DeepSeek-V3's gamma)
    shared_hidden: int | None = None  # the shared experts' total width; None: see shared_width

    @property
    def shared_width(self) -> int:
        """The fused shared SwiGLU's hidden size (0: no shared expert)."""
        if self.shared_hidden is None:
            return self.num_shared * self.expert_hidden
        return self.shared_hidden

    def validate(self) -> None:
        if self.num_routed < 1 or not 1 <= self.top_k <= self.num_routed:
            raise ValueError(f"MoE top_k={self.top_k} must be in [1, num_routed={self.num_routed}]")
        if self.expert_hidden < 1 or self.num_shared < 0:
            raise ValueError(
                f"MoE expert_hidden={self.expert_hidden} must be >= 1 and "
                f"num_shared={self.num_shared} >= 0"
            )
        if self.shared_hidden is not None and self.shared_hidden < 0:
            raise ValueError(f"MoE shared_hidden={self.shared_hidden} must be >= 0 (or none)")
        if self.num_shared == 0 and self.shared_hidden:
            raise ValueError(
                f"MoE shared_hidden={self.shared_hidden} gives a width to shared experts, "
                "but num_shared=0 has none"
            )
        if self.bias_update_rate < 0:
            raise ValueError(f"bias_update_rate={self.bias_update_rate} must be >= 0")


def granular(moe: MoEConfig, g: float) -> MoEConfig:
    """`moe` with its routed experts cut g times finer (DeepSeekMoE's fine-grained expert
    segmentation, arXiv 2401.06066): g x the experts, g x top_k, each 1/g as wide.

    The routed experts' total width (num_routed x expert_hidden) and active width (top_k x
    expert_hidden) stay the same, and so does the shared experts' width (made explicit in
    `shared_hidden`); only the router (d x num_routed per layer) changes size. g = 1 returns
    `moe` itself. A g that leaves a fractional count or width is a ValueError.
    """
    if not isinstance(g, int | float) or not math.isfinite(g) or g <= 0:
        raise ValueError(f"granularity g={g} must be a positive number")
    if g == 1:
        return moe

    def whole(value: float, name: str) -> int:
        if abs(value - round(value)) > 1e-9 or round(value) < 1:
            raise ValueError(
                f"granularity g={g} does not divide the MoE evenly: {name} would be {value:g} "
                f"(num_routed={moe.num_routed}, top_k={moe.top_k}, "
                f"expert_hidden={moe.expert_hidden})"
            )
        return round(value)

    return replace(
        moe,
        num_routed=whole(moe.num_routed * g, "num_routed"),
        top_k=whole(moe.top_k * g, "top_k"),
        expert_hidden=whole(moe.expert_hidden / g, "expert_hidden"),
        shared_hidden=moe.shared_width,
    )


SITES = ("block", "input")


@dataclass(frozen=True)
class EngramOptions:
    """The Engram memory of a model: its addressing (`spec`) and the module's switches.

    `site` says where the hashed N-gram memory enters the model:
    - "block": Engram, gated and convolved, before attention at the spec's layer_ids (the paper);
    - "input": the OverEncoding baseline of the paper's memory-scaling study: the same tables and
      addresses (one table per spec layer id), projected and added to the input token embedding.
      The layer ids then only name the tables (their hash seeds and primes), and must still lie
      inside n_layers so that one spec serves both sites; gate, conv and branch_keys do
      not apply.
    """

    spec: SpecConfig  # layer_ids in the spec are the blocks that hold an Engram
    gate: bool = True
    conv: bool = True
    branch_keys: bool = True
    table_init_std: float = 0.02  # rows start small like the token embeddings (paper: silent)
    table_lr_multiplier: float = 5.0  # the paper: tables train with Adam at 5x the base lr
    site: str = "block"  # "block" (Engram) or "input" (OverEncoding); see above
    # Read from configs written before the rename (`placement` now names a table's tier).
    RENAMED: ClassVar[dict[str, str]] = {"placement": "site"}

    def module_config(self, hidden_size: int, num_branches: int) -> EngramConfig:
        """The `Engram` module's config for a model of this width and branch count."""
        return EngramConfig(
            hidden_size=hidden_size,
            num_branches=num_branches,
            gate=self.gate,
            conv=self.conv,
            branch_keys=self.branch_keys,
            table_init_std=self.table_init_std,
        )

    def validate(self) -> None:
        self.spec.validate()
        if self.site not in SITES:
            raise ValueError(f"engram site={self.site!r} must be one of {list(SITES)}")
        if self.table_init_std < 0 or self.table_lr_multiplier <= 0:
            raise ValueError(
                f"table_init_std={self.table_init_std} must be >= 0 and "
                f"table_lr_multiplier={self.table_lr_multiplier} > 0"
            )


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int  # hidden size of the dense SwiGLU (dense blocks, and all blocks if moe=None)
    moe: MoEConfig | None = None
    first_dense_layers: int = 1  # DeepSeekMoE keeps the first block(s) dense
    hc_branches: int = 1  # M; 1 is the plain residual stream, the paper uses 4 (mHC)
    engram: EngramOptions | None = None
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer >= self.first_dense_layers

    def validate(self) -> None:
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "ffn_hidden",
            "hc_branches",
            "max_seq_len",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.d_model % self.n_heads or self.head_dim % 2:
            raise ValueError(
                f"d_model={self.d_model} must split into n_heads={self.n_heads} "
                "heads of an even size (rotary embeddings rotate pairs)"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.moe is not None:
            self.moe.validate()
        if self.engram is not None:
            self.engram.validate()
            bad = [i for i in self.engram.spec.layer_ids if i >= self.n_layers]
            if bad:
                raise ValueError(
                    f"Engram layer_ids {bad} are outside the model's {self.n_layers} layers"
                )

    def with_(self, **changes) -> ModelConfig:
        return replace(self, **changes)


def _tiny_spec() -> SpecConfig:
    """The `tiny` spec preset's tables, at block 1 of the `tiny` model (its 3 blocks hold one
    Engram), with the pad id of whichever tokenizer the run uses (resolved at assembly)."""
    return replace(spec_preset("tiny"), layer_ids=(1,), pad_id=None)


# Presets are data; each comment says where its numbers come from.
PRESETS: dict[str, ModelConfig] = {
    # For tests: runs a step in milliseconds on a CPU.
    "tiny": ModelConfig(
        vocab_size=512,
        d_model=32,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=64,
        moe=MoEConfig(num_routed=4, top_k=2, expert_hidden=16),
        hc_branches=2,
        max_seq_len=256,
        engram=EngramOptions(spec=_tiny_spec()),
    ),
    # The CPU demo's MoE baseline (`engram demo` derives the Engram arm from it with the
    # iso-parameter planner at rho = 0.8): 4 blocks of width 128, the first dense, then
    # DeepSeekMoE with 64 fine-grained routed experts (top-2) and 1 shared expert. About 0.8M
    # parameters are active per token and 10M in total outside the embeddings, so the sparse
    # budget is large enough for a real table. Sized for ~4k tokens/s on a 2-core CPU.
    "demo": ModelConfig(
        vocab_size=4096,
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=384,
        moe=MoEConfig(num_routed=64, top_k=2, expert_hidden=128),
        hc_branches=1,
        max_seq_len=512,
        engram=EngramOptions(
            spec=SpecConfig(
                tokenizer="deepseek",
                layer_ids=(1,),
                orders=(2, 3),
                heads_per_order=4,
                base_sizes=(14759, 14759),
                row_dim=16,
            )
        ),
    ),
    # The demo at twice the depth and 3/4 of the width, for the depth question of the mechanism
    # studies (issue 17: does Engram spare early layers? `engram study logit-lens --preset
    # demo-deep`): 8 blocks of width 96 (4 heads of 24, 2 KV heads), the first dense, then
    # DeepSeekMoE with the demo's 64 routed experts (top-2) cut to hidden 72, and a shared width of
    # 96 (the dense FFN is the active width, 96 + 2 x 72, as in the demo). Widths are chosen so
    # its MoE baseline matches the demo's outside the embeddings (`engram plan --preset
    # demo-deep`): P_tot 9,818,208 vs 9,954,432 (-1.4%), P_act 818,784 vs 812,160 (+0.8%);
    # tests/test_config.py holds that to 3%. The embeddings shrink with the width (0.79M vs
    # 1.05M). The table is the planner's at rho = 0.8 (52 experts remain); Engram at block 1,
    # the paper's layer 2.
    "demo-deep": ModelConfig(
        vocab_size=4096,
        d_model=96,
        n_layers=8,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=240,
        moe=MoEConfig(num_routed=64, top_k=2, expert_hidden=72, shared_hidden=96),
        hc_branches=1,
        max_seq_len=512,
        engram=EngramOptions(
            spec=SpecConfig(
                tokenizer="deepseek",
                layer_ids=(1,),
                orders=(2, 3),
                heads_per_order=4,
                base_sizes=(13425, 13425),
                row_dim=16,
            )
        ),
    ),
    # The demo's shape at twice the width, for the GPU allocation study
    # (`recipes/gpu-allocation.toml`): 4 blocks of width 256, the first dense, then 64 routed
    # experts (top-2) of hidden 256 and 1 shared. Its MoE baseline (the study's rho = 1 arm) has
    # 3.2M active and 39.8M total parameters outside the embeddings (`engram plan --preset
    # gpu-small`) and costs about 32 MFLOP per training token at T = 512 with a 4096-id BPE:
    # small enough that 14 arms of 21M tokens fit in 9 minutes of one H100 at a pessimistic 3%
    # MFU (docs/benchmarks.md, GPU). The table is the size the planner gives at rho = 0.8 (with
    # 52 experts); the study derives every arm from the MoE baseline.
    "gpu-small": ModelConfig(
        vocab_size=4096,
        d_model=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=768,
        moe=MoEConfig(num_routed=64, top_k=2, expert_hidden=256),
        hc_branches=1,
        max_seq_len=1024,
        engram=EngramOptions(
            spec=SpecConfig(
                tokenizer="deepseek",
                layer_ids=(1,),
                orders=(2, 3),
                heads_per_order=4,
                base_sizes=(54781, 54781),
                row_dim=16,
            )
        ),
    ),
    # One GPU's training-speed model (bench/gpu_train.py, bench/gpu_decode.py): the layout of
    # `paper-3b-ablation` below (12 blocks, 64 routed experts top-6 plus 2 shared, Engram at
    # blocks 1 and 5 with 8 heads per order) at GPT-2 small's width, 768. 105M parameters are
    # active per token and 0.80B in total outside the embeddings (`engram plan --preset gpu`),
    # with the DeepSeek tokenizer as the paper. Every width is a multiple of 128 (d, experts,
    # dense FFN, d_mem = 16 x 64) and heads are 64 wide, so bf16 GEMMs fill the tensor cores;
    # mHC is off (M = 1): the plain residual stream. Not yet measured on a GPU.
    "gpu": ModelConfig(
        vocab_size=129280,
        d_model=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=4,
        ffn_hidden=2048,
        moe=MoEConfig(num_routed=64, top_k=6, expert_hidden=384, num_shared=2),
        hc_branches=1,
        max_seq_len=2048,
        engram=EngramOptions(
            spec=SpecConfig(
                tokenizer="deepseek",
                layer_ids=(1, 5),
                orders=(2, 3),
                heads_per_order=8,
                base_sizes=(65536, 65536),
                row_dim=64,
            )
        ),
    ),
    # The paper's ablation backbone (section 5): 12 layers, 3B total / 0.56B active, Engram at
    # layers 2 and 6 (0-based 1 and 5) with mHC M = 4 and a 1.6B table. Widths and expert counts
    # are our reading of a DeepSeekMoE-style model of that size (the paper does not list them):
    # 3.0B total and 0.51B active parameters outside the embeddings, for GPUs.
    "paper-3b-ablation": ModelConfig(
        vocab_size=129280,
        d_model=2048,
        n_layers=12,
        n_heads=16,
        n_kv_heads=4,
        ffn_hidden=5120,
        moe=MoEConfig(num_routed=64, top_k=6, expert_hidden=640, num_shared=2),
        hc_branches=4,
        max_seq_len=4096,
        engram=EngramOptions(
            spec=SpecConfig(
                tokenizer="deepseek",
                layer_ids=(1, 5),
                orders=(2, 3),
                heads_per_order=8,
                base_sizes=(640_000, 640_000),
                row_dim=80,
            )
        ),
    ),
}


def model_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


__all__ = ["PRESETS", "EngramOptions", "MoEConfig", "ModelConfig", "granular", "model_preset"]
