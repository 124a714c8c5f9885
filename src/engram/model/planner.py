"""The iso-parameter MoE/Engram allocation planner and its report (paper section 3.1).

Given a backbone, targets for P_tot and P_act and the share rho of P_sparse held by routed experts
(definitions in `engram.model.accounting`), `plan_allocation` chooses the number of routed experts
and an Engram base table size that meet them; `plan_from_moe` does so with a pure-MoE baseline's
own counts as the targets. Whole experts (one in every MoE layer) are the plan's resolution.
`format_plan` prints a plan's accounting beside the baseline's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from engram.model.accounting import ParamCounts, count_params_from_config, swiglu_params
from engram.model.config import EngramOptions, ModelConfig
from engram.spec import SpecConfig, derive_primes

# Below this many rows per head a table hashes almost every N-gram into a collision; a plan that
# leaves Engram so little is better written as rho = 1 (or a smaller rho).
DEFAULT_MIN_BASE_SIZE = 1000
_MAX_FIT_STEPS = 12  # base-size refinement converges in 2-3 steps; this only bounds the loop


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
    # Only the routed count changes: the shared experts' width (`shared_width`) is backbone.
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
    expert_size = moe_layers * swiglu_params(base.d_model, base.moe.expert_hidden)
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
        f"routed experts: {moe.num_routed} (top-{moe.top_k} active, hidden "
        f"{moe.expert_hidden}; shared hidden {moe.shared_width}) in {moe_layers} MoE layers; "
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
    "format_plan",
    "plan_allocation",
    "plan_from_moe",
]
