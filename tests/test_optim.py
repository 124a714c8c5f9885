"""Optimiser groups, the sparse table update, and the learning-rate schedules."""

from __future__ import annotations

import pytest
import torch

from engram.config import OptimConfig
from engram.hashing import NgramHasher
from engram.model import EngramLM, model_preset
from engram.optim import IndexedSparseAdam, Optimizers, check_groups, lr_factor
from engram.spec import resolve
from engram.tokenizer import train_bpe
from engram.vocab import compress


@pytest.fixture(scope="module")
def model_and_tok():
    tok = train_bpe(["def f(x):\n    return x + 1\n", "class A:\n    pass\n"] * 40, vocab_size=300)
    cfg = model_preset("tiny").with_(vocab_size=tok.vocab_size)
    vocab = compress(tok, use_cache=False)
    spec = resolve(cfg.engram.spec, tokenizer=tok, vocab=vocab, pad_id=tok.pad_id)
    torch.manual_seed(0)
    return EngramLM(cfg, spec, NgramHasher(spec, vocab)), tok


def test_every_parameter_in_exactly_one_group(model_and_tok):
    model, _ = model_and_tok
    opts = Optimizers(model, OptimConfig())
    check_groups(model, opts.all())
    table = model.engram_layers[0].table.weight
    assert opts.named["tables"].param_groups[0]["params"] == [table]
    assert opts.named["tables"].param_groups[0]["lr"] == pytest.approx(5 * opts.config.lr)
    no_decay = opts.named["adamw"].param_groups[1]["params"]
    assert all(p.ndim == 1 or p is model.embed.weight for p in no_decay)
    with pytest.raises(AssertionError, match="missing"):
        check_groups(model, [opts.named["adamw"]])


def test_muon_takes_the_hidden_matrices(model_and_tok):
    model, tok = model_and_tok
    opts = Optimizers(model, OptimConfig(backbone="muon"))
    check_groups(model, opts.all())
    muon = opts.named["muon"].param_groups[0]["params"]
    assert muon and all(p.ndim == 2 for p in muon)
    ids_in_muon = {id(p) for p in muon}
    assert id(model.embed.weight) not in ids_in_muon and id(model.head.weight) not in ids_in_muon
    opts.set_lr(0.5)
    assert opts.named["muon"].param_groups[0]["lr"] == pytest.approx(0.5 * opts.config.lr)
    ids = torch.randint(3, tok.vocab_size, (2, 12))
    before = model.blocks[0].attn.q_proj.weight.detach().clone()
    _, loss = model(ids, targets=ids)
    loss.backward()
    opts.step()
    assert not torch.equal(before, model.blocks[0].attn.q_proj.weight)


def test_the_fused_adamw_steps_as_torchs_default(model_and_tok):
    """optim.fused (on by default): AdamW's fused kernel takes the steps of torch's default
    per-tensor loop (optim.fused=false) to float tolerance."""
    import copy

    base, tok = model_and_tok
    ids = torch.randint(3, tok.vocab_size, (2, 12))
    weights = []
    for fused in (False, True):
        model = copy.deepcopy(base)
        opts = Optimizers(model, OptimConfig(fused=fused, warmup_steps=0))
        assert opts.named["adamw"].defaults["fused"] is (True if fused else None)
        for _ in range(3):
            _, loss = model(ids, targets=ids)
            loss.backward()
            opts.step()
        weights.append(model.blocks[0].attn.q_proj.weight.detach())
    assert not torch.equal(weights[0], base.blocks[0].attn.q_proj.weight)
    torch.testing.assert_close(weights[1], weights[0], atol=1e-6, rtol=1e-5)


def test_sparse_update_touches_only_read_rows(model_and_tok):
    model, tok = model_and_tok
    opts = Optimizers(model, OptimConfig(lr=1e-2))
    table = model.engram_layers[0].table
    before = table.weight.detach().clone()
    ids = torch.randint(3, tok.vocab_size, (2, 12))
    _, loss = model(ids, targets=ids)
    loss.backward()
    assert table.weight.grad.is_sparse
    opts.step()
    rows = model.hasher(ids)[model.engram_layers[0].layer_id] + model.engram_layers[0].offsets
    touched = torch.zeros(table.num_embeddings, dtype=torch.bool)
    touched[rows.flatten()] = True
    changed = (table.weight.detach() != before).any(-1)
    assert torch.equal(changed, touched)
    assert isinstance(opts.named["tables"], IndexedSparseAdam)
    state = opts.named["tables"].state[table.weight]
    assert (state["exp_avg"][~touched] == 0).all()  # untouched rows keep no optimiser state


