"""The Engram LM backbone: shapes, causality, mHC, MoE routing and balancing, switches, errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engram.config import OptimConfig
from engram.hashing import NgramHasher
from engram.model import EngramLM, MoEConfig, model_preset
from engram.model.hyper import HyperConnection, sinkhorn
from engram.model.moe import MoE
from engram.optim import Optimizers
from engram.spec import resolve
from engram.vocab import compress

# The OverEncoding baseline: the tiny preset's own tables, added to the input embedding.
OVERENCODING = replace(model_preset("tiny").engram, site="input")


def build(tok, **changes):
    cfg = model_preset("tiny").with_(vocab_size=tok.vocab_size, **changes)
    if cfg.engram is None:
        torch.manual_seed(0)
        return EngramLM(cfg)
    vocab = compress(tok, use_cache=False)
    spec = resolve(cfg.engram.spec, tokenizer=tok, vocab=vocab, pad_id=tok.pad_id)
    torch.manual_seed(0)
    return EngramLM(cfg, spec, NgramHasher(spec, vocab))


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"hc_branches": 1},
        {"moe": None},
        {"engram": None},
        {"hc_branches": 4, "first_dense_layers": 0},
        {"engram": OVERENCODING},
    ],
)
def test_forward_backward_shapes(small_tok, changes):
    model = build(small_tok, **changes)
    ids = torch.randint(0, small_tok.vocab_size, (2, 20))
    logits, loss = model(ids, targets=ids)
    assert logits.shape == (2, 20, model.config.vocab_size)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing}"


def test_causal(small_tok):
    model = build(small_tok).eval()
    ids = torch.randint(3, small_tok.vocab_size, (1, 24))
    changed = ids.clone()
    changed[0, 12:] = torch.randint(3, small_tok.vocab_size, (12,))
    a, b = model(ids), model(changed)
    diff = (a[:, :12] - b[:, :12]).abs().max()
    # The same arithmetic on the same prefix; only the batch-shape-dependent reduction order
    # of attention and matmuls can differ, at float32 rounding.
    assert diff < 1e-5, f"future tokens changed past logits by {diff:.2e}"


def test_engram_off_changes_the_output(small_tok):
    model = build(small_tok)
    with torch.no_grad():
        for engram in model.engram_layers:
            engram.table.weight.normal_()
    ids = torch.randint(3, small_tok.vocab_size, (1, 10))
    assert not torch.allclose(model(ids), model(ids, engram_off=True))
    assert build(small_tok, engram=None).engram_layers == []


def test_rows_from_the_loader_equal_rows_from_the_model(small_tok):
    model = build(small_tok)
    ids = torch.randint(3, small_tok.vocab_size, (2, 12))
    assert torch.equal(model(ids), model(ids, rows=model.hasher(ids)))


def test_sinkhorn_is_doubly_stochastic():
    m = sinkhorn(torch.randn(5, 4, 4), iterations=50)
    # Sinkhorn ends on a column step, so columns are exact and rows converge geometrically.
    torch.testing.assert_close(m.sum(-1), torch.ones(5, 4), atol=1e-3, rtol=0)
    torch.testing.assert_close(m.sum(-2), torch.ones(5, 4), atol=1e-4, rtol=0)
    assert bool((m >= 0).all())


def test_hyper_connection_starts_as_mean_in_copy_out():
    hc = HyperConnection(d=8, branches=4)
    x = torch.randn(2, 3, 4, 8)
    seen = {}

    def sublayer(h):
        seen["h"] = h
        return torch.ones_like(h)

    out = hc(x, sublayer)
    # H_pre = 1/M each (the sublayer reads the mean), H_res ~ identity, H_post = 1.
    torch.testing.assert_close(seen["h"], x.mean(2), atol=1e-3, rtol=0)
    h_pre, h_post, h_res = hc.coefficients(x)
    # exp(-8) of every off-diagonal logit leaks ~1e-3 between branches: "unmixed" to that level.
    torch.testing.assert_close(h_res, torch.eye(4).expand(2, 3, 4, 4), atol=2e-3, rtol=0)
    torch.testing.assert_close(h_post, torch.ones(2, 3, 4))
    torch.testing.assert_close(out, torch.einsum("btmn,btnd->btmd", h_res, x) + 1)


def test_moe_routes_top_k_and_balances():
    torch.manual_seed(0)
    moe = MoE(16, MoEConfig(num_routed=4, top_k=2, expert_hidden=8, bias_update_rate=0.05))
    with torch.no_grad():
        moe.router.weight[0] = 0.0
    x = torch.randn(512, 16)
    x[:, 0] = 0.0
    with torch.no_grad():  # expert 0 gets a large constant affinity: it would win every token
        moe.router.weight[0, 0] = 1.0
    x[:, 0] = 3.0
    moe.train()
    moe(x)
    assert moe.load.sum() == 512 * 2 and moe.load[0] == 512
    stats = moe.update_route_bias()
    assert stats["max_load"] == pytest.approx(2.0) and moe.load.sum() == 0
    assert moe.route_bias[0] < 0  # the overloaded expert is pushed down
    for _ in range(100):
        moe(x)
        moe.update_route_bias()
    moe(x)
    assert moe.load.max() < 0.75 * 512, f"still unbalanced after balancing: {moe.load.tolist()}"


def test_moe_equals_dense_sum_over_selected_experts():
    torch.manual_seed(0)
    moe = MoE(8, MoEConfig(num_routed=3, top_k=2, expert_hidden=4, num_shared=1)).eval()
    x = torch.randn(5, 8)
    scores = torch.sigmoid(moe.router(x))
    idx = torch.topk(scores, 2).indices
    want = moe.shared(x)
    for n in range(5):
        w = scores[n, idx[n]] / scores[n, idx[n]].sum()
        for j in range(2):
            want[n] += w[j] * moe.experts[idx[n, j]](x[n])
    torch.testing.assert_close(moe(x), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dispatch", ["sorted", "grouped"])
@pytest.mark.parametrize("d, hidden", [(64, 32), (10, 6)])  # the second: unaligned, no grouped
def test_fast_experts_equal_the_reference_loop(d, hidden, dispatch):
    """The sorted and grouped-GEMM paths compute the per-expert loop's sums: outputs and every
    gradient (the sorted forward bit for bit)."""
    torch.manual_seed(0)
    moe = MoE(d, MoEConfig(num_routed=8, top_k=2, expert_hidden=hidden, num_shared=1)).train()
    x = torch.randn(3, 50, d, requires_grad=True)
    results = []
    for mode in (dispatch, "loop"):
        moe.dispatch = mode
        moe.zero_grad()
        x.grad = None
        out = moe(x)
        out.square().mean().backward()
        grads = [p.grad.clone() for p in moe.parameters()]
        results.append((out.detach(), x.grad.clone(), grads))
    moe.dispatch = None
    (out_f, dx_f, grads_f), (out_l, dx_l, grads_l) = results
    if dispatch == "sorted":
        assert torch.equal(out_f, out_l)
    torch.testing.assert_close(out_f, out_l, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dx_f, dx_l, atol=1e-6, rtol=1e-5)
    for g, ref in zip(grads_f, grads_l, strict=True):
        torch.testing.assert_close(g, ref, atol=1e-6, rtol=1e-5)
    assert moe_grouped_used(moe, x) == (d % 4 == 0 and hidden % 4 == 0)


def test_unknown_dispatch_is_refused():
    moe = MoE(8, MoEConfig(num_routed=4, top_k=2, expert_hidden=8))
    moe.dispatch = "fast"
    with pytest.raises(ValueError, match="dispatch"):
        moe(torch.randn(1, 3, 8))


def moe_grouped_used(moe: MoE, x: torch.Tensor) -> bool:
    from engram.model.moe import _grouped_mm_supported

    return _grouped_mm_supported(x.reshape(-1, x.shape[-1]), moe.config.expert_hidden)


def test_config_errors(small_tok):
    cfg = model_preset("tiny")
    with pytest.raises(ValueError, match="n_kv_heads"):
        cfg.with_(n_kv_heads=3).validate()
    with pytest.raises(ValueError, match="top_k=5"):
        cfg.with_(moe=MoEConfig(num_routed=4, top_k=5, expert_hidden=8)).validate()
    with pytest.raises(ValueError, match="outside the model"):
        cfg.with_(n_layers=1).validate()
    with pytest.raises(ValueError, match="exactly when the config has Engram"):
        EngramLM(cfg.with_(vocab_size=small_tok.vocab_size))
    with pytest.raises(ValueError, match="site='side'"):
        cfg.with_(engram=replace(cfg.engram, site="side")).validate()
    with pytest.raises(ValueError, match="unknown model preset"):
        model_preset("huge")
    with pytest.raises(ValueError, match="max_seq_len"):
        build(small_tok)(torch.zeros(1, 300, dtype=torch.long))


def test_overencoding_reads_the_engram_tables_at_the_input(small_tok):
    engram, over = build(small_tok), build(small_tok, engram=OVERENCODING)
    assert all(b.engram is None for b in over.blocks)
    assert [m.layer_id for m in over.engram_layers] == list(over.spec.layer_ids)
    # Same spec, same addresses: identical table shapes and offsets layer by layer.
    for a, b in zip(engram.engram_layers, over.engram_layers, strict=True):
        assert a.table.weight.shape == b.table.weight.shape
        assert torch.equal(a.offsets, b.offsets)
    ids = torch.randint(3, small_tok.vocab_size, (1, 10))
    assert not torch.allclose(over(ids), over(ids, engram_off=True))


def test_overencoding_output_depends_on_the_rows_it_reads(small_tok):
    model = build(small_tok, engram=OVERENCODING).eval()
    ids = torch.randint(3, small_tok.vocab_size, (1, 12))
    memory = model.engram_layers[0]
    touched = model.hasher(ids)[memory.layer_id] + memory.offsets  # [1, T, H] table rows
    t = 6
    untouched = next(
        r for r in range(memory.table.num_embeddings) if r not in set(touched.flatten().tolist())
    )
    before = model(ids)
    with torch.no_grad():
        memory.table.weight[untouched] += 1.0
    assert torch.equal(model(ids), before), "a row no token reads changed the logits"
    with torch.no_grad():
        memory.table.weight[touched[0, t, 0]] += 1.0
    after = model(ids)
    first = int((touched[0] == touched[0, t, 0]).any(-1).nonzero()[0])  # first reader
    assert not torch.allclose(after[:, t], before[:, t])
    # Causal: positions before the first reader of the changed row see bit-identical inputs and
    # the same arithmetic, so their logits must not move at all.
    torch.testing.assert_close(after[:, :first], before[:, :first], atol=0, rtol=0)


def test_overencoding_trains(small_tok):
    model = build(small_tok, engram=OVERENCODING)
    optim = Optimizers(model, OptimConfig(lr=1e-2, warmup_steps=0))
    assert "tables" in optim.named  # its tables train like Engram's (sparse Adam, 5x rate)
    table = model.engram_layers[0].table.weight.detach().clone()
    torch.manual_seed(1)
    ids = torch.randint(3, small_tok.vocab_size, (4, 32))
    losses = []
    for _ in range(8):
        _, loss = model(ids[:, :-1], targets=ids[:, 1:])
        loss.backward()
        optim.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1, f"loss did not fall: {losses}"
    assert not torch.equal(model.engram_layers[0].table.weight, table)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6])
def test_top_k_picks_as_torch_topk(k):
    from engram.model.moe import _top_k

    x = torch.rand(200, 16, generator=torch.Generator().manual_seed(k))
    assert torch.equal(_top_k(x, k), torch.topk(x, k, dim=-1).indices)
