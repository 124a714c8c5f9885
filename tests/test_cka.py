"""`engram study cka`: the unbiased minibatch CKA estimator, the alignment index, the report."""

from __future__ import annotations

import json

import pytest
import torch

from engram.cli import main
from engram.experiments.cka import (
    HsicAccumulator,
    hsic1_matrix,
    linear_cka,
    shuffled_minibatches,
    soft_alignment,
)


def _features(n: int = 512, p: int = 16, q: int = 12, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """x [n, p] and y [n, q] sharing a linear signal, so that their CKA is well inside (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = x @ torch.randn(p, q, generator=g, dtype=torch.float64)
    return x, y + 2.0 * torch.randn(n, q, generator=g, dtype=torch.float64)


def _hsic1_gram(x: torch.Tensor, y: torch.Tensor) -> float:
    """Song et al. (2012), eq. 5, literally: n x n kernels with zeroed diagonals."""
    n = x.shape[0]
    k, l_ = x @ x.T, y @ y.T
    k.fill_diagonal_(0)
    l_.fill_diagonal_(0)
    one = torch.ones(n, dtype=x.dtype)
    value = (
        torch.trace(k @ l_)
        + (one @ k @ one) * (one @ l_ @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one @ k @ l_ @ one)
    )
    return float(value / (n * (n - 3)))


def _biased_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kornblith et al. (2019) linear CKA on centred features: the biased estimator."""
    x, y = x - x.mean(0), y - y.mean(0)
    return float((x.T @ y).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


# ---- the estimator -------------------------------------------------------------------------------
def test_feature_space_form_equals_the_gram_matrix_formula():
    x, y = _features(n=200)
    h = hsic1_matrix([x, y])
    for (i, a), (j, b) in [((0, x), (1, y)), ((0, x), (0, x)), ((1, y), (1, y))]:
        # Both are float64 sums of ~n^2 terms of similar size: 1e-9 relative is rounding only.
        assert float(h[i, j]) == pytest.approx(_hsic1_gram(a, b), rel=1e-9)
    assert torch.equal(h, h.T)
    # The cross form (R against S representations) is the off-diagonal block of the full one.
    torch.testing.assert_close(hsic1_matrix([x], [y, x]), h[0:1, [1, 0]], rtol=1e-12, atol=0)


def test_cka_of_a_representation_with_itself_is_one():
    x, _ = _features()
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x, minibatch=64) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 3.0 * x) == pytest.approx(1.0, abs=1e-12)


def test_invariant_to_orthogonal_transforms_scaling_and_translation():
    x, y = _features()
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(x.shape[1], x.shape[1], generator=g, dtype=torch.float64))
    base = linear_cka(x, y, minibatch=128)
    assert 0.2 < base < 0.9  # a non-trivial value, so the invariances below are not vacuous
    # float64 throughout: agreement to 1e-10 leaves room only for rounding.
    assert linear_cka(x @ q, y, minibatch=128) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x, 7.5 * y, minibatch=128) == pytest.approx(base, abs=1e-10)
    # HSIC_1 is exactly shift-invariant: why centring each minibatch changes nothing.
    assert linear_cka(x + 100.0, y - 3.0, minibatch=128) == pytest.approx(base, abs=1e-10)


def test_unbiased_estimator_is_near_zero_on_independent_features():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2048, 64, generator=g, dtype=torch.float64)
    y = torch.randn(2048, 64, generator=g, dtype=torch.float64)
    unbiased = linear_cka(x, y, minibatch=256)
    # Over 8 minibatches of 256 its spread is ~0.003 (seeds 0-4: all below 0.003); 0.02 is far out.
    assert abs(unbiased) < 0.02
    # The plain estimator on one such minibatch is pulled up to ~0.2 by p/n alone.
    assert _biased_cka(x[:256], y[:256]) > 0.15


