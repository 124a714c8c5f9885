"""Iso-parameter accounting of the Engram LM and the sparsity-allocation planner.

Paper section 3.1 (arXiv 2601.07372) compares MoE and Engram at fixed total and activated
parameters. Its definitions, which this file implements:

- P_tot: trainable parameters excluding the vocabulary embedding and the LM head.
- P_act: parameters a token activates: attention, norms, dense FFNs, shared experts, the top-k
  routed experts and the router of every MoE layer, hyper-connections, Engram's dense weights
  (projections, norms, conv) and the Engram rows the token reads (heads_total * row_dim per layer).
  The OverEncoding baseline (placement "input") counts the same way: its tables are
  `engram_tables`, its projection `engram_dense`.
- P_sparse = P_tot - P_act: inactive routed experts plus Engram rows not read.
- rho: the share of P_sparse held by routed experts. rho = 1 is pure MoE; the paper finds a
  U-shaped loss in rho with its best near 0.75-0.8.

`count_params` measures a built model; `count_params_from_config` computes the same numbers from a
config alone (for any preset, instantly). `plan_allocation` turns a backbone, target P_tot and P_act
and rho into a number of routed experts and an Engram base table size; `plan_from_moe` does so with
a pure-MoE baseline's own counts as the targets. `format_plan` prints the accounting.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from engram.model.config import EngramOptions, ModelConfig
from engram.model.lm import EngramLM
from engram.model.moe import MoE
from engram.module import EngramConfig
from engram.spec import HashSpec, SpecConfig, derive_primes

# Below this many rows per head a table hashes almost every N-gram into a collision; a plan that
# leaves Engram so little is better written as rho = 1 (or a smaller rho).
DEFAULT_MIN_BASE_SIZE = 1000
_MAX_FIT_STEPS = 12  # base-size refinement converges in 2-3 steps; this only bounds the loop


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
            raise ValueError(
                f"parameter {name!r} has no accounting category: teach "
                "engram.model.accounting where it belongs"
            )
        sums[category] += param.numel()
    routed_active = sum(moe.config.top_k * moe.expert_params for moe in model.moe_layers)
    rows_active = sum(engram.spec.d_mem for engram in model.engram_layers)
    return ParamCounts(**sums, routed_experts_active=routed_active, engram_rows_active=rows_active)


# ---- analytic ------------------------------------------------------------------------------------
def _swiglu(d: int, hidden: int) -> int:
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
    if opts.placement == "input":
        return d_mem * d  # OverEncoding's projection, no bias
    # Built as the model builds it so that defaults (kernel size) come from one place.
    module_cfg = EngramConfig(
        hidden_size=d, num_branches=M, gate=opts.gate, conv=opts.conv, branch_keys=opts.branch_keys
    )
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
    expert = _swiglu(d, moe.expert_hidden) if moe is not None else 0
    tables, rows_active, engram_dense = _engram_counts(config, spec)
    return ParamCounts(
        embedding=config.vocab_size * d,
        head=0 if config.tie_embeddings else config.vocab_size * d,
        # q [d -> nh hd], kv [d -> 2 nkv hd], o [nh hd -> d], no biases
        attention=L * (2 * d * config.n_heads * hd + 2 * d * config.n_kv_heads * hd),
        norms=(2 * L + 1) * d,
        dense_ffn=(L - moe_layers) * _swiglu(d, config.ffn_hidden),
        shared_experts=moe_layers * moe.num_shared * expert if moe is not None else 0,
        routed_experts_total=moe_layers * moe.num_routed * expert if moe is not None else 0,
        routed_experts_active=moe_layers * moe.top_k * expert if moe is not None else 0,
        router=moe_layers * d * moe.num_routed if moe is not None else 0,
        hyper=2 * L * _hyper_connection(d, M),
        engram_tables=tables,
        engram_rows_active=rows_active,
        engram_dense=engram_dense,
    )


# ---- planner -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AllocationPlan:
    """An iso-parameter configuration and its resolved accounting.

    `expert_size` is one routed expert in every MoE layer: the step by which changing
    `num_routed` moves P_tot, hence the tolerance the plan is held to.
    """

    config: ModelConfig  # the planned model (engram=None when rho = 1)
    counts: ParamCounts  # count_params_from_config(config)
    target_p_tot: int
    target_p_act: int
    target_rho: float
    expert_size: int
    base_size: int | None  # Engram base table size per head (every order); None without Engram
    table_rows: int  # sum of the derived primes over Engram layers and heads
    warnings: list[str] = field(default_factory=list)
    baseline: ParamCounts | None = None  # the MoE baseline's counts (plan_from_moe)

    @property
    def num_routed(self) -> int:
        return self.config.moe.num_routed

    @property
    def p_tot_diff(self) -> int:
        return self.counts.p_tot - self.target_p_tot

    @property
    def p_act_diff(self) -> int:
        return self.counts.p_act - self.target_p_act

    @property
    def rho(self) -> float | None:
        return self.counts.rho


def _check_inputs(base: ModelConfig, p_tot: int, p_act: int, rho: float) -> int:
    """Validate; return the number of MoE layers."""
    if not isinstance(rho, int | float) or math.isnan(rho) or not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho={rho} must be in [0, 1]")
    if base.moe is None:
        raise ValueError("the planner needs an MoE backbone: base.moe is None")
    moe_layers = sum(base.is_moe_layer(i) for i in range(base.n_layers))
    if moe_layers == 0:
        raise ValueError(
            f"first_dense_layers={base.first_dense_layers} leaves no MoE layer in "
            f"n_layers={base.n_layers}"
        )
    if p_act < 1 or p_tot < p_act:
        raise ValueError(
            f"impossible targets p_tot={p_tot:,}, p_act={p_act:,}: need p_tot >= p_act >= 1"
        )
    return moe_layers


def _engram_template(
    base: ModelConfig, engram: EngramOptions | None, rho: float, min_base_size: int
) -> EngramOptions | None:
    """The Engram layout to plan with: None at rho = 1 (pure MoE)."""
    if min_base_size < 2:
        raise ValueError(f"min_base_size={min_base_size} must be >= 2")
    template = None if rho == 1.0 else (engram if engram is not None else base.engram)
    if template is None and rho < 1.0:
        raise ValueError(
            f"rho={rho} < 1 puts memory in Engram, but neither `engram` nor base.engram "
            "gives its layout"
        )
    return template


def _layout(
    base: ModelConfig, num_routed: int, engram: EngramOptions | None, base_size: int
) -> ModelConfig:
    """`base` with `num_routed` routed experts and, with `engram`, equal base sizes per order."""
    if engram is not None:
        spec = replace(engram.spec, base_sizes=(base_size,) * len(engram.spec.orders))
        engram = replace(engram, spec=spec)
    return base.with_(moe=replace(base.moe, num_routed=num_routed), engram=engram)


def _table_rows(spec: SpecConfig, base_size: int) -> int:
    sizes = (base_size,) * len(spec.orders)
    return sum(map(sum, derive_primes(spec.layer_ids, spec.orders, spec.heads_per_order, sizes)))


def _fit_base_size(spec: SpecConfig, target_rows: float) -> tuple[int, int]:
    """The base size whose derived primes sum closest to `target_rows`; (base, rows)."""
    heads = len(spec.layer_ids) * len(spec.orders) * spec.heads_per_order
    base = max(2, round(target_rows / heads))
    seen: dict[int, int] = {}
    # Unique primes upward from `base` sum to about heads * base plus the gaps: shift `base` by the
    # per-head excess until it stops moving (or revisits a size).
    for _ in range(_MAX_FIT_STEPS):
        seen[base] = _table_rows(spec, base)
        shift = round((seen[base] - target_rows) / heads)
        if shift == 0 or max(2, base - shift) in seen:
            break
        base = max(2, base - shift)
    best = min(seen, key=lambda b: abs(seen[b] - target_rows))
    return best, seen[best]


def _rows_per_head(spec: SpecConfig, table_params: float) -> float:
    return (
        table_params
        / spec.row_dim
        / (len(spec.layer_ids) * len(spec.orders) * spec.heads_per_order)
    )


def _check_table(spec: SpecConfig, table_params: float, rho: float, min_base_size: int) -> None:
    per_head = _rows_per_head(spec, table_params)
    if per_head < min_base_size:
        raise ValueError(
            f"rho={rho} leaves Engram too small a table: {table_params:,.0f} parameters, "
            f"{per_head:,.0f} rows per head (< min_base_size={min_base_size:,}); "
            "use rho=1.0 (no Engram) or a smaller rho"
        )


def _candidate(
    base: ModelConfig, template: EngramOptions | None, num_routed: int, table_params: int
) -> tuple[ModelConfig, int | None, int]:
    """(config, base size, table rows) with `num_routed` experts and an Engram of about
    `table_params` table parameters."""
    if template is None:
        return _layout(base, num_routed, None, 0), None, 0
    base_size, rows = _fit_base_size(template.spec, table_params / template.spec.row_dim)
    return _layout(base, num_routed, template, base_size), base_size, rows


def _plan_warnings(plan: AllocationPlan) -> list[str]:
    step, counts, out = plan.expert_size, plan.counts, []
    engram = ", Engram dense weights and rows read" if plan.config.engram is not None else ""
    if abs(plan.p_act_diff) > step:
        out.append(
            f"P_act {counts.p_act:,} is {plan.p_act_diff:+,} from the target "
            f"{plan.target_p_act:,}, more than one routed expert ({step:,}): the backbone "
            f"(attention, FFNs, shared and top-k experts, router, hyper-connections{engram}) "
            "fixes P_act; change top_k, expert size or the backbone to match"
        )
    if abs(plan.p_tot_diff) > step:
        out.append(
            f"P_tot {counts.p_tot:,} is {plan.p_tot_diff:+,} from the target "
            f"{plan.target_p_tot:,}, more than one routed expert ({step:,})"
        )
    # One expert more or fewer moves rho by its share of P_sparse: the plan's resolution.
    if counts.rho is not None and abs(counts.rho - plan.target_rho) > step / counts.p_sparse:
        out.append(
            f"rho achieved {counts.rho:.3f} is further from the requested {plan.target_rho:.3f} "
            f"than one routed expert's share of P_sparse ({step / counts.p_sparse:.3f})"
        )
    return out


def plan_allocation(
    base: ModelConfig,
    p_tot: int,
    p_act: int,
    rho: float,
    *,
    engram: EngramOptions | None = None,
    min_base_size: int = DEFAULT_MIN_BASE_SIZE,
) -> AllocationPlan:
    """Routed experts and Engram table size that hold P_tot and P_act at the targets with rho.

    `base` gives everything but `moe.num_routed` and the Engram base sizes, which are ignored.
    The Engram layout (layers, orders, heads, row_dim, switches) is `engram`, else `base.engram`;
    rho = 1 plans no Engram. Only config numbers are used: table rows are the sum of the primes
    `derive_primes` hands out from the planned base size, so no tokenizer is needed. P_act is
    fixed by the backbone; when it misses the target by more than one routed expert the plan
    says so in `warnings` rather than failing.
    """
    moe_layers = _check_inputs(base, p_tot, p_act, rho)
    template = _engram_template(base, engram, rho, min_base_size)
    k = base.moe.top_k
    # Everything the plan does not choose: the backbone with top_k routed experts, Engram's dense
    # weights and rows read, and a throwaway table (base size 2) that is subtracted again.
    probe = count_params_from_config(_layout(base, k, template, 2))
    floor_tot = probe.p_tot - probe.engram_tables
    if p_tot < floor_tot:
        raise ValueError(
            f"p_tot={p_tot:,} is below the backbone itself: with top_k={k} routed experts "
            f"and no Engram table it already has P_tot={floor_tot:,}"
        )
    expert_size = moe_layers * _swiglu(base.d_model, base.moe.expert_hidden)
    router_column = moe_layers * base.d_model  # one more expert widens every router
    # x = num_routed - top_k solves rho * (p_tot - P_act(x)) = expert_size * x, where
    # P_act(x) = probe.p_act + router_column * x (routers are active). Try both roundings.
    x = rho * (p_tot - probe.p_act) / (expert_size + rho * router_column)
    if template is not None:  # Engram's exact share, before rounding x
        ideal = p_tot - floor_tot - (expert_size + router_column) * x
        _check_table(template.spec, ideal, rho, min_base_size)
    plans = []
    for extra in sorted({max(0, math.floor(x)), max(0, math.ceil(x))}):
        table_params = p_tot - floor_tot - (expert_size + router_column) * extra
        too_small = template is not None and (
            _rows_per_head(template.spec, table_params) < min_base_size
        )
        if too_small and extra > x:
            continue  # rounding up took too much; rounding down (a larger table) remains
        config, base_size, rows = _candidate(base, template, k + extra, table_params)
        counts = count_params_from_config(config)
        plans.append(
            AllocationPlan(config, counts, p_tot, p_act, rho, expert_size, base_size, rows)
        )
    best = min(
        plans,
        key=lambda p: (abs((p.rho if p.rho is not None else 1.0) - rho), abs(p.p_tot_diff)),
    )
    return replace(best, warnings=_plan_warnings(best))


def plan_from_moe(
    base: ModelConfig,
    rho: float,
    *,
    engram: EngramOptions | None = None,
    min_base_size: int = DEFAULT_MIN_BASE_SIZE,
) -> AllocationPlan:
    """The iso-parameter Engram model of a pure-MoE baseline: `base` without Engram sets the
    targets (its own P_tot and P_act); the Engram layout is `engram`, else `base.engram`."""
    if base.moe is None:
        raise ValueError("plan_from_moe needs an MoE baseline: base.moe is None")
    baseline_config = base.with_(engram=None)
    baseline = count_params_from_config(baseline_config)
    plan = plan_allocation(
        baseline_config,
        baseline.p_tot,
        baseline.p_act,
        rho,
        engram=engram if engram is not None else base.engram,
        min_base_size=min_base_size,
    )
    return replace(plan, baseline=baseline)


# ---- report --------------------------------------------------------------------------------------
_CATEGORIES = (
    "embedding",
    "head",
    "attention",
    "norms",
    "dense_ffn",
    "shared_experts",
    "routed_experts_total",
    "routed_experts_active",
    "router",
    "hyper",
    "engram_tables",
    "engram_rows_active",
    "engram_dense",
)


def _fmt(value: int | float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else f"{value:,}"


def _table(plan: AllocationPlan) -> list[str]:
    """Per-category rows: baseline, planned and their difference (planned only without one)."""
    base = plan.baseline
    cols = ("baseline", "planned", "diff") if base is not None else ("planned",)
    lines = [f"{'':24}" + "".join(f"{c:>15}" for c in cols)]
    for name in (*_CATEGORIES, "p_tot", "p_act", "p_sparse", "rho"):
        new = getattr(plan.counts, name)
        values = [new]
        if base is not None:
            old = getattr(base, name)
            both = old is not None and new is not None
            diff = new - old if both else None
            values = [old, new, f"{diff:+.3f}" if name == "rho" and both else diff]
        cells = "".join(f"{v if isinstance(v, str) else _fmt(v):>15}" for v in values)
        if name in ("p_tot", "embedding"):
            lines.append("-" * len(lines[0]))
        lines.append(f"{name:24}{cells}")
    return lines


def format_plan(plan: AllocationPlan) -> str:
    """A human-readable accounting of `plan`: categories, totals, layout, targets, warnings."""
    counts, moe = plan.counts, plan.config.moe
    moe_layers = sum(plan.config.is_moe_layer(i) for i in range(plan.config.n_layers))
    lines = [
        f"Iso-parameter allocation (paper section 3.1): rho requested {plan.target_rho:.3f}, "
        f"achieved {_fmt(counts.rho)}",
        *_table(plan),
        f"routed experts: {moe.num_routed} (top-{moe.top_k} active) in {moe_layers} MoE layers; "
        f"one expert in every MoE layer = {plan.expert_size:,} parameters",
    ]
    engram = plan.config.engram
    if engram is None:
        lines.append("Engram: none")
    else:
        spec = engram.spec
        heads = len(spec.orders) * spec.heads_per_order
        lines.append(
            f"Engram: base size {plan.base_size:,} per head, {heads} heads x "
            f"{len(spec.layer_ids)} layer(s) {list(spec.layer_ids)} -> {plan.table_rows:,} rows "
            f"x {spec.row_dim} = {counts.engram_tables:,} parameters"
        )
    lines += [
        f"target P_tot {plan.target_p_tot:,}: planned {plan.p_tot_diff:+,} "
        f"({plan.p_tot_diff / plan.expert_size:+.3f} expert)",
        f"target P_act {plan.target_p_act:,}: planned {plan.p_act_diff:+,} "
        f"({plan.p_act_diff / plan.expert_size:+.3f} expert)",
        "warnings: " + ("none" if not plan.warnings else ""),
        *(f"  - {w}" for w in plan.warnings),
    ]
    return "\n".join(lines)


__all__ = [
    "DEFAULT_MIN_BASE_SIZE",
    "AllocationPlan",
    "ParamCounts",
    "count_params",
    "count_params_from_config",
    "format_plan",
    "plan_allocation",
    "plan_from_moe",
]
