"""Training end to end on a small corpus: artefacts, learning, exact resume, checkpoint errors."""

from __future__ import annotations

import importlib
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from small_runs import small_config

from engram.checkpoint import find_checkpoint, read_manifest
from engram.cli import build_parser, main, train_config
from engram.config import TrainConfig, load_recipe
from engram.data.sources import source_fingerprint
from engram.experiments.arms import study_from_recipe
from engram.inference.load import load_trained
from engram.train import train

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def corpus(stdlib_corpus):
    return stdlib_corpus(80)


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def config(corpus, out, **changes) -> TrainConfig:
    base = small_config(corpus, out)
    return replace(base, **changes)


def test_train_writes_run_artefacts_and_learns(corpus, tmp_path):
    summary = train(config(corpus, tmp_path / "run", steps=30, eval_every=10))
    run = tmp_path / "run"
    for name in ("config.json", "spec.json", "tokenizer.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) == 3 and all(math.isfinite(v) for v in vals)
    train_records = [r for r in records if "loss" in r]
    assert all(r["moe_max_load"] >= 1.0 and r["grad_norm"] > 0 for r in train_records)
    assert vals[-1] < vals[0] < math.log(400) + 0.5  # it learns something in 30 steps
    assert summary["tokens"] == 30 * 4 * 32
    assert summary["model_tflops_per_s"] > 0 and "mfu" not in summary  # a CPU has no set peak
    assert all(r["model_tflops_per_s"] > 0 for r in train_records)
    assert summary["curve"][-1] == [summary["tokens"], summary["val_loss"]]
    assert summary["torch_threads"] == torch.get_num_threads()  # the losses' last bits depend on it
    assert json.loads((run / "config.json").read_text())["model"]["vocab_size"] <= 400
    data = json.loads((run / "data.json").read_text())  # what the run read, recorded with it
    assert data["source"] == str(corpus.resolve()) and data["fingerprint"] == source_fingerprint(
        str(corpus)
    )
    assert data["train"]["tokens"] > data["val"]["tokens"] > 0
    assert read_manifest(run)["data"] == data


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(find_checkpoint(run) / "model.safetensors"))


@pytest.mark.parametrize("backbone", ["adamw", "muon"])
def test_resume_continues_exactly(corpus, tmp_path, backbone):
    straight = config(corpus, tmp_path / "a", ckpt_every=4)
    straight = replace(straight, optim=replace(straight.optim, backbone=backbone))
    train(straight)
    # Rebuild the state of a run that stopped at step 4: drop its step-8 checkpoint.
    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns(".trash-*"))
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-0000008")
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step-0000004\n")
    resumed = train(replace(straight, out_dir=str(tmp_path / "b")), resume=True)
    assert resumed["steps"] == 8
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed run differs in {different[:5]}"


def test_resume_refuses_another_model(corpus, tmp_path):
    train(config(corpus, tmp_path / "run", steps=2))
    other = config(corpus, tmp_path / "run", steps=4)
    other = replace(other, model=other.model.with_(n_layers=4))
    with pytest.raises(ValueError, match="model config differs"):
        train(other, resume=True)


def test_load_trained_and_eval_cli(corpus, tmp_path, capsys):
    train(config(corpus, tmp_path / "run", steps=2))
    trained = load_trained(tmp_path / "run")
    model, manifest = trained.model, trained.manifest
    assert manifest["step"] == 2 and not model.training
    assert main(["eval", "--ckpt", str(tmp_path / "run"), "eval_tokens=1024"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert math.isfinite(report["val_loss"]) and "val_loss_engram_off" in report


def test_corrupt_checkpoint_is_a_clear_error(corpus, tmp_path, capsys):
    train(config(corpus, tmp_path / "run", steps=2))
    ckpt = find_checkpoint(tmp_path / "run")
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    assert main(["eval", "--ckpt", str(tmp_path / "run")]) == 2
    assert "model.safetensors has 7 bytes" in capsys.readouterr().err
    (ckpt / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match=r"manifest\.json is unreadable"):
        load_trained(tmp_path / "run")
    with pytest.raises(ValueError, match="no checkpoint"):
        load_trained(tmp_path / "nowhere")


def test_every_shipped_recipe_parses():
    recipes = sorted((ROOT / "recipes").glob("*.toml"))
    assert recipes, "no recipes shipped"
    for recipe in recipes:
        study = load_recipe(recipe).get("study")
        if study is not None:  # a study's recipe (`engram study NAME --recipe`)
            module = importlib.import_module(f"engram.experiments.{study.replace('-', '_')}")
            cfg = study_from_recipe(recipe, module.QUICK, study)
            cfg.validate()
            cfg.base_model()  # a `baseline` report must exist and be for the recipe's preset
            # ...and the command its comment names takes it
            build_parser().parse_args(["study", study, "--recipe", str(recipe)])
            continue
        cfg = train_config(str(recipe), [])
        cfg.validate()


def test_cli_train_overrides_and_errors(corpus, tmp_path, capsys):
    argv = [
        "train",
        f"data={corpus}",
        f"out_dir={tmp_path / 'run'}",
        "tokenizer=bpe:400",
        "seq_len=32",
        "batch_size=4",
        "steps=2",
        "eval_every=2",
        "eval_tokens=1024",
        "progress=false",
        "preset=tiny",
        "model.moe=none",
    ]
    assert main(argv) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["moe"] is None and saved["steps"] == 2
    assert main(["train", "steps=lots"]) == 2
    assert "steps='lots' is not a valid int" in capsys.readouterr().err


def test_compile_trains_as_eager(corpus, tmp_path):
    """compile=true: the same steps as eager to float tolerance (tables in a row store; as
    embeddings with sparse gradients they are refused before anything compiles)."""
    host = small_config(corpus, tmp_path / "eager", "tables.placement=host", "steps=2")
    eager = train(replace(host, eval_every=2))
    compiled = train(replace(host, eval_every=2, compile=True, out_dir=str(tmp_path / "c")))
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-5)
    with pytest.raises(ValueError, match="sparse gradients"):
        train(config(corpus, tmp_path / "sparse", compile=True, steps=1))
