"""The torch hasher against numpy references of the published algorithm: bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import reference_rows

from engram.hashing import (
    RECIPROCAL_MIN_PRIME,
    NgramHasher,
    reduce_near,
    remainder_by_reciprocal,
)
from engram.spec import resolve
from engram.tokenizer import train_bpe
from engram.vocab import compress

GOLDEN = Path(__file__).parent / "golden"
EXAMPLE = "Only Alexander the Great could tame the horse Bucephalus."


def eos_starts(ids, eos):
    starts = np.zeros(ids.shape, dtype=bool)
    starts[:, 1:] = ids[:, :-1].numpy() == eos
    return starts


def assert_rows_equal(got, want):
    for layer, rows in want.items():
        g = got[layer].cpu().numpy()
        assert g.shape == rows.shape, (layer, g.shape, rows.shape)
        mismatch = int((g != rows).sum())
        assert mismatch == 0, f"layer {layer}: {mismatch} of {rows.size} rows differ"


@pytest.fixture(scope="module")
def demo_hasher(demo_spec, deepseek_vocab):
    return NgramHasher(demo_spec, deepseek_vocab)


@pytest.fixture(scope="module")
def tiny_hasher(tiny_spec, deepseek_vocab):
    return NgramHasher(tiny_spec, deepseek_vocab)


def test_demo_v1_matches_demo_algorithm_on_random_ids(demo_hasher, demo_spec, deepseek_vocab):
    ids = torch.randint(
        0, demo_spec.vocab_size, (3, 257), generator=torch.Generator().manual_seed(0)
    )
    assert_rows_equal(demo_hasher(ids), reference_rows(demo_spec, deepseek_vocab, ids))


def test_demo_v1_golden_example(demo_hasher, deepseek):
    golden = json.loads((GOLDEN / "hash-demo-v1.json").read_text())
    ids = torch.tensor([deepseek.encode(EXAMPLE)])
    assert ids[0].tolist() == golden["ids"]
    assert demo_hasher.canonicalize(ids)[0].tolist() == golden["compressed_ids"]
    rows = demo_hasher(ids)
    for layer, want in golden["layers"].items():
        assert rows[int(layer)][0].tolist() == want


def test_rows_lie_in_each_heads_range(demo_hasher, demo_spec):
    ids = torch.randint(0, demo_spec.vocab_size, (2, 500))
    for layer, rows in demo_hasher(ids).items():
        primes = torch.tensor(demo_spec.layer_primes(layer))
        assert rows.dtype == torch.int64 and rows.shape == (2, 500, demo_spec.heads_total)
        assert bool((rows >= 0).all()) and bool((rows < primes).all())


def test_int32_input_gives_the_same_rows(tiny_hasher, tiny_spec):
    ids = torch.randint(0, tiny_spec.vocab_size, (2, 40))
    a, b = tiny_hasher(ids), tiny_hasher(ids.int())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_ngram_crosses_an_eos(tiny_hasher, tiny_spec, deepseek_vocab):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 2000, (3, 60), generator=gen)
    ids[0, 10] = ids[0, 11] = ids[1, 30] = ids[2, 59] = 1  # EOS, including back to back
    want = reference_rows(tiny_spec, deepseek_vocab, ids, eos_starts(ids, 1))
    assert_rows_equal(tiny_hasher(ids), want)
    # The token after an EOS hashes like a sequence start: same rows as at position 0.
    fresh = tiny_hasher(ids[:, 31:33].clone())
    after = tiny_hasher(ids)
    assert torch.equal(after[0][1, 31:33], fresh[0][1])


def test_explicit_document_starts(tiny_hasher, tiny_spec, deepseek_vocab):
    ids = torch.randint(3, 2000, (2, 40))
    starts = torch.zeros(2, 40, dtype=torch.bool)
    starts[0, 7] = starts[1, 1] = starts[1, 2] = True
    want = reference_rows(tiny_spec, deepseek_vocab, ids, starts.numpy())
    assert_rows_equal(tiny_hasher(ids, doc_starts=starts), want)


def test_boundaries_off_lets_ngrams_cross(demo_hasher, demo_spec, deepseek_vocab):
    ids = torch.randint(3, 2000, (1, 30))
    ids[0, 5] = 1
    assert_rows_equal(demo_hasher(ids), reference_rows(demo_spec, deepseek_vocab, ids))


@pytest.mark.parametrize("chunks", [[1] * 37, [5, 1, 13, 2, 16], [37], [36, 1]])
@pytest.mark.parametrize("preset", ["tiny", "demo-v1"])
def test_incremental_hashing_equals_full(chunks, preset, deepseek, deepseek_vocab):
    spec = resolve(preset, tokenizer=deepseek, vocab=deepseek_vocab)
    hasher = NgramHasher(spec, deepseek_vocab)
    ids = torch.randint(3, 5000, (3, 37), generator=torch.Generator().manual_seed(2))
    ids[0, 4] = ids[1, 20] = ids[2, 36] = ids[0, 5] = 1
    full = hasher(ids)
    state, pos, parts = hasher.initial_state(3), 0, []
    for size in chunks:
        rows, state = hasher.step(ids[:, pos : pos + size], state)
        parts.append(rows)
        pos += size
    for layer in spec.layer_ids:
        assert torch.equal(torch.cat([p[layer] for p in parts], dim=1), full[layer])


def test_incremental_with_explicit_starts(tiny_hasher):
    ids = torch.randint(3, 5000, (2, 20))
    starts = torch.zeros(2, 20, dtype=torch.bool)
    starts[0, 10] = starts[1, 3] = True
    full = tiny_hasher(ids, doc_starts=starts)
    state, parts = tiny_hasher.initial_state(2), []
    for t in range(20):
        rows, state = tiny_hasher.step(ids[:, t : t + 1], state, doc_starts=starts[:, t : t + 1])
        parts.append(rows[0])
    assert torch.equal(torch.cat(parts, dim=1), full[0])


def test_state_reset_starts_a_new_document(tiny_hasher):
    ids = torch.randint(3, 5000, (2, 6))
    _, state = tiny_hasher.step(ids, tiny_hasher.initial_state(2))
    state.reset(torch.tensor([True, False]))
    nxt = torch.randint(3, 5000, (2, 3))
    rows, _ = tiny_hasher.step(nxt, state)
    assert torch.equal(rows[0][0], tiny_hasher(nxt[:1])[0][0])
    assert torch.equal(rows[0][1], tiny_hasher(torch.cat([ids, nxt], 1)[1:])[0][0, 6:])


def test_four_gram_orders(deepseek, deepseek_vocab):
    spec = resolve(
        "tiny",
        tokenizer=deepseek,
        vocab=deepseek_vocab,
        orders=(2, 3, 4),
        base_sizes=(1009, 1013, 1019),
    )
    hasher = NgramHasher(spec, deepseek_vocab)
    ids = torch.randint(3, 5000, (2, 25))
    ids[1, 12] = 1
    want = reference_rows(spec, deepseek_vocab, ids, eos_starts(ids, 1))
    assert_rows_equal(hasher(ids), want)


def test_orders_without_bigrams(deepseek, deepseek_vocab):
    spec = resolve(
        "tiny",
        tokenizer=deepseek,
        vocab=deepseek_vocab,
        orders=(3,),
        base_sizes=(1009,),
        doc_boundaries=False,
    )
    ids = torch.randint(3, 5000, (2, 25))
    assert_rows_equal(
        NgramHasher(spec, deepseek_vocab)(ids), reference_rows(spec, deepseek_vocab, ids)
    )


def test_small_bpe_tokenizer_end_to_end():
    tok = train_bpe(["def f(x):\n    return x\n"] * 40, vocab_size=280)
    vocab = compress(tok, use_cache=False)
    spec = resolve("tiny", tokenizer=tok, vocab=vocab, pad_id=tok.pad_id)
    ids = torch.tensor([[*tok.encode("def f(x):\n    return x\n"), tok.eos_id, *tok.encode("x")]])
    want = reference_rows(spec, vocab, ids, eos_starts(ids, tok.eos_id))
    assert_rows_equal(NgramHasher(spec, vocab)(ids), want)


@pytest.mark.parametrize(
    "ids, message",
    [
        (torch.tensor([[1, -1]]), "negative id"),
        (torch.tensor([[1, 129_280]]), "outside the tokenizer"),
        (torch.tensor([[1.0, 2.0]]), "integer dtype"),
        (torch.tensor([[True, False]]), "integer dtype"),
        (torch.tensor([1, 2]), r"shape \[B, T\]"),
        (torch.zeros(1, 2, 3, dtype=torch.long), r"shape \[B, T\]"),
        ([[1, 2]], "must be a torch.Tensor"),
    ],
)
def test_bad_ids_raise_clear_errors(tiny_hasher, ids, message):
    with pytest.raises(ValueError, match=message):
        tiny_hasher(ids)


def test_bad_doc_starts_and_state(tiny_hasher):
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="doc_starts must be a bool tensor"):
        tiny_hasher(ids, doc_starts=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="state holds"):
        tiny_hasher.step(ids, tiny_hasher.initial_state(3))


def test_vocab_of_another_tokenizer_is_refused(tiny_spec):
    other = compress(train_bpe(["abc abd"] * 20, vocab_size=260), use_cache=False)
    with pytest.raises(ValueError, match="not the one the spec was built with"):
        NgramHasher(tiny_spec, other)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(demo_hasher, demo_spec):
    ids = torch.randint(0, demo_spec.vocab_size, (4, 1024))
    cpu = demo_hasher(ids)
    gpu = demo_hasher(ids.cuda())
    for layer in demo_spec.layer_ids:
        assert gpu[layer].device.type == "cuda"
        assert torch.equal(gpu[layer].cpu(), cpu[layer])


# Divisors at both ends of what `remainder_by_reciprocal` takes, and near the demo's primes.
RECIPROCAL_PRIMES = [4099, 14759 + 2, 646403, 2**31 - 1, 2**61 - 1]


def reciprocal_cases(p: int) -> torch.Tensor:
    """int64 values where a float quotient is most likely off: the int64 extremes, both sides of
    multiples of p next to them and near zero, and random values."""
    lo, hi = -(2**63), 2**63 - 1
    near = [
        k * p + d
        for k in (lo // p, lo // p + 1, hi // p, hi // p - 1, -1, 0, 1)
        for d in (-1, 0, 1)
    ]
    edges = [v for v in [lo, lo + 1, hi, hi - 1, -1, 0, 1, p - 1, p, -p, *near] if lo <= v <= hi]
    gen = torch.Generator().manual_seed(p % 1000)
    rand = torch.randint(lo, hi, (20_000,), generator=gen)
    k = torch.randint(lo // p + 1, hi // p, (5_000, 1), generator=gen)  # random multiples of p,
    multiples = (k * p + torch.tensor([-1, 0, 1, p - 1])).flatten()  # their sides at every scale
    return torch.cat([torch.tensor(edges, dtype=torch.int64), rand, multiples])


@pytest.mark.parametrize("p", RECIPROCAL_PRIMES)
def test_remainder_by_reciprocal_is_exact(p):
    x = reciprocal_cases(p)
    want = torch.remainder(x, p)
    got = remainder_by_reciprocal(x, torch.tensor(p))
    assert torch.equal(got, want)
    # Broadcast over a head axis, as the hasher calls it.
    primes = torch.tensor([p, RECIPROCAL_MIN_PRIME + 3])[:, None]
    assert torch.equal(remainder_by_reciprocal(x[None], primes), torch.remainder(x[None], primes))


def test_a_quotient_off_by_two_is_still_corrected():
    """The corrections cover r in [-2p, 3p): a quotient two off (an approximate reciprocal)."""
    p = torch.tensor([[4099], [646403]])
    r = torch.cat([torch.arange(-2, 3)[:, None] * p.T + d for d in (-1, 0, 1)], dim=0).T
    r = r[(r >= -2 * p) & (r < 3 * p)].view(2, -1)
    assert torch.equal(reduce_near(r, p), torch.remainder(r, p))


def test_compiled_remainder_by_reciprocal_is_exact():
    """Compiled, the quotient's float ops run in Inductor's vector code: still exact."""
    p = torch.tensor(RECIPROCAL_PRIMES)[:, None]
    x = torch.stack([reciprocal_cases(int(q))[:5000] for q in RECIPROCAL_PRIMES])
    compiled = torch.compile(remainder_by_reciprocal, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(x, p), torch.remainder(x, p))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_reciprocal_remainders_and_compiled_hasher_match_cpu(demo_hasher, demo_spec):
    """On CUDA the float quotient runs in the GPU's float64 (eager and in a Triton kernel), and
    the compiled hasher takes it: the same bits as the CPU's integer remainders."""
    p = torch.tensor(RECIPROCAL_PRIMES)[:, None]
    x = torch.stack([reciprocal_cases(int(q))[:5000] for q in RECIPROCAL_PRIMES])
    want = torch.remainder(x, p)
    assert torch.equal(remainder_by_reciprocal(x.cuda(), p.cuda()).cpu(), want)
    compiled = torch.compile(remainder_by_reciprocal, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(x.cuda(), p.cuda()).cpu(), want)
    ids = torch.randint(0, demo_spec.vocab_size, (2, 256))
    rows, _ = torch.compile(demo_hasher.hash_stacked, fullgraph=True)(ids.cuda())
    assert torch.equal(rows.cpu(), demo_hasher.hash_stacked(ids)[0])
