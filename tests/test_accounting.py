"""Iso-parameter accounting: measured = analytic, categories sum, the allocation planner."""

from __future__ import annotations

from dataclasses import asdict, fields, replace

import pytest
import torch

from engram.model import EngramLM, EngramOptions, ModelConfig, MoEConfig, model_preset
from engram.model.accounting import (
    ParamCounts,
    count_params,
    count_params_from_config,
    training_flops_per_token,
)
from engram.spec import SpecConfig, derive_primes, resolve
from engram.vocab import compress

TINY = model_preset("tiny")
# A fixed backbone (not a preset, so that retuning presets never moves these numbers): 6 blocks
# of width 256, the first dense, then 16 routed experts (top-2) and one shared expert.
DEMO = ModelConfig(
    vocab_size=8192,
    d_model=256,
    n_layers=6,
    n_heads=4,
    n_kv_heads=2,
    ffn_hidden=768,
    moe=MoEConfig(num_routed=16, top_k=2, expert_hidden=192),
    max_seq_len=512,
    engram=EngramOptions(
        spec=SpecConfig(
            tokenizer="deepseek",
            layer_ids=(1,),
            orders=(2, 3),
            heads_per_order=4,
            base_sizes=(30011, 30011),
            row_dim=32,
        )
    ),
)
MOE_BASELINE = DEMO.with_(engram=None)


def build(tok, cfg):
    cfg = cfg.with_(vocab_size=tok.vocab_size)
    if cfg.engram is None:
        return EngramLM(cfg), None
    vocab = compress(tok, use_cache=False)
    spec = resolve(cfg.engram.spec, tokenizer=tok, vocab=vocab, pad_id=tok.pad_id)
    return EngramLM(cfg, spec), spec


def _switches(**changes):
    return TINY.with_(engram=replace(TINY.engram, **changes))


CONFIGS = {
    "tiny M=2": TINY,
    "M=1": TINY.with_(hc_branches=1),
    "M=4 all MoE": TINY.with_(hc_branches=4, first_dense_layers=0),
    "dense": TINY.with_(moe=None),
    "no engram": TINY.with_(engram=None),
    "dense no engram tied": TINY.with_(moe=None, engram=None, tie_embeddings=True),
    "no shared experts": TINY.with_(
        moe=MoEConfig(num_routed=5, top_k=3, expert_hidden=8, num_shared=0)
    ),
    "engram ablations": _switches(gate=False, conv=False, branch_keys=False),
    "overencoding": _switches(site="input"),
    "overencoding M=1 dense": _switches(site="input").with_(hc_branches=1, moe=None),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_measured_equals_analytic_and_sums_to_every_parameter(small_tok, name):
    model, spec = build(small_tok, CONFIGS[name])
    measured = count_params(model)
    total = sum(p.numel() for p in model.parameters())
    assert measured.total == total, f"categories sum to {measured.total:,}, model has {total:,}"
    assert measured == count_params_from_config(model.config, spec)
    # Config-only primes equal the resolved spec's, so no tokenizer is needed for the numbers.
    assert measured == count_params_from_config(model.config)


def test_tied_head_is_counted_once_and_buffers_not_at_all(small_tok):
    model, _ = build(small_tok, CONFIGS["dense no engram tied"])
    counts = count_params(model)
    assert counts.head == 0 and counts.embedding == model.embed.weight.numel()
    model, _ = build(small_tok, TINY)
    buffers = sum(b.numel() for n, b in model.named_buffers() if "route_bias" in n)
    assert buffers > 0 and count_params(model).total == sum(p.numel() for p in model.parameters())


def test_definitions_on_the_tiny_model():
    c = count_params_from_config(TINY)
    moe, spec = TINY.moe, TINY.engram.spec
    expert = 3 * TINY.d_model * moe.expert_hidden
    assert c.routed_experts_active == 2 * moe.top_k * expert  # layers 1 and 2 are MoE
    assert c.engram_rows_active == spec.row_dim * spec.heads_per_order * len(spec.orders)
    assert c.p_sparse == 2 * (moe.num_routed - moe.top_k) * expert + c.engram_rows_inactive
    assert c.rho == pytest.approx(c.routed_inactive / c.p_sparse)
    assert set(c.as_dict()) == {f.name for f in fields(ParamCounts)} | {
        "p_tot",
        "p_act",
        "p_sparse",
        "rho",
        "total",
    }
    # Nothing is sparse in a dense model without Engram: rho is undefined, not 0 or 1.
    dense = count_params_from_config(TINY.with_(moe=None, engram=None))
    assert dense.p_sparse == 0 and dense.rho is None


def test_analytic_counts_the_3b_preset_without_building_it():
    c = count_params_from_config(model_preset("paper-3b-ablation"))
    assert c.p_tot > 1e9 and c.p_act < c.p_tot
    spec = model_preset("paper-3b-ablation").engram.spec
    primes = derive_primes(spec.layer_ids, spec.orders, spec.heads_per_order, spec.base_sizes)
    assert c.engram_tables == sum(map(sum, primes)) * spec.row_dim


def test_a_spec_for_a_config_without_engram_is_refused():
    with pytest.raises(ValueError, match="config has no Engram"):
        count_params_from_config(MOE_BASELINE, spec=object())


def test_as_dict_round_trips_fields():
    c = count_params_from_config(DEMO)
    assert {k: v for k, v in c.as_dict().items() if k in asdict(c)} == asdict(c)


def test_overencoding_has_the_engram_tables_and_one_projection():
    engram, over = (
        count_params_from_config(TINY),
        count_params_from_config(_switches(site="input")),
    )
    spec = TINY.engram.spec
    d_mem = spec.row_dim * spec.heads_per_order * len(spec.orders)
    assert over.engram_tables == engram.engram_tables > 0  # the same memory
    assert over.engram_rows_active == engram.engram_rows_active == d_mem
    assert over.engram_dense == len(spec.layer_ids) * d_mem * TINY.d_model  # no bias, gate, conv
    assert over.p_tot - engram.p_tot == over.engram_dense - engram.engram_dense


@pytest.mark.parametrize("moe", [None, MoEConfig(num_routed=8, top_k=2, expert_hidden=32)])
def test_training_flops_per_token_matches_a_count_of_the_forward(moe):
    """6 N + 12 L d T is three forwards' worth: torch's FLOP counter on a forward of a model
    without Engram counts the 2 N of its matrix products, to within the small ops the estimate
    leaves out (norms, mHC). It does not count the CPU flash-attention kernel, so the forward's
    4 L d T of attention is added by formula: what this checks is N."""
    from torch.utils.flop_counter import FlopCounterMode

    config = model_preset("tiny").with_(engram=None, moe=moe, vocab_size=300)
    B, T = 2, 64
    model = EngramLM(config).eval()
    for layer in model.moe_layers:  # torch's counter does not count grouped GEMMs
        layer.dispatch = "sorted"
    ids = torch.randint(0, 300, (B, T))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids)
    forward = counter.get_total_flops() / (B * T) + 4 * config.n_layers * config.d_model * T
    estimate = training_flops_per_token(config, T)
    assert abs(3 * forward / estimate - 1) < 0.05, (3 * forward, estimate)


def test_peak_flops_is_known_or_given():
    from engram.assembly import peak_flops

    cpu = torch.device("cpu")
    assert peak_flops(cpu) is None and peak_flops(cpu, override_tflops=2.5) == 2.5e12
