"""Iso-parameter accounting of the Engram LM: P_tot, P_act, P_sparse and rho.

Paper section 3.1 (arXiv 2601.07372) compares MoE and Engram at fixed total and activated
parameters. Its definitions, which this file implements:

- P_tot: trainable parameters excluding the vocabulary embedding and the LM head.
- P_act: parameters a token activates: attention, norms, dense FFNs, shared experts, the top-k
  routed experts and the router of every MoE layer, hyper-connections, Engram's dense weights
  (projections, norms, conv) and the Engram rows the token reads (heads_total * row_dim per layer).
  The OverEncoding baseline (site "input") counts the same way: its tables are
  `engram_tables`, its projection `engram_dense`.
- P_sparse = P_tot - P_act: inactive routed experts plus Engram rows not read.
- rho: the share of P_sparse held by routed experts. rho = 1 is pure MoE; the paper finds a
  U-shaped loss in rho with its best near 0.75-0.8.

`count_params` measures a built model; `count_params_from_config` computes the same numbers from a
config alone (for any preset, instantly). The planner that chooses experts and Engram table sizes
for a target P_tot, P_act and rho is `engram.model.planner`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from engram.model.config import ModelConfig
from engram.model.lm import EngramLM
from engram.model.moe import MoE
from engram.spec import HashSpec, derive_primes


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts by category. All fields but the two `_active` ones are disjoint and sum,
    with embedding and head, to the model's parameter count; `routed_experts_active` is the part of
    `routed_experts_total` a token uses (top_k experts per MoE layer) and `engram_rows_active` the
    part of `engram_tables` it reads (heads_total * row_dim per Engram layer)."""

    embedding: int
    head: int  # 0 when tied to the embedding
    attention: int
    norms: int  # the blocks' pre-norms and the final norm (Engram's and mHC's norms are theirs)
    dense_ffn: int
    shared_experts: int
    routed_experts_total: int
    routed_experts_active: int
    router: int
    hyper: int  # mHC: norms, dynamic projections, static biases, alphas (0 for M = 1)
    engram_tables: int
    engram_rows_active: int
    engram_dense: int  # value/key projections, gate norms, conv (OverEncoding: its projection)

    @property
    def p_tot(self) -> int:
        return (
            self.attention
            + self.norms
            + self.dense_ffn
            + self.shared_experts
            + self.routed_experts_total
            + self.router
            + self.hyper
            + self.engram_tables
            + self.engram_dense
        )

    @property
    def p_act(self) -> int:
        return (
            self.attention
            + self.norms
            + self.dense_ffn
            + self.shared_experts
            + self.routed_experts_active
            + self.router
            + self.hyper
            + self.engram_dense
            + self.engram_rows_active
        )

    @property
    def routed_inactive(self) -> int:
        return self.routed_experts_total - self.routed_experts_active

    @property
    def engram_rows_inactive(self) -> int:
        return self.engram_tables - self.engram_rows_active

    @property
    def p_sparse(self) -> int:
        return self.p_tot - self.p_act

    @property
    def rho(self) -> float | None:
        """Share of P_sparse in routed experts; None when P_sparse is 0 (a dense model, or top_k =
        num_routed without Engram), where no budget is allocated and the ratio is undefined."""
        return self.routed_inactive / self.p_sparse if self.p_sparse else None

    @property
    def total(self) -> int:
        """Every parameter: embedding + head + P_tot (= sum of the model's parameters)."""
        return self.embedding + self.head + self.p_tot

    def as_dict(self) -> dict[str, int | float | None]:
        derived = ("p_tot", "p_act", "p_sparse", "rho", "total")
        return {**asdict(self), **{name: getattr(self, name) for name in derived}}


# ---- measured ------------------------------------------------------------------------------------
_BLOCK_PARTS = {
    "attn_norm": "norms",
    "ffn_norm": "norms",
    "attn": "attention",
    "attn_res": "hyper",
    "ffn_res": "hyper",
}
_MOE_PARTS = {"router": "router", "experts": "routed_experts_total", "shared": "shared_experts"}
_TOP_LEVEL = {"embed": "embedding", "head": "head", "norm": "norms"}
# The disjoint categories, which sum to every parameter (the `_active` ones are subsets).
_ADDITIVE = (
    "embedding",
    "head",
    "attention",
    "norms",
    "dense_ffn",
    "shared_experts",
    "routed_experts_total",
    "router",
    "hyper",
    "engram_tables",
    "engram_dense",
)


def _category(model: EngramLM, name: str) -> str | None:
    parts = name.split(".")
    if parts[0] == "input_memory":  # OverEncoding: input_memory.<i>.table / .proj
        return "engram_tables" if parts[2] == "table" else "engram_dense"
    if parts[0] != "blocks":
        return _TOP_LEVEL.get(parts[0])
    block, sub, rest = model.blocks[int(parts[1])], parts[2], parts[3:]
    if sub == "engram":
        return "engram_tables" if rest[0] == "table" else "engram_dense"
    if sub == "ffn":
        return _MOE_PARTS.get(rest[0]) if isinstance(block.ffn, MoE) else "dense_ffn"
    return _BLOCK_PARTS.get(sub)


def count_params(model: EngramLM) -> ParamCounts:
    """Count a built model's parameters by category (buffers such as MoE route biases are state,
    not parameters, and are not counted). A tied head is counted once, as the embedding."""
    sums = dict.fromkeys(_ADDITIVE, 0)
    # named_parameters yields a tied weight once, under its first name ("embed.weight").
    for name, param in model.named_parameters():
        category = _category(model, name)
        if category is None:
            raise RuntimeError(  # our bug: a new parameter kind
                f"parameter {name!r} has no accounting category: teach "
                "engram.model.accounting where it belongs"
            )
        sums[category] += param.numel()
    routed_active = sum(moe.config.top_k * moe.expert_params for moe in model.moe_layers)
    rows_active = sum(engram.spec.d_mem for engram in model.engram_layers)
    return ParamCounts(**sums, routed_experts_active=routed_active, engram_rows_active=rows_active)