@pytest.mark.parametrize("maximize", [False, True])
def test_indexed_sparse_adam_is_torchs_sparse_adam_bit_for_bit(maximize):
    """The tables' optimiser: torch's SparseAdam's values, moments and step count exactly, over
    steps with repeated rows, a changing lr, a step with no rows and one without a gradient;
    and each optimiser's state dict continues in the other."""
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(50, 4, generator=gen)
    batches = [torch.randint(0, 50, (3, 7), generator=gen) for _ in range(6)]
    batches[3] = batches[3][:0]  # reads no row: an empty sparse gradient
    results = []
    for cls in (torch.optim.SparseAdam, IndexedSparseAdam):
        emb = torch.nn.Embedding(50, 4, sparse=True, _weight=init.clone())
        opt = cls(emb.parameters(), lr=0.1, betas=(0.9, 0.95), maximize=maximize)
        for i, rows in enumerate(batches):
            opt.param_groups[0]["lr"] = 0.1 / (i + 1)
            if i != 4:  # step 4: no gradient at all, the parameter is skipped
                (emb(rows) * torch.arange(1.0, 5.0)).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
        results.append((emb.weight.detach(), opt.state_dict()))
    (w_torch, s_torch), (w_ours, s_ours) = results
    assert not torch.equal(w_ours, init)
    assert torch.equal(w_ours, w_torch)
    st_torch, st_ours = s_torch["state"][0], s_ours["state"][0]
    assert st_ours["step"] == st_torch["step"] == 5
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(st_ours[key], st_torch[key])
    # The states are interchangeable: torch's loads into ours (and steps on) and vice versa.
    for cls, state in ((IndexedSparseAdam, s_torch), (torch.optim.SparseAdam, s_ours)):
        emb = torch.nn.Embedding(50, 4, sparse=True, _weight=w_torch.clone())
        opt = cls(emb.parameters(), lr=0.1, betas=(0.9, 0.95), maximize=maximize)
        opt.load_state_dict(state)
        emb(batches[0]).sum().backward()
        opt.step()
        results.append(emb.weight.detach())
    assert torch.equal(results[2], results[3])


def test_indexed_sparse_adam_refuses_dense_gradients():
    weight = torch.nn.Parameter(torch.zeros(3, 2))
    weight.grad = torch.ones(3, 2)
    with pytest.raises(RuntimeError, match="dense gradients"):
        IndexedSparseAdam([weight]).step()


def test_schedules():
    cos = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 100, cos) == pytest.approx(0.1)
    assert lr_factor(9, 100, cos) == pytest.approx(1.0)
    assert lr_factor(100, 100, cos) == pytest.approx(0.1)
    assert lr_factor(55, 100, cos) == pytest.approx(0.55)
    step = OptimConfig(warmup_steps=0, schedule="step")
    assert [lr_factor(s, 100, step) for s in (0, 79, 80, 90)] == [1.0, 1.0, 0.316, 0.1]
    assert lr_factor(50, 100, OptimConfig(warmup_steps=0, schedule="constant")) == 1.0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lr": 0}, "lr=0"),
        ({"schedule": "linear"}, "schedule='linear'"),
        ({"grad_clip": -1}, "must be >= 0"),
    ],
)
def test_bad_optim_config(change, message):
    with pytest.raises(ValueError, match=message):
        OptimConfig(**change).validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_indexed_sparse_adam_on_cuda_is_sparse_adams():
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(1000, 16, generator=gen).cuda()
    batches = [torch.randint(0, 1000, (8, 64), generator=gen).cuda() for _ in range(4)]
    weights = []
    for cls in (torch.optim.SparseAdam, IndexedSparseAdam):
        emb = torch.nn.Embedding(1000, 16, sparse=True, _weight=init.clone())
        opt = cls(emb.parameters(), lr=0.01, betas=(0.9, 0.95))
        for rows in batches:
            emb(rows).square().sum().backward()
            opt.step()
            opt.zero_grad()
        weights.append(emb.weight.detach())
    # Bit-equal on the CPU (above); a CUDA coalesce may sum a row's duplicates in another order.
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-6, atol=1e-7)
