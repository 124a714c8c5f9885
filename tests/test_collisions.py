"""The collision study: rebuilt N-grams agree with the hasher, the statistics are sound, reports."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from engram.assembly import evaluate
from engram.cli import train_config
from engram.data import build_shard, stdlib_files
from engram.experiments.collisions import (
    BUCKETS,
    analyse,
    frequency_buckets,
    hash_stream,
    load_subject,
    ngram_keys,
    ngram_shifts,
    rows_by_key,
    run_collisions,
    uniform_collision_share,
    uniform_utilisation,
)
from engram.inference.load import load_trained
from engram.spec import SpecConfig
from engram.train import train

# Tables of ~31 rows against thousands of distinct N-grams: collisions are certain. Two layers so
# that per-layer primes and multipliers are exercised.
TINY = SpecConfig(
    tokenizer="bpe:400",
    layer_ids=(0, 1),
    orders=(2, 3),
    heads_per_order=2,
    base_sizes=(31, 37),
    row_dim=4,
)
N_TOKENS = 6000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    # 30 stdlib files cut into 4,000-character documents: ~200 of them, so the validation split
    # (5% of the documents) holds ~9 documents and ~15k tokens, with EOS boundaries inside.
    folder = tmp_path_factory.mktemp("corpus")
    for i, path in enumerate(stdlib_files(max_files=30)):
        text = path.read_text(encoding="utf-8")
        for j in range(0, len(text), 4000):
            (folder / f"{i:03d}-{j:07d}-{path.stem}.txt").write_text(text[j : j + 4000])
    return folder


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def _subject(corpus, **changes):
    return load_subject(data=str(corpus), tokenizer="bpe:400", spec=replace(TINY, **changes))


def _tokens(subject) -> np.ndarray:
    tokens = build_shard(subject.data, "val", subject.tok).tokens[:N_TOKENS]
    return np.asarray(tokens, dtype=np.int64)


@pytest.fixture(scope="module")
def subject(corpus, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # module scope: the autouse fixture is not active
        mp.setenv("ENGRAM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        return _subject(corpus)


@pytest.fixture(scope="module")
def tokens(subject, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        return _tokens(subject)


def test_chunked_hashing_equals_whole_stream(subject, tokens):
    assert (tokens == subject.tok.eos_id).sum() >= 1  # document boundaries inside the stream
    whole = subject.hasher(torch.from_numpy(tokens)[None])
    for chunk in (97, 4096):
        chunked = hash_stream(subject.hasher, tokens, chunk=chunk)
        for layer, rows in whole.items():
            np.testing.assert_array_equal(chunked[layer], rows[0].numpy())
    one_by_one = hash_stream(subject.hasher, tokens[:300], chunk=1)
    for layer, rows in whole.items():
        np.testing.assert_array_equal(one_by_one[layer], rows[0, :300].numpy())
    with pytest.raises(ValueError, match="chunk=0"):
        hash_stream(subject.hasher, tokens, chunk=0)


@pytest.mark.parametrize("boundaries", [True, False])
def test_rebuilt_ngrams_reproduce_the_hasher(corpus, boundaries):
    # The published mix (XOR of s_j * m_j, then mod p) applied to the numpy-rebuilt shifts must
    # give the hasher's rows exactly: so the shifts are the N-grams the hasher addresses.
    subject = _subject(corpus, doc_boundaries=boundaries)
    spec, tokens = subject.hasher.spec, _tokens(subject)
    rows = hash_stream(subject.hasher, tokens)
    canon = subject.hasher.canonicalize(torch.from_numpy(tokens)[None])[0].numpy()
    shifts = ngram_shifts(tokens, canon, spec)  # [K, N]
    for layer in spec.layer_ids:
        m, primes = spec.layer_multipliers(layer), spec.layer_primes(layer)
        for oi, order in enumerate(spec.orders):
            mix = np.bitwise_xor.reduce([shifts[j] * m[j] for j in range(order)])
            for k in range(spec.config.heads_per_order):
                h = oi * spec.config.heads_per_order + k
                np.testing.assert_array_equal(mix % primes[h], rows[layer][:, h])


def test_every_ngram_maps_to_one_row_per_head(subject, tokens):
    spec = subject.hasher.spec
    rows = hash_stream(subject.hasher, tokens)
    canon = subject.hasher.canonicalize(torch.from_numpy(tokens)[None])[0].numpy()
    shifts = ngram_shifts(tokens, canon, spec)
    k = spec.config.heads_per_order
    for oi, order in enumerate(spec.orders):
        keys, num_keys = ngram_keys(shifts, order, spec.compressed_vocab_size)
        for layer in spec.layer_ids:
            for h in range(oi * k, (oi + 1) * k):  # this order's heads
                rows_by_key(keys, rows[layer][:, h], num_keys)  # raises on a key with two rows
    broken = rows[spec.layer_ids[0]][:, -1].copy()  # the last head: an order-3 head, like `keys`
    frequent = int(np.bincount(keys).argmax())  # an N-gram seen more than once
    broken[np.flatnonzero(keys == frequent)[-1]] += 1
    with pytest.raises(RuntimeError, match="disagree with the hasher"):
        rows_by_key(keys, broken, num_keys)


def test_ngram_keys_identify_tuples(subject, tokens):
    spec = subject.hasher.spec
    canon = subject.hasher.canonicalize(torch.from_numpy(tokens)[None])[0].numpy()
    shifts = ngram_shifts(tokens, canon, spec)
    for order in spec.orders:
        keys, num_keys = ngram_keys(shifts, order, spec.compressed_vocab_size)
        tuples = [tuple(col) for col in shifts[:order].T.tolist()]
        ids: dict[tuple, int] = {}
        expected = np.array([ids.setdefault(t, len(ids)) for t in tuples])
        assert num_keys == len(ids)
        # Same partition of positions (the numbering itself may differ).
        assert len(set(zip(keys.tolist(), expected.tolist(), strict=True))) == num_keys
        # The axis=0 path (for vocabularies whose N-grams overflow one int64) agrees.
        wide, wide_num = ngram_keys(shifts, order, 2**40)
        assert wide_num == num_keys
        np.testing.assert_array_equal(wide, keys)
    with pytest.raises(ValueError, match="order=4"):
        ngram_keys(shifts, 4, spec.compressed_vocab_size)


def _head_by_hand(keys: np.ndarray, rows: np.ndarray) -> tuple[int, float]:
    """Distinct rows and collision share of one head, counted with plain dicts."""
    row_of = dict(zip(keys.tolist(), rows.tolist(), strict=True))
    per_row: dict[int, int] = {}
    for r in row_of.values():
        per_row[r] = per_row.get(r, 0) + 1
    shared = sum(per_row[r] > 1 for r in row_of.values())
    return len(per_row), shared / len(row_of)


def test_statistics_are_bounded_and_match_a_hand_count(subject, tokens):
    result = analyse(tokens, subject.hasher)
    spec = subject.hasher.spec
    assert len(result["heads"]) == len(spec.layer_ids) * spec.heads_total
    for head in result["heads"]:
        assert 0 <= head["collision_share"] <= 1 and 0 <= head["collided_lookups"] <= 1
        assert head["distinct_rows"] <= head["prime"] and head["utilisation"] <= 1
        assert head["distinct_rows"] <= head["distinct_ngrams"]
        assert head["distinct_ngrams"] > head["prime"] and head["collision_share"] > 0.5
    # One head recounted independently of the module's vectorised code.
    rows = hash_stream(subject.hasher, tokens)
    canon = subject.hasher.canonicalize(torch.from_numpy(tokens)[None])[0].numpy()
    keys, _ = ngram_keys(ngram_shifts(tokens, canon, spec), 3, spec.compressed_vocab_size)
    head = next(h for h in result["heads"] if (h["layer"], h["order"], h["head"]) == (1, 3, 1))
    distinct, share = _head_by_hand(keys, rows[1][:, 3])
    assert head["distinct_rows"] == distinct
    assert head["collision_share"] == pytest.approx(share, abs=1e-12)
    for order in result["orders"]:
        assert 0 <= order["all_heads_collide"] <= order["collision_share_max"] <= 1


def test_frequency_buckets_cover_every_position(subject, tokens):
    result = analyse(tokens, subject.hasher)
    for order in subject.hasher.spec.orders:
        rows = result["buckets"][str(order)]
        assert [r["bucket"] for r in rows] == ["1", "2-9", "10-99", "100-999", ">=1000"]
        assert sum(r["positions"] for r in rows) == len(tokens)
        summary = next(o for o in result["orders"] if o["order"] == order)
        assert sum(r["distinct_ngrams"] for r in rows) == summary["distinct_ngrams"]
        assert rows[0]["positions"] == rows[0]["distinct_ngrams"]  # seen once: one each
        assert "loss_engram_on" not in rows[0]
    keys = np.array([0] * 1000 + [1] * 10 + [2] * 9 + [3])
    freq, bucket = frequency_buckets(keys)
    assert [int(freq[i]) for i in (0, 1000, 1010, 1019)] == [1000, 10, 9, 1]
    assert [int(bucket[i]) for i in (0, 1000, 1010, 1019)] == [4, 2, 1, 0]
    assert len(BUCKETS) == 5


def test_uniform_expectation():
    assert uniform_collision_share(1, 31) == 0.0 and uniform_utilisation(0, 31) == 0.0
    assert uniform_collision_share(100, 1) == 1.0 and uniform_utilisation(5, 1) == 1.0
    # Larger tables, fewer collisions; more N-grams, more collisions.
    shares = [uniform_collision_share(1000, p) for p in (101, 1009, 10007, 100003)]
    assert shares == sorted(shares, reverse=True) and 0 < shares[-1] < shares[0] < 1
    assert uniform_collision_share(2000, 1009) > uniform_collision_share(1000, 1009)
    assert uniform_collision_share(2, 7) == pytest.approx(1 / 7)  # the other key hits my row
    # A simulated random function: 400 trials of 200 keys into 101 rows. The share's standard
    # error is about 0.002 here, so 0.01 is a 5-sigma tolerance.
    rng = np.random.default_rng(0)
    sims, used = [], []
    for _ in range(400):
        rows = rng.integers(0, 101, size=200)
        counts = np.bincount(rows, minlength=101)
        sims.append(float((counts[rows] > 1).mean()))
        used.append(float((counts > 0).mean()))
    assert np.mean(sims) == pytest.approx(uniform_collision_share(200, 101), abs=0.01)
    assert np.mean(used) == pytest.approx(uniform_utilisation(200, 101), abs=0.01)
    with pytest.raises(ValueError, match="prime=0"):
        uniform_collision_share(10, 0)


def test_run_collisions_writes_the_report(corpus, tmp_path):
    out = tmp_path / "report"
    report = run_collisions(
        data=str(corpus), tokenizer="bpe:400", spec=TINY, max_tokens=N_TOKENS, out_dir=out
    )
    assert report["config"]["tokens"] == N_TOKENS and report["loss"] is None
    for name in ("report.json", "report.md"):
        assert (out / name).is_file(), name
    pytest.importorskip("matplotlib")
    assert (out / "collisions.png").stat().st_size > 0
    saved = json.loads((out / "report.json").read_text())
    assert saved["orders"] == report["orders"] and saved["spec_digest"] == report["spec_digest"]
    assert "## Per head" in (out / "report.md").read_text()
    with pytest.raises(ValueError, match="max_tokens=1"):
        run_collisions(data=str(corpus), tokenizer="bpe:400", spec=TINY, max_tokens=1, out_dir=out)


@pytest.fixture
def one_thread():
    # A model this small gains nothing from intra-op threads, and when another process holds a
    # core, OpenMP's spinning threads make each tiny matmul up to ~20x slower (measured: 30 s vs
    # 5 s for this test on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_checkpoint_losses_per_bucket(corpus, tmp_path, one_thread):
    run = tmp_path / "run"
    overrides = ["tokenizer=bpe:400", "seq_len=32", "batch_size=4", "steps=2", "eval_every=2"]
    config = train_config(
        None, [f"data={corpus}", f"out_dir={run}", "eval_tokens=256", "progress=false", *overrides]
    )
    train(config)
    report = run_collisions(ckpt=run, max_tokens=1024, out_dir=tmp_path / "report")
    assert report["config"]["tokenizer"] == "bpe:400"
    for rows in report["buckets"].values():
        filled = [r for r in rows if r["scored"] > 0]
        assert filled and sum(r["scored"] for r in rows) == report["loss"]["scored"]
        for r in filled:
            assert math.isfinite(r["loss_engram_on"]) and math.isfinite(r["loss_engram_off"])
            assert r["engram_gain"] == pytest.approx(r["loss_engram_off"] - r["loss_engram_on"])
    # The per-token losses average to what `evaluate` reports on the same tokens. Both sum the
    # same fp32 cross-entropies, in a different order: 1e-5 covers the rounding.
    loaded = load_trained(run, device="cpu")
    model, tok, trained = loaded.model, loaded.tokenizer, loaded.config
    tokens = np.asarray(build_shard(trained.data, "val", tok).tokens[:1024], dtype=np.int64)
    cfg = replace(trained, eval_tokens=1024)
    for key, off in (("engram_on", False), ("engram_off", True)):
        expected = evaluate(model, tokens, cfg, torch.device("cpu"), engram_off=off)
        assert report["loss"][key] == pytest.approx(expected, abs=1e-5)
    assert "Engram on" in (tmp_path / "report" / "report.md").read_text()
    with pytest.raises(ValueError, match="must be None with ckpt"):
        run_collisions(ckpt=run, tokenizer="bpe:400", out_dir=tmp_path / "x")


def test_cli(corpus, tmp_path):
    from engram.cli import main

    out = tmp_path / "cli"
    argv = ["study", "collisions", "--data", str(corpus), "--max-tokens", "3000", "--out", str(out)]
    assert main(argv) == 0
    assert json.loads((out / "report.json").read_text())["config"]["tokens"] == 3000
    assert main(["study", "collisions", "--data", str(corpus), "--max-tokens", "1"]) == 2
