"""The iso-parameter planner (paper section 3.1): moving routed experts into Engram tables at
fixed P_tot and P_act, and its report."""

from __future__ import annotations

import pytest
from test_accounting import DEMO, MOE_BASELINE, build

from engram.model.accounting import count_params, count_params_from_config
from engram.model.planner import format_plan, plan_allocation, plan_from_moe
from engram.spec import derive_primes


@pytest.mark.parametrize("rho", [1.0, 0.9, 0.8, 0.6, 0.4])
def test_plan_from_moe_is_iso_parameter(rho):
    plan = plan_from_moe(DEMO, rho)
    base = count_params_from_config(MOE_BASELINE)
    step = plan.expert_size
    assert step == 5 * 3 * DEMO.d_model * DEMO.moe.expert_hidden  # 5 MoE layers of 6
    assert (plan.target_p_tot, plan.target_p_act) == (base.p_tot, base.p_act)
    assert abs(plan.p_tot_diff) <= step and abs(plan.p_act_diff) <= step
    # One expert more or fewer moves rho by its share of P_sparse: the plan's resolution.
    assert abs(plan.rho - rho) <= 0.5 * step / plan.counts.p_sparse + 1e-9
    assert plan.counts == count_params_from_config(plan.config)
    assert plan.warnings == []
    if rho == 1.0:
        assert plan.config.engram is None and plan.num_routed == DEMO.moe.num_routed
        assert plan.counts == base
    else:
        spec = plan.config.engram.spec
        assert spec.base_sizes == (plan.base_size,) * 2
        primes = derive_primes(spec.layer_ids, spec.orders, spec.heads_per_order, spec.base_sizes)
        assert plan.table_rows == sum(map(sum, primes))
        assert plan.counts.engram_tables == plan.table_rows * spec.row_dim
        # The table absorbs P_tot: the fitted base size lands each head within a couple of
        # prime gaps (~ln 10^4 ~ 10 here) of its share, far under one expert.
        heads = len(spec.layer_ids) * len(spec.orders) * spec.heads_per_order
        assert abs(plan.p_tot_diff) <= heads * spec.row_dim * 20


def test_plan_moves_experts_into_memory_as_rho_falls():
    plans = [plan_from_moe(MOE_BASELINE, r, engram=DEMO.engram) for r in (0.9, 0.6, 0.4, 0.0)]
    assert [p.num_routed for p in plans] == sorted((p.num_routed for p in plans), reverse=True)
    assert [p.table_rows for p in plans] == sorted(p.table_rows for p in plans)
    assert plans[-1].num_routed == DEMO.moe.top_k and plans[-1].rho == 0.0


def test_planned_model_measures_as_planned(small_tok):
    plan = plan_from_moe(DEMO, 0.8)
    model, _ = build(small_tok, plan.config)
    measured = count_params(model)
    # vocab_size differs (a small tokenizer), which only embedding and head see.
    assert (measured.p_tot, measured.p_act) == (plan.counts.p_tot, plan.counts.p_act)


def test_plan_allocation_with_explicit_targets_and_warning():
    base = count_params_from_config(MOE_BASELINE)
    plan = plan_allocation(DEMO, base.p_tot + 3_000_000, base.p_act, 0.7)
    assert abs(plan.p_tot_diff) <= plan.expert_size
    assert abs(plan.rho - 0.7) <= 0.5 * plan.expert_size / plan.counts.p_sparse + 1e-9
    assert plan.baseline is None
    # Pure MoE between two expert counts: the nearer one, within half an expert of P_tot.
    pure = plan_allocation(MOE_BASELINE, base.p_tot + 3 * plan.expert_size // 2, base.p_act, 1.0)
    assert pure.config.engram is None and pure.num_routed in (17, 18)
    assert abs(pure.p_tot_diff) <= (plan.expert_size + 5 * DEMO.d_model) // 2  # + router column
    # A target P_act the backbone cannot meet is reported, not silently accepted.
    off = plan_allocation(DEMO, base.p_tot, base.p_act - 2 * plan.expert_size, 0.8)
    assert any("P_act" in w for w in off.warnings)
    assert "more than one routed expert" in format_plan(off)


def test_format_plan_shows_the_accounting():
    text = format_plan(plan_from_moe(DEMO, 0.8))
    for want in ("P_tot", "P_act", "p_sparse", "rho", "routed experts: 13", "base size", "none"):
        assert want in text, f"{want!r} missing from:\n{text}"
    assert "Engram: none" in format_plan(plan_from_moe(DEMO, 1.0))


@pytest.mark.parametrize("rho", [-0.1, 1.5, float("nan")])
def test_rho_outside_unit_interval(rho):
    with pytest.raises(ValueError, match="rho="):
        plan_from_moe(DEMO, rho)


def test_impossible_plans():
    base = count_params_from_config(MOE_BASELINE)
    with pytest.raises(ValueError, match="impossible targets"):
        plan_allocation(DEMO, base.p_act - 1, base.p_act, 0.8)
    with pytest.raises(ValueError, match="below the backbone"):
        plan_allocation(DEMO, base.p_act // 2, base.p_act // 4, 0.8)
    with pytest.raises(ValueError, match="too small a table"):
        plan_from_moe(DEMO, 0.995)
    with pytest.raises(ValueError, match=r"base\.moe is None"):
        plan_from_moe(DEMO.with_(moe=None), 0.8)
    with pytest.raises(ValueError, match="gives its layout"):
        plan_from_moe(MOE_BASELINE, 0.8)
    with pytest.raises(ValueError, match="no MoE layer"):
        plan_from_moe(DEMO.with_(first_dense_layers=6), 0.8)
    with pytest.raises(ValueError, match="min_base_size=1"):
        plan_from_moe(DEMO, 0.8, min_base_size=1)
