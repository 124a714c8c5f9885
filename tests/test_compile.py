"""`torch.compile` of the hasher and the Engram module: no graph breaks, and the eager results.

Breaks are counted with `torch._dynamo.explain`, which traces with Dynamo only (no code is
generated), so the counts are cheap. Outputs and gradients are then compared with a real
`torch.compile(fullgraph=True)` (Inductor, on the CPU): shapes are tiny to keep compiles short.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch._dynamo

from engram.hashing import NgramHasher
from engram.model import EngramLM, model_preset
from engram.module import Engram, EngramConfig
from engram.spec import HashSpec, resolve
from engram.vocab import CompressedVocab


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Every test compiles from scratch: no cached graph (or recompile limit) leaks between."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def graph_breaks(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, list[str]]:
    """How many graph breaks Dynamo makes in `fn(*args, **kwargs)`, and why (first lines)."""
    explained = torch._dynamo.explain(fn)(*args, **kwargs)
    return explained.graph_break_count, [
        str(b.reason).split("\n")[0] for b in explained.break_reasons
    ]


def ids_with_boundaries(vocab_size: int, eos_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [2, 24] with an EOS inside row 0 (when there is one), and doc starts [2, 24]."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(vocab_size, 5000), (2, 24), generator=gen)
    if eos_id is not None:
        ids[0, 9] = eos_id
    doc_starts = torch.zeros(2, 24, dtype=torch.bool)
    doc_starts[1, 13] = True
    return ids, doc_starts


@pytest.mark.parametrize("doc_boundaries", [True, False], ids=["eos", "no-eos"])
@pytest.mark.parametrize("with_starts", [False, True], ids=["", "doc-starts"])
def test_hasher_compiles_whole_and_bit_exact(deepseek, deepseek_vocab, doc_boundaries, with_starts):
    spec = resolve("tiny", tokenizer=deepseek, vocab=deepseek_vocab, doc_boundaries=doc_boundaries)
    assert (spec.eos_id is not None) == doc_boundaries
    hasher = NgramHasher(spec, deepseek_vocab)
    ids, doc_starts = ids_with_boundaries(spec.vocab_size, spec.eos_id)
    kwargs = {"doc_starts": doc_starts} if with_starts else {}

    for fn in (hasher, hasher.hash_stacked):
        count, reasons = graph_breaks(fn, ids, **kwargs)
        assert count == 0, reasons

    # Integer arithmetic only: compiled rows must equal eager ones bit for bit.
    compiled = torch.compile(hasher, fullgraph=True)(ids, **kwargs)
    for layer, want in hasher(ids, **kwargs).items():
        assert torch.equal(compiled[layer], want), f"layer {layer} differs"


def test_compiled_hasher_with_large_primes_takes_reciprocal_remainders(deepseek, deepseek_vocab):
    """Primes >= 2^12 (every preset but `tiny`) switch the compiled hasher to float-quotient
    remainders: rows still equal eager ones bit for bit, for a chunk and a decode step."""
    spec = resolve("tiny", tokenizer=deepseek, vocab=deepseek_vocab, base_sizes=(14759, 14759))
    hasher = NgramHasher(spec, deepseek_vocab)
    assert hasher._reciprocal_ok and not NgramHasher(resolve("tiny"), deepseek_vocab)._reciprocal_ok
    ids, doc_starts = ids_with_boundaries(spec.vocab_size, spec.eos_id)
    compiled = torch.compile(hasher.hash_stacked, fullgraph=True)
    rows, state = compiled(ids, doc_starts=doc_starts)
    want, want_state = hasher.hash_stacked(ids, doc_starts=doc_starts)
    assert torch.equal(rows, want) and torch.equal(state.history, want_state.history)
    step = compiled(ids[:, :1], state=want_state)[0]  # the fused one-token path
    assert torch.equal(step, hasher.hash_stacked(ids[:, :1], state=want_state)[0])


def test_compiled_hasher_still_checks_dtype_and_shape(tiny_spec, deepseek_vocab):
    """Under compile only the value range check (a data-dependent read) is skipped."""
    hasher = torch.compile(NgramHasher(tiny_spec, deepseek_vocab))
    with pytest.raises(ValueError, match="must have shape"):
        hasher(torch.zeros(2, 3, 4, dtype=torch.int64))


def engram_case(
    spec: HashSpec, vocab: CompressedVocab, M: int
) -> tuple[Engram, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A module with a random conv (so its gradient is not trivially zero), hidden ([B, T, d]
    for M = 1, else [B, T, M, d]), rows [B, T, H] and document starts [B, T]."""
    torch.manual_seed(0)
    module = Engram(spec, spec.layer_ids[0], EngramConfig(hidden_size=16, num_branches=M))
    with torch.no_grad():
        module.conv.conv.weight.normal_(std=0.3)
    ids, _ = ids_with_boundaries(spec.vocab_size, spec.eos_id)
    rows = NgramHasher(spec, vocab)(ids)[spec.layer_ids[0]]
    hidden = torch.randn(2, 24, M, 16)
    starts = torch.zeros(2, 24, dtype=torch.bool)
    starts[0, 10] = starts[1, 3] = True  # documents starting inside the window: masked taps
    return module, (hidden[:, :, 0] if M == 1 else hidden), rows, starts