# ---- analytic ------------------------------------------------------------------------------------
def swiglu_params(d: int, hidden: int) -> int:
    """Parameters of one SwiGLU FFN of width `hidden` (a dense FFN or one expert)."""
    return 3 * d * hidden  # gate and up [d -> 2 hidden], down [hidden -> d], no biases


def _hyper_connection(d: int, branches: int) -> int:
    M = branches
    if M == 1:
        return 0  # the plain residual has no parameters
    # norm [M d], dynamic [M d -> 2M + M^2], alpha [3], pre/post biases [M] each, res bias [M, M]
    return M * d + M * d * (2 * M + M * M) + 3 + 2 * M + M * M


def _engram_dense(config: ModelConfig, d_mem: int) -> int:
    """Dense weights of one Engram layer, mirroring `engram.module.Engram` (or `OverEncoding`)."""
    opts = config.engram
    d, M = config.d_model, config.hc_branches
    if opts.site == "input":
        return d_mem * d  # OverEncoding's projection, no bias
    # Built as the model builds it so that defaults (kernel size) come from one place.
    module_cfg = opts.module_config(d, M)
    num_keys = M if module_cfg.branch_keys else 1
    value = d_mem * d + d  # W_V with bias
    # W_K (one per branch, or shared) with bias, and the key/query RMSNorm per branch: gate only.
    keys = d_mem * num_keys * d + num_keys * d if module_cfg.gate else 0
    gate_norms = 2 * M * d if module_cfg.gate else 0
    conv = M * d + M * d * module_cfg.kernel_size if module_cfg.conv else 0  # norm + depthwise
    return value + keys + gate_norms + conv


def _engram_counts(config: ModelConfig, spec: HashSpec | None) -> tuple[int, int, int]:
    """(tables, rows read per token, dense) summed over the model's Engram layers."""
    if config.engram is None:
        return 0, 0, 0
    spec_cfg = spec.config if spec is not None else config.engram.spec
    primes = (
        spec.primes
        if spec is not None
        else derive_primes(
            spec_cfg.layer_ids, spec_cfg.orders, spec_cfg.heads_per_order, spec_cfg.base_sizes
        )
    )
    d_mem = spec_cfg.row_dim * spec_cfg.heads_per_order * len(spec_cfg.orders)
    # The model builds an Engram at every block in the spec's layer_ids inside n_layers.
    kept = [
        p for layer, p in zip(spec_cfg.layer_ids, primes, strict=True) if layer < config.n_layers
    ]
    tables = sum(sum(p) for p in kept) * spec_cfg.row_dim
    return tables, len(kept) * d_mem, len(kept) * _engram_dense(config, d_mem)


def count_params_from_config(config: ModelConfig, spec: HashSpec | None = None) -> ParamCounts:
    """The counts `count_params` would measure on `EngramLM(config, spec)`, without building it.

    Without `spec`, Engram table sizes come from `config.engram.spec`'s primes
    (`derive_primes`), which need no tokenizer; with it, from the resolved spec, as the model does.
    """
    config.validate()
    if spec is not None and config.engram is None:
        raise ValueError("a spec was given but the config has no Engram (config.engram is None)")
    d, L, M = config.d_model, config.n_layers, config.hc_branches
    hd = config.head_dim
    moe_layers = sum(config.is_moe_layer(i) for i in range(L))
    moe = config.moe
    expert = swiglu_params(d, moe.expert_hidden) if moe is not None else 0
    tables, rows_active, engram_dense = _engram_counts(config, spec)
    return ParamCounts(
        embedding=config.vocab_size * d,
        head=0 if config.tie_embeddings else config.vocab_size * d,
        # q [d -> nh hd], kv [d -> 2 nkv hd], o [nh hd -> d], no biases
        attention=L * (2 * d * config.n_heads * hd + 2 * d * config.n_kv_heads * hd),
        norms=(2 * L + 1) * d,
        dense_ffn=(L - moe_layers) * swiglu_params(d, config.ffn_hidden),
        shared_experts=moe_layers * swiglu_params(d, moe.shared_width) if moe is not None else 0,
        routed_experts_total=moe_layers * moe.num_routed * expert if moe is not None else 0,
        routed_experts_active=moe_layers * moe.top_k * expert if moe is not None else 0,
        router=moe_layers * d * moe.num_routed if moe is not None else 0,
        hyper=2 * L * _hyper_connection(d, M),
        engram_tables=tables,
        engram_rows_active=rows_active,
        engram_dense=engram_dense,
    )


def training_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token, nanoGPT's (PaLM's) estimate: 6 N + 12 L d T. N counts the
    weights a token is multiplied through: the active parameters (`p_act`) and the LM head's
    matrix (even when tied), not the embedding or the table rows, which are gathered. 12 L d T
    is attention's scores and weighted sum over a window of T, forward and backward, the causal
    mask not halved. The denominator-free half of MFU (`engram.assembly.peak_flops`)."""
    counts = count_params_from_config(config)
    matmul = counts.p_act - counts.engram_rows_active + config.vocab_size * config.d_model
    return 6 * matmul + 12 * config.n_layers * config.d_model * seq_len


__all__ = [
    "ParamCounts",
    "count_params",
    "count_params_from_config",
    "swiglu_params",
    "training_flops_per_token",
]
