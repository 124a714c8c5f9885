"""The Engram module: shapes, the demo's equations, ablations, gradients, accounting, errors."""

from __future__ import annotations

import pytest
import torch
from reference import demo_engram_forward

from engram.hashing import NgramHasher
from engram.module import Engram, EngramConfig


def make(spec, M=4, d=32, seed=0, **options):
    torch.manual_seed(seed)
    return Engram(spec, spec.layer_ids[0], EngramConfig(hidden_size=d, num_branches=M, **options))


def inputs(spec, vocab, B=2, T=24, M=4, d=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 5000, (B, T), generator=gen)
    rows = NgramHasher(spec, vocab)(ids)[spec.layer_ids[0]]
    hidden = torch.randn(B, T, M, d, generator=gen)
    return hidden, rows


def randomise_conv(module, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.conv.conv.weight.copy_(
            0.3 * torch.randn(module.conv.conv.weight.shape, generator=gen)
        )


@pytest.mark.parametrize("M", [1, 4])
def test_shapes(tiny_spec, deepseek_vocab, M):
    module = make(tiny_spec, M=M)
    hidden, rows = inputs(tiny_spec, deepseek_vocab, M=M)
    assert module(hidden, rows).shape == (2, 24, M, 32)
    if M == 1:
        assert module(hidden[:, :, 0], rows).shape == (2, 24, 32)


@pytest.mark.parametrize("branch_keys", [True, False])
def test_matches_the_demo_forward(tiny_spec, deepseek_vocab, branch_keys):
    module = make(tiny_spec, branch_keys=branch_keys)
    randomise_conv(module)
    hidden, rows = inputs(tiny_spec, deepseek_vocab)
    got, want = module(hidden, rows), demo_engram_forward(module, hidden, rows)
    diff = (got - want).abs()
    # fp32, same operations in another order (fused vs per-branch): rounding only, ~1e-7.
    assert diff.max() < 1e-5, f"max {diff.max():.2e} mean {diff.mean():.2e}"


def test_zero_initialised_conv_returns_gated_value(tiny_spec, deepseek_vocab):
    module = make(tiny_spec)
    hidden, rows = inputs(tiny_spec, deepseek_vocab)
    e = module.table(rows + module.offsets).flatten(start_dim=-2)
    u = module.gates(hidden, rows).unsqueeze(-1) * module.value_proj(e).unsqueeze(2)
    assert torch.equal(module(hidden, rows), u)


def test_gate_lies_strictly_between_zero_and_one(tiny_spec, deepseek_vocab):
    module = make(tiny_spec)
    hidden, rows = inputs(tiny_spec, deepseek_vocab)
    a = module.gates(hidden * 100, rows)
    assert a.shape == (2, 24, 4)
    assert bool((a > 0).all()) and bool((a < 1).all())


def test_gate_off_passes_the_value(tiny_spec, deepseek_vocab):
    module = make(tiny_spec, gate=False, conv=False)
    hidden, rows = inputs(tiny_spec, deepseek_vocab)
    v = module.value_proj(module.table(rows + module.offsets).flatten(start_dim=-2))
    assert torch.equal(module(hidden, rows), v.unsqueeze(2).expand(2, 24, 4, 32))
    assert torch.equal(module.gates(hidden, rows), torch.ones(2, 24, 4))


@pytest.mark.parametrize(
    "options",
    [{}, {"gate": False}, {"conv": False}, {"branch_keys": False}, {"gate": False, "conv": False}],
)
@pytest.mark.parametrize("M", [1, 4])
def test_decode_step_equals_the_forward(tiny_spec, deepseek_vocab, options, M):
    """The fused one-token step (`Engram._step`) against the readable forward, token by
    token from a window, with a document start in the middle; and the step again with the
    value and keys from one stacked projection (what a captured decoder passes)."""
    module = make(tiny_spec, M=M, **options)
    with torch.no_grad():  # trained norms and conv are not their init (ones, zeros)
        for name, p in module.named_parameters():
            if "norm" in name or "conv" in name:
                p.normal_(std=0.5)
    hidden, rows = inputs(tiny_spec, deepseek_vocab, M=M, T=12)
    starts = torch.zeros(2, 12, dtype=torch.bool)
    starts[1, 7] = True
    with torch.no_grad():
        want = module(hidden, rows, starts)
        R = module.conv.receptive if module.conv is not None else 0

        def token_by_token(step) -> torch.Tensor:
            window = torch.zeros(2, R, M, 32)  # the conv's state, advanced in place
            tokens = [
                (hidden[:, t : t + 1], rows[:, t : t + 1], starts[:, t : t + 1]) for t in range(12)
            ]
            return torch.cat([step(*token, window) for token in tokens], dim=1)

        got = token_by_token(lambda h, r, s, w: module(h, r, s, None, w))
        stacked = module.stacked_projection()
        one_product = token_by_token(lambda h, r, s, w: module._step(h, r, s, w, stacked))
    assert (got - want).abs().max() < 1e-5
    assert (one_product - want).abs().max() < 1e-5


def test_branch_keys_off_shares_one_key(tiny_spec):
    assert make(tiny_spec, branch_keys=True).key_proj.out_features == 4 * 32
    assert make(tiny_spec, branch_keys=False).key_proj.out_features == 32


def test_conv_is_causal(tiny_spec, deepseek_vocab):
    module = make(tiny_spec)
    randomise_conv(module)
    hidden, rows = inputs(tiny_spec, deepseek_vocab)
    changed = hidden.clone()
    changed[:, 15:] = torch.randn_like(changed[:, 15:])
    a, b = module(hidden, rows), module(changed, rows)
    assert torch.equal(a[:, :15], b[:, :15])
    assert not torch.equal(a[:, 15:], b[:, 15:])


def test_gradients_reach_touched_rows_only(tiny_spec, deepseek_vocab):
    module = make(tiny_spec)
    hidden, rows = inputs(tiny_spec, deepseek_vocab)
    module(hidden, rows).square().sum().backward()
    touched = torch.zeros(module.table.num_embeddings, dtype=torch.bool)
    touched[(rows + module.offsets).flatten()] = True
    has_grad = module.table.weight.grad.abs().sum(-1) > 0
    assert torch.equal(has_grad, touched)
    assert all(p.grad is not None for p in module.parameters())


def test_deterministic_for_a_fixed_seed(tiny_spec, deepseek_vocab):
    hidden, rows = inputs(tiny_spec, deepseek_vocab)
    assert torch.equal(make(tiny_spec, seed=5)(hidden, rows), make(tiny_spec, seed=5)(hidden, rows))
    assert not torch.equal(
        make(tiny_spec, seed=5)(hidden, rows), make(tiny_spec, seed=6)(hidden, rows)
    )


def test_accounting(tiny_spec):
    module = make(tiny_spec, M=4, d=32)
    D, d, rows = tiny_spec.d_mem, 32, tiny_spec.layer_rows(tiny_spec.layer_ids[0])
    assert module.table_params == rows * tiny_spec.row_dim
    dense = (D * d + d) + (D * 4 * d + 4 * d) + 2 * 4 * d + (4 * d + 4 * d * 4)
    assert module.dense_params == dense
    assert module.table_params + module.dense_params == sum(p.numel() for p in module.parameters())
    assert module.active_params_per_token == D + dense
    assert module.flops_per_token() == 2 * D * d * 5 + 2 * 4 * d + 2 * 4 * d * 4
    assert make(tiny_spec, gate=False, conv=False).flops_per_token() == 2 * D * d


def test_bad_inputs(tiny_spec, deepseek_vocab):
    module = make(tiny_spec, M=4)
    hidden, rows = inputs(tiny_spec, deepseek_vocab)
    with pytest.raises(ValueError, match="only accepted for M = 1"):
        module(hidden[:, :, 0], rows)
    with pytest.raises(ValueError, match=r"hidden must be \[B, T, 4, 32\]"):
        module(hidden[..., :16], rows)
    with pytest.raises(ValueError, match="rows must be int"):
        module(hidden, rows[..., :2])
    with pytest.raises(ValueError, match="rows must be int"):
        module(hidden, rows.float())
    with pytest.raises(ValueError, match="hidden_size=0"):
        make(tiny_spec, d=0)
    with pytest.raises(ValueError, match="has no Engram"):
        Engram(tiny_spec, 7, EngramConfig(hidden_size=8))


def test_bf16_forward_and_backward(tiny_spec, deepseek_vocab):
    """bf16 computes what fp32 does, to bf16's precision, forward and backward."""
    full = make(tiny_spec)
    randomise_conv(full)
    half = make(tiny_spec)
    half.load_state_dict(full.state_dict())
    half.to(torch.bfloat16)
    hidden, rows = inputs(tiny_spec, deepseek_vocab)
    weight = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(3))
    y, y16 = full(hidden, rows), half(hidden.bfloat16(), rows)
    assert y16.dtype == torch.bfloat16
    (y * weight).sum().backward()
    (y16.float() * weight).sum().backward()
    # bf16 keeps 8 bits of mantissa: about 0.4% per rounding, a few roundings deep.
    assert (y16.float() - y).norm() < 0.03 * y.norm()
    for (name, p), p16 in zip(full.named_parameters(), half.parameters(), strict=True):
        assert p16.grad is not None and p16.grad.dtype == torch.bfloat16, name
        g, g16 = p.grad.flatten(), p16.grad.float().flatten()
        assert torch.isfinite(g16).all(), name
        cosine = torch.dot(g, g16) / (g.norm() * g16.norm() + 1e-30)
        assert g.norm() == 0 or cosine > 0.99, (name, float(cosine))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tiny_spec, deepseek_vocab):
    module = make(tiny_spec)
    randomise_conv(module)
    hidden, rows = inputs(tiny_spec, deepseek_vocab)
    cpu = module(hidden, rows)
    gpu = module.cuda()(hidden.cuda(), rows.cuda())
    diff = (gpu.cpu() - cpu).abs()
    # TF32 is off by default for fp32 matmuls in torch; remaining differences are reduction order.
    assert diff.max() < 1e-4, f"max {diff.max():.2e} mean {diff.mean():.2e}"