def forward_backward(
    fn: Callable[..., torch.Tensor],
    module: Engram,
    hidden: torch.Tensor,
    rows: torch.Tensor,
    starts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor | None]]:
    """Output of `fn` (the module, compiled or not), and the gradients of the input, the dense
    weights and the table."""
    module.zero_grad(set_to_none=True)
    hidden = hidden.clone().requires_grad_()
    y = fn(hidden, rows, starts)
    # A fixed random weighting, so every output element reaches the gradients differently.
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    return y.detach(), hidden.grad, grads


@pytest.mark.parametrize("M", [1, 2])
def test_engram_compiles_whole_and_matches_eager(tiny_spec, deepseek_vocab, M):
    module, hidden, rows, starts = engram_case(tiny_spec, deepseek_vocab, M)
    # Also the chunked-decoding inputs: leading pads [B] and the conv window [B, R, M, d].
    pads, window = torch.tensor([0, 5]), torch.zeros(2, module.conv.receptive, M, 16)
    for args in ((hidden, rows, starts), (hidden, rows), (hidden, rows, starts, pads, window)):
        count, reasons = graph_breaks(module, *args)
        assert count == 0, reasons

    want = forward_backward(module, module, hidden, rows, starts)
    got = forward_backward(torch.compile(module, fullgraph=True), module, hidden, rows, starts)
    # fp32; Inductor fuses the norms, the gate and the conv taps, so sums run in another order:
    # rounding only, ~2e-7 relative (the weights' gradients, sums over B*T tokens, reach 30, so
    # their absolute error reaches 6e-6): rtol and atol 1e-5 leave room for other CPUs.
    pairs = [("y", got[0], want[0]), ("hidden.grad", got[1], want[1])]
    pairs += [(name, got[2][name], grad) for name, grad in want[2].items()]
    assert "table.weight" in want[2] and "value_proj.weight" in want[2]
    for name, g, w in pairs:
        assert g is not None and w is not None, name
        diff = (g - w).abs()
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-5), (
            f"{name}: max {diff.max():.2e} mean {diff.mean():.2e}"
        )


@pytest.mark.parametrize("hashes_itself", [False, True], ids=["rows-given", "model-hashes"])
def test_the_lm_without_moe_compiles_whole(deepseek, deepseek_vocab, hashes_itself):
    """The whole tiny LM with Engram (dense FFNs) traces without a break, hashing included.
    With its MoE it breaks where the dispatch reads the experts' loads to the host (a measured
    14 for the tiny preset, outside Engram's code)."""
    config = model_preset("tiny").with_(moe=None)
    spec = resolve(config.engram.spec, tokenizer=deepseek, vocab=deepseek_vocab)
    model = EngramLM(
        config.with_(vocab_size=spec.vocab_size), spec, NgramHasher(spec, deepseek_vocab)
    )
    ids, _ = ids_with_boundaries(spec.vocab_size, spec.eos_id)
    rows = None if hashes_itself else model.hash(ids)
    count, reasons = graph_breaks(model, ids, rows=rows, targets=ids)
    assert count == 0, reasons