def test_minibatch_accumulation_is_the_mean_of_per_batch_estimates():
    x, y = _features(n=600)
    parts = [(x[i : i + 150], y[i : i + 150]) for i in range(0, 600, 150)]
    forward, backward = HsicAccumulator(2), HsicAccumulator(2)
    for a, b in parts:
        forward.update([a, b])
    for a, b in reversed(parts):
        backward.update([a, b])
    expected = torch.stack([hsic1_matrix([a, b]) for a, b in parts]).mean(0)
    torch.testing.assert_close(forward.hsic(), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(backward.hsic(), expected, rtol=1e-12, atol=0)
    # CKA normalises the summed HSIC terms, not per batch: sum(h_xy) / sqrt(sum h_xx sum h_yy).
    e = expected
    assert float(forward.cka()[0, 1]) == pytest.approx(float(e[0, 1] / (e[0, 0] * e[1, 1]).sqrt()))
    # One minibatch holding every row is the full-sample estimator.
    whole = HsicAccumulator(2)
    whole.update([x, y])
    torch.testing.assert_close(whole.hsic(), hsic1_matrix([x, y]), rtol=0, atol=0)
    assert linear_cka(x, y, minibatch=600) == linear_cka(x, y)
    with pytest.raises(ValueError, match="no minibatch"):
        HsicAccumulator(2).cka()
    with pytest.raises(ValueError, match="n >= 4"):
        hsic1_matrix([x[:3], y[:3]])


def test_shuffled_minibatches_keep_rows_aligned():
    # Rows carry their token number; the second representation is 2x the first, so every
    # minibatch must pair each row with its own double.
    stream = [
        [torch.arange(b, b + n, dtype=torch.float64)[:, None], None] for b, n in ((0, 70), (70, 90))
    ]
    for feats in stream:
        feats[1] = 2.0 * feats[0]
    chunks = list(shuffled_minibatches(stream, size=32, seed=3))
    assert len(chunks) == 5  # 160 rows: 5 full minibatches, a remainder of 0
    seen = torch.cat([c[0] for c in chunks]).flatten()
    assert all(torch.equal(c[1], 2.0 * c[0]) for c in chunks)
    assert sorted(seen.tolist()) == list(range(160))  # each row exactly once
    assert not torch.equal(seen, torch.arange(160.0))  # and shuffled
    with pytest.raises(ValueError, match="minibatch size 3"):
        list(shuffled_minibatches(stream, size=3))


def test_soft_alignment_index():
    cka = torch.tensor([[0.1, 0.9, 0.5], [-0.2, -0.1, -0.3]])
    a, b = soft_alignment(cka, top_k=2)
    assert a["argmax"] == 1 and a["top"] == [1, 2]
    assert a["soft_index"] == pytest.approx((0.9 * 1 + 0.5 * 2) / 1.4)
    assert a["shift"] == pytest.approx(a["soft_index"])
    assert b["soft_index"] is None  # no positive similarity: no weights
    every = soft_alignment(cka, top_k=5)[0]  # fewer layers than k: all of them
    assert every["top"] == [1, 2, 0]
    assert every["soft_index"] == pytest.approx((0.1 * 0 + 0.9 * 1 + 0.5 * 2) / 1.5)
    with pytest.raises(ValueError, match="top_k=0"):
        soft_alignment(cka, top_k=0)


# ---- the study -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick(tmp_path_factory, stdlib_corpus):
    """One quick study through the CLI: trains the tiny Engram/baseline pair the tests share.

    Yields inside the patch, so every test of this module reads and writes that cache.
    """
    root = tmp_path_factory.mktemp("cka")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_CACHE_DIR", str(root / "cache"))
        corpus = stdlib_corpus(60)
        out = root / "quick"
        assert main(["study", "cka", "--quick", "--data", str(corpus), "--out", str(out)]) == 0
        yield {"root": root, "corpus": corpus, "out": out}


def test_quick_study_writes_the_report(quick):
    out = quick["out"]
    report = json.loads((out / "report.json").read_text())
    layers = report["models"]["engram"]["n_layers"] + 1  # the embedding is representation 0
    assert len(report["cka"]) == layers and len(report["cka"][0]) == layers
    assert report["self_cka_diagonal_max_error"] < 1e-12
    assert all(h > 0 for h in report["hsic_diagonal"])
    assert report["null_cka_max_abs"] < 0.05  # mismatched tokens: the estimator's noise only
    assert len(report["alignment"]) == layers
    assert report["tokens"] == report["minibatches"] * report["config"]["minibatch"]
    assert (out / "cka.png").stat().st_size > 1000
    text = (out / "report.md").read_text()
    assert "Paper:" in text and "Soft alignment index" in text


def test_a_model_against_itself(quick):
    engram = quick["out"] / "models" / "engram"
    out = quick["root"] / "self"
    argv = ["study", "cka", "--ckpt", str(engram), "--baseline-ckpt", str(engram)]
    argv += ["--data", str(quick["corpus"]), "--out", str(out), "--max-tokens", "2048"]
    assert main([*argv, "--minibatch", "128"]) == 0
    report = json.loads((out / "report.json").read_text())
    cka = torch.tensor(report["cka"])
    # Identical features on both sides: the cross matrix is the self-CKA matrix, diagonal 1.
    torch.testing.assert_close(cka.diagonal(), torch.ones(len(cka), dtype=cka.dtype))
    torch.testing.assert_close(cka, torch.tensor(report["self_cka_engram"]))
    assert [a["argmax"] for a in report["alignment"]] == list(range(len(cka)))


def test_bad_arguments_exit_2(quick, tmp_path):
    engram = str(quick["out"] / "models" / "engram")
    assert main(["study", "cka", "--ckpt", str(tmp_path / "nope"), "--baseline-ckpt", engram]) == 2
    assert main(["study", "cka", "--ckpt", engram]) == 2  # no --baseline
    assert main(["study", "cka"]) == 2  # neither checkpoints nor --quick
    assert main(["study", "cka", "--quick", "--minibatch", "2"]) == 2
    assert main(["study", "cka", "--quick", "--top-k", "0"]) == 2
    argv = ["study", "cka", "--ckpt", engram, "--baseline-ckpt", engram, "--out", str(tmp_path)]
    argv += ["--data", str(quick["corpus"]), "--max-tokens", "100"]
    assert main(argv) == 2  # fewer tokens than one minibatch of 1,024
