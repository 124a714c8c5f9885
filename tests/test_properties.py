"""Property-based tests (Hypothesis): random inputs against a plain reference or a contract.

- The torch hasher equals the position-by-position reference for random ids, N-gram orders,
  heads, table sizes, EOS positions and chunkings of the same sequence (incremental state).
- The readers of configs and specs, fed random data, either return a value or raise ValueError
  (the user's error), never another exception (a bug).
- The command line, fed random argument lists, exits 0 or 2, never with a traceback.
- Compression maps a random vocabulary onto canonical ids, one per canonical key.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import reference_rows

from engram.cli import main
from engram.config import TrainConfig, apply_overrides, from_dict
from engram.hashing import NgramHasher
from engram.spec import HashSpec, SpecConfig, resolve
from engram.tokenizer import train_bpe
from engram.vocab import _normalizer, canonical_key, compress

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- the hasher -------------------------------------------------------------------------------
@st.composite
def specs(draw):
    orders = sorted(draw(st.sets(st.integers(2, 4), min_size=1, max_size=3)))
    return SpecConfig(
        tokenizer="small",
        layer_ids=(draw(st.integers(0, 3)),),
        orders=tuple(orders),
        heads_per_order=draw(st.integers(1, 3)),
        base_sizes=tuple(draw(st.integers(2, 5000)) for _ in orders),
        row_dim=4,
        seed=draw(st.integers(0, 2**31)),
    )


@st.composite
def sequences(draw, vocab_size: int, eos: int):
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 24))
    ids = draw(st.lists(st.integers(0, vocab_size - 1), min_size=B * T, max_size=B * T))
    ids = np.array(ids, dtype=np.int64).reshape(B, T)
    for b, t in draw(st.lists(st.tuples(st.integers(0, B - 1), st.integers(0, T - 1)))):
        ids[b, t] = eos  # documents end anywhere, several times
    cuts = sorted(draw(st.sets(st.integers(1, T - 1), max_size=4))) if T > 1 else []
    return torch.from_numpy(ids), cuts


@SETTINGS
@given(data=st.data())
def test_hasher_equals_the_reference_for_any_spec_ids_boundaries_and_chunks(small_tok, data):
    vocab = compress(small_tok)
    spec = resolve(data.draw(specs()), tokenizer=small_tok, vocab=vocab)
    hasher = NgramHasher(spec, vocab)
    ids, cuts = data.draw(sequences(small_tok.vocab_size, small_tok.eos_id))
    starts = np.zeros(ids.shape, dtype=bool)
    starts[:, 1:] = ids[:, :-1].numpy() == small_tok.eos_id  # no N-gram reaches past an EOS
    layer = spec.layer_ids[0]
    want = reference_rows(spec, vocab, ids, starts)[layer]
    assert np.array_equal(hasher(ids)[layer].numpy(), want)
    state, parts = hasher.initial_state(ids.shape[0]), []  # the same sequence, chunk by chunk
    for a, b in zip([0, *cuts], [*cuts, ids.shape[1]], strict=True):
        rows, state = hasher.step(ids[:, a:b], state)
        parts.append(rows[layer])
    assert np.array_equal(torch.cat(parts, dim=1).numpy(), want)


# ---- readers ------------------------------------------------------------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
KEYS = [
    "seq_len",
    "steps",
    "model.d_model",
    "model.moe",
    "optim.lr",
    "tables.placement",
    "parallel.dense",
    "model.engram.spec.base_sizes",
    "precision",
    "nope",
    "model.nope",
]


@SETTINGS
@given(
    data=st.dictionaries(
        st.sampled_from(["seq_len", "model", "optim", "tables", "steps", "parallel", "x"]),
        JSON,
        max_size=4,
    )
)
def test_config_from_random_data_is_a_config_or_a_value_error(data):
    with contextlib.suppress(ValueError):
        from_dict(TrainConfig, data).validate()


@SETTINGS
@given(st.dictionaries(st.sampled_from(KEYS), st.text(max_size=12) | JSON, max_size=3))
def test_random_overrides_are_applied_or_refused_with_a_value_error(overrides):
    with contextlib.suppress(ValueError):
        apply_overrides(TrainConfig(), overrides).validate()


@SETTINGS
@given(JSON)
def test_a_spec_from_random_json_is_a_spec_or_a_value_error(data):
    with contextlib.suppress(ValueError):
        HashSpec.from_json(json.dumps(data))


# ---- the command line ----------------------------------------------------------------------------
WORDS = [
    "spec",
    "hash",
    "plan",
    "vocab",
    "--preset",
    "tiny",
    "demo-v1",
    "nope",
    "--json",
    "--set",
    "seed=1",
    "seed=x",
    "layer_ids=1,4",
    "--ids",
    "5,6,7",
    "1,-2",
    "--text",
    "a b",
    "--rho",
    "0.8",
    "2",
    "-1",
    "--tokenizer",
    "--help-me",
    "",
    "=",
    "--",
]


@pytest.mark.filterwarnings("ignore")
@SETTINGS
@given(st.lists(st.sampled_from(WORDS), min_size=1, max_size=6))
def test_the_cli_on_random_arguments_exits_0_or_2_without_a_traceback(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own refusals of unknown words
            code = e.code
    assert code in (0, 2), (argv, code, err.getvalue()[-500:])
    assert "Traceback" not in err.getvalue()


# ---- compression of random vocabularies -----------------------------------------------------
TEXT = st.text(alphabet="aAbBéÉ  \t\n.,!?0123456789ßſﬁＡ", min_size=1, max_size=30)


@settings(max_examples=15, deadline=None)
@given(texts=st.lists(TEXT, min_size=1, max_size=12), size=st.integers(260, 400))
def test_compression_of_a_random_vocabulary_is_a_canonical_surjection(texts, size):
    """Every id maps to a canonical id in [0, size), every canonical id is used and numbered in
    order of first appearance, and two ids share one exactly when their canonical keys agree."""
    tok = train_bpe(texts * 3, vocab_size=size)
    vocab = compress(tok, use_cache=False)
    lookup = vocab.lookup
    assert lookup.shape == (tok.vocab_size,) and lookup.min() == 0
    assert set(lookup.tolist()) == set(range(vocab.size))  # onto [0, size)
    assert (lookup <= np.maximum.accumulate(np.r_[-1, lookup[:-1]]) + 1).all()  # first-seen order
    normalizer = _normalizer()
    keys = [canonical_key(tok, i, normalizer) for i in range(tok.vocab_size)]
    first: dict[str, int] = {}
    for token_id, key in enumerate(keys):
        assert lookup[token_id] == lookup[first.setdefault(key, token_id)]
    assert len(first) == vocab.size  # distinct keys, distinct canonical ids
