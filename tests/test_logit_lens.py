"""`engram study logit-lens`: the early-exit readout is the model's own, KL and CE are right."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from engram.assembly import evaluate, pick_device
from engram.cli import main
from engram.experiments.layerwise import (
    QUICK_TOKENS,
    batches,
    forward_with_streams,
    load_pair,
    readout,
)
from engram.experiments.logit_lens import lens_sums


@pytest.fixture(scope="module")
def quick(tmp_path_factory, stdlib_corpus):
    """One quick study through the CLI: trains the tiny Engram/baseline pair the tests share.

    Yields inside the patch, so every test of this module reads and writes that cache.
    """
    root = tmp_path_factory.mktemp("logit-lens")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_CACHE_DIR", str(root / "cache"))
        corpus = stdlib_corpus(60)
        out = root / "quick"
        argv = ["study", "logit-lens", "--quick", "--data", str(corpus), "--out", str(out)]
        assert main(argv) == 0
        models = out / "models"
        yield {
            "root": root,
            "corpus": corpus,
            "out": out,
            "report": json.loads((out / "report.json").read_text()),
            "pair": load_pair(models / "engram", models / "baseline", str(corpus), "cpu"),
        }


def test_quick_study_writes_the_report(quick):
    report, out = quick["report"], quick["out"]
    assert (
        report["models"]["engram"]["engram_layers"]
        and not report["models"]["baseline"]["engram_layers"]
    )
    for arm in ("engram", "baseline"):
        r = report[arm]
        assert len(r["kl"]) == report["models"][arm]["n_layers"] + 1  # embedding + every block
        assert all(kl > -1e-6 for kl in r["kl"])  # a KL divergence (float noise at the last)
        # The last layer's early exit is the model's prediction: KL 0 up to fp32 rounding of two
        # identical log-softmaxes, and the same top-1 everywhere.
        assert abs(r["kl"][-1]) < 1e-5
        assert r["top1_agreement"][-1] == 1.0
    assert report["tokens"] <= QUICK_TOKENS
    assert (out / "logit_lens.png").stat().st_size > 1000
    text = (out / "report.md").read_text()
    assert "Paper:" in text and "Ours:" in text


def test_last_layer_loss_is_the_validation_loss(quick):
    # The early exit of the last layer scores the tokens `evaluate` scores, with the same loss.
    pair, report = quick["pair"], quick["report"]
    tokens = pair.val_tokens()
    for arm in ("engram", "baseline"):
        trained = getattr(pair, arm)
        config = replace(trained.config, eval_tokens=report["config"]["max_tokens"])
        loss = evaluate(trained.model, tokens, config, pick_device("cpu"))
        # Sums over ~4k tokens in float64 of fp32 losses: 1e-5 relative is rounding.
        assert report[arm]["ce"][-1] == pytest.approx(loss, rel=1e-5)


def test_readout_reproduces_the_models_logits(quick):
    pair = quick["pair"]
    ids, targets = next(batches(pair, 1024))
    model = pair.engram.model
    assert model.config.hc_branches == 2  # the branch combination is really exercised
    logits, streams = forward_with_streams(model, ids)
    assert len(streams) == model.config.n_layers + 1
    assert streams[0].shape[2] == streams[1].shape[2] == 2
    assert not model.blocks[0]._forward_pre_hooks and not model.blocks[0]._forward_hooks  # removed
    with torch.no_grad():
        torch.testing.assert_close(streams[0].mean(dim=2), model.embed(ids))
        # Same ops on the same tensor as EngramLM.forward's readout: equal to fp32 rounding.
        torch.testing.assert_close(readout(model, streams[-1]), logits, rtol=1e-5, atol=1e-5)
        # KL and CE against an independent formulation (torch's kl_div on log-probabilities).
        sums = lens_sums(model, logits, streams, targets)
        logp_final = F.log_softmax(logits.float(), dim=-1)
        for i, stream in enumerate(streams):
            logp = F.log_softmax(readout(model, stream).float(), dim=-1)
            kl = F.kl_div(logp, logp_final, log_target=True, reduction="sum")
            ce = F.cross_entropy(logp.flatten(0, 1), targets.flatten(), reduction="sum")
            assert float(sums[i, 0]) == pytest.approx(float(kl), rel=1e-4, abs=1e-3)
            assert float(sums[i, 1]) == pytest.approx(float(ce), rel=1e-5)


def test_checkpoints_given_explicitly_reproduce_the_quick_run(quick, tmp_path):
    models, out = quick["out"] / "models", tmp_path / "again"
    argv = ["study", "logit-lens", "--ckpt", str(models / "engram"), "--baseline-ckpt"]
    argv += [str(models / "baseline"), "--data", str(quick["corpus"]), "--out", str(out)]
    argv += ["--max-tokens", str(QUICK_TOKENS)]
    assert main(argv) == 0
    again = json.loads((out / "report.json").read_text())
    for arm in ("engram", "baseline"):
        assert again[arm]["kl"] == pytest.approx(quick["report"][arm]["kl"], rel=1e-9, abs=1e-12)


def test_bad_arguments_exit_2(quick, tmp_path):
    engram = str(quick["out"] / "models" / "engram")
    missing = str(tmp_path / "nope")
    assert main(["study", "logit-lens", "--ckpt", missing, "--baseline-ckpt", engram]) == 2
    assert main(["study", "logit-lens", "--ckpt", engram, "--baseline-ckpt", missing]) == 2
    assert main(["study", "logit-lens", "--baseline-ckpt", engram]) == 2  # no --ckpt
    assert main(["study", "logit-lens"]) == 2  # neither checkpoints nor --quick
    assert main(["study", "logit-lens", "--quick", "--max-tokens", "1"]) == 2
