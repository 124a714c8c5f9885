"""Quantised Engram tables for inference (`engram.inference.quantized`, `engram quantize`,
`engram eval --tables`): the model reads exactly the dequantised rows, the loss barely moves,
folders round-trip bit for bit, and a folder only installs in the model it came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from small_runs import small_config

from engram.assembly import build_model, evaluate
from engram.cli import main
from engram.config import TrainConfig
from engram.data import build_shard
from engram.inference.load import load_trained
from engram.inference.quantized import (
    QuantizedSource,
    install_quantized,
    load_quantized,
    quantization_report,
    quantize_tables,
    save_quantized,
)
from engram.tables.quant import QuantizedStore, dequantize
from engram.train import train

BLOCK = 4  # the tiny preset's rows are 8 wide


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        yield


@pytest.fixture(scope="module")
def corpus(stdlib_corpus, cache):
    return stdlib_corpus(40)


def config(corpus: Path, out: Path, *overrides: str) -> TrainConfig:
    return small_config(corpus, out, "eval_every=8", "eval_tokens=1024", *overrides)


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "device"
    train(config(corpus, out))
    return out


@pytest.fixture(scope="module")
def host_run(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "host"
    train(config(corpus, out, "tables.placement=host"))
    return out


@pytest.fixture(scope="module")
def foreign_run(corpus, tmp_path_factory) -> Path:
    """The same configuration with another seed: same table shapes, another model."""
    out = tmp_path_factory.mktemp("runs") / "foreign"
    train(config(corpus, out, "seed=1", "steps=2"))
    return out


def ids() -> torch.Tensor:
    return torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(ids())


def test_the_model_reads_exactly_the_dequantised_rows(run):
    model = load_trained(run).model
    memory = model.engram_layers[0]
    want = logits(model)
    stores = quantize_tables(model, "int8", BLOCK)
    report = quantization_report(model, stores)
    store = stores["layer1"]
    # The same model with its float table overwritten by the dequantised rows: the reference.
    reference = load_trained(run).model
    every = torch.arange(store.num_rows)
    with torch.no_grad():
        reference.engram_layers[0].table.weight.copy_(dequantize(*store.read_raw(every)))
    install_quantized(model, stores)
    assert isinstance(memory.row_source, QuantizedSource) and memory.table is None
    got = logits(model)
    torch.testing.assert_close(got, logits(reference), rtol=0, atol=1e-5)
    # Each looked-up element moves by at most the table's measured dequantisation error, and
    # the logits only by a small fraction of their spread.
    rows = model.hash(ids())[1]
    float_e = reference.engram_layers[0].lookup(rows)  # reference holds the dequantised rows
    assert torch.equal(memory.lookup(rows), float_e)
    assert 0 < report["tables"]["layer1"]["error"]["max_abs_error"] < 0.05
    assert 0 < float((got - want).abs().max()) < 0.05 * float(want.std())


def test_int8_and_fp8_keep_the_validation_loss(run):
    trained = load_trained(run)
    model, tok, cfg = trained.model, trained.tokenizer, trained.config
    val = build_shard(cfg.data, "val", tok).tokens
    device = torch.device("cpu")
    fp32 = evaluate(model, val, cfg, device)
    stores = {kind: quantize_tables(model, kind) for kind in ("int8", "fp8")}
    for kind, kind_stores in stores.items():
        install_quantized(model, kind_stores)
        loss = evaluate(model, val, cfg, device)
        # Close (per-row scales: ~0.4% (int8), ~2% (fp8) RMS), and not equal: a table that
        # installing left unused would give the float loss to the last bit.
        assert 0 < abs(loss - fp32) < 0.01, kind


def test_save_load_round_trip_gives_identical_logits(run, tmp_path):
    model = load_trained(run).model
    stores = quantize_tables(model, "int8", BLOCK)
    report = quantization_report(model, stores)
    folder = save_quantized(tmp_path / "q", stores, {**report, "source": {"step": 8}})
    install_quantized(model, stores)
    want = logits(model)

    fresh = load_trained(run).model
    loaded, manifest = load_quantized(folder, fresh)
    install_quantized(fresh, loaded)
    assert torch.equal(logits(fresh), want)
    H, r = fresh.spec.heads_total, fresh.spec.row_dim
    entry = manifest["tables"]["layer1"]
    assert (manifest["kind"], manifest["block"], manifest["source"]) == ("int8", BLOCK, {"step": 8})
    assert entry["bytes_per_row"] == r + 4 * (r // BLOCK)
    assert manifest["bytes_per_token"] == H * entry["bytes_per_row"]
    assert manifest["bytes_per_token_fp32"] == H * r * 4
    assert entry["table"]["kind"] == "int8" and entry["file"] == "layer1.qtable"
    assert set(entry["error"]) == {"max_abs_error", "rms_error", "relative_rms_error"}
    assert sorted(p.name for p in folder.iterdir()) == ["layer1.qtable", "manifest.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    with pytest.raises(ValueError, match="exists"):
        save_quantized(folder, loaded)
    save_quantized(folder, quantize_tables(load_trained(run).model, "fp8"), overwrite=True)
    assert load_quantized(folder)[1]["kind"] == "fp8"


def test_tables_are_frozen_under_grad(run):
    model = load_trained(run).model
    stores = quantize_tables(model, "int8")
    install_quantized(model, stores)
    model.train()
    loss = model(ids()).square().mean()
    assert not model.engram_layers[0].lookup(model.hash(ids())[1]).requires_grad
    loss.backward()  # the dense weights get gradients; the table is a constant
    assert model.engram_layers[0].value_proj.weight.grad is not None
    with pytest.raises(ValueError, match="read-only"):
        stores["layer1"].write(torch.tensor([0]), torch.zeros(1, stores["layer1"].dim))
    with pytest.raises(ValueError, match="already quantised"):
        quantize_tables(model, "int8")


def test_a_folder_fits_only_its_model(run, foreign_run, tmp_path):
    model = load_trained(run).model
    stores = quantize_tables(model, "int8")
    memory = model.engram_layers[0]
    with pytest.raises(ValueError, match="not this model's"):
        install_quantized(model, {"layer5": stores["layer1"]})
    small = QuantizedStore.from_values(torch.randn(10, memory.spec.row_dim), "int8")
    with pytest.raises(ValueError, match="10 x 8 rows"):
        install_quantized(model, {"layer1": small})
    foreign = load_trained(foreign_run).model
    with pytest.raises(ValueError, match="another model"):
        install_quantized(foreign, stores)
    with pytest.raises(ValueError, match="not a quantised-tables folder"):
        load_quantized(tmp_path)
    with pytest.raises(ValueError, match="block=3"):
        quantize_tables(model, "int8", block=3)
    with pytest.raises(ValueError, match="kind='int4'"):
        quantize_tables(model, "int4")


def test_cli_quantize_then_eval(run, tmp_path, capsys):
    assert main(["quantize", "--ckpt", str(run), "--kind", "int8", "--block", str(BLOCK)]) == 0
    printed = capsys.readouterr().out
    H, r = 4, 8  # the tiny preset: orders 2 and 3, two heads each, rows 8 wide
    assert "relative RMS error layer1" in printed
    assert f"bytes per token: fp32 {H * r * 4} -> int8 {H * (r + 4 * r // BLOCK)}" in printed
    folder = next(run.glob("quantized-int8-b4-step*"))
    assert (folder / "manifest.json").is_file()
    assert main(["eval", "--ckpt", str(run), "eval_tokens=512"]) == 0
    plain = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert plain["quantized"] is None
    assert main(["eval", "--ckpt", str(run), "--tables", str(folder), "eval_tokens=512"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["quantized"]["kind"] == "int8" and report["quantized"]["block"] == BLOCK
    assert report["quantized"]["bytes_per_token"] == H * (r + 4 * r // BLOCK)
    assert 0 < abs(report["val_loss"] - plain["val_loss"]) < 0.01  # --tables used, and close
    assert report["val_loss_engram_off"] == plain["val_loss_engram_off"]
    # A flipped bit in a quantised table: refused, naming the file, never served.
    qtable = next(folder.glob("*.qtable"))
    data = bytearray(qtable.read_bytes())
    data[len(data) // 2] ^= 0x04
    qtable.write_bytes(bytes(data))
    assert main(["eval", "--ckpt", str(run), "--tables", str(folder), "eval_tokens=512"]) == 2
    assert f"{qtable.name} is damaged" in capsys.readouterr().err
    data[len(data) // 2] ^= 0x04
    qtable.write_bytes(bytes(data))
    # A flipped bit in a digit of the manifest (it still parses): refused too.
    manifest = bytearray((folder / "manifest.json").read_bytes())
    at = next(i for i in range(len(manifest) // 2, len(manifest)) if chr(manifest[i]).isdigit())
    manifest[at] ^= 0x01
    (folder / "manifest.json").write_bytes(bytes(manifest))
    assert main(["eval", "--ckpt", str(run), "--tables", str(folder), "eval_tokens=512"]) == 2
    assert "manifest.json is damaged" in capsys.readouterr().err
    # The same folder again: refused without --overwrite.
    assert main(["quantize", "--ckpt", str(run), "--kind", "int8", "--block", "4"]) == 2
    assert "exists" in capsys.readouterr().err


def test_cli_rejects_bad_input_with_status_2(run, foreign_run, tmp_path, capsys):
    base = ["quantize", "--ckpt", str(run), "--out", str(tmp_path / "q")]
    assert main([*base, "--kind", "fp16"]) == 2
    assert "kind='fp16'" in capsys.readouterr().err
    assert main([*base, "--kind", "int8", "--block", "3"]) == 2
    assert "divisor of dim=8" in capsys.readouterr().err
    assert main([*base, "--kind", "fp8"]) == 0
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(foreign_run), "--tables", str(tmp_path / "q")]) == 2
    assert "another model" in capsys.readouterr().err


def test_a_host_placed_table_quantises_from_its_store(host_run, tmp_path, capsys):
    trained = load_trained(host_run)
    model, tok, cfg = trained.model, trained.tokenizer, trained.config
    placed = trained.tables.tables["layer1"]
    assert model.engram_layers[0].table is None
    val = build_shard(cfg.data, "val", tok).tokens
    fp32 = evaluate(model, val, cfg, torch.device("cpu"))
    stores = quantize_tables(model, "int8", BLOCK)
    assert stores["layer1"].init == placed.store.init
    save_quantized(tmp_path / "q", stores, quantization_report(model, stores))
    install_quantized(model, stores)
    with pytest.raises(ValueError, match="closed"):  # the float store was released
        placed.store.read(torch.tensor([0]))
    assert 0 < abs(evaluate(model, val, cfg, torch.device("cpu")) - fp32) < 0.01
    assert main(["eval", "--ckpt", str(host_run), "--tables", str(tmp_path / "q")]) == 0
    assert json.loads(capsys.readouterr().out)["quantized"]["kind"] == "int8"


def test_a_cached_disk_table_with_serving_prefetch(corpus, tmp_path):
    """A disk table behind a cache, served with prefetch: installing stops the prefetch and
    releases its pins before the float store is closed."""
    out = tmp_path / "run"
    train(config(corpus, out, "tables.placement=disk", "tables.cache_rows=2000", "steps=2"))
    trained = load_trained(out)
    model = trained.model
    want = logits(model)  # a forward through the prefetch
    stores = quantize_tables(model, "int8")
    install_quantized(model, stores)
    assert trained.tables.fetches_ahead(training=False) == []  # nothing left to fetch
    got = logits(model)
    assert trained.tables.tables["layer1"].inflight is None
    fresh, _ = build_model(trained.config.model, trained.tokenizer, "tokenizer.json")
    assert set(vars(model)) == set(vars(fresh))  # placed and quantised, nothing set on it
    assert 0 < float((got - want).abs().max()) < 0.05 * float(want.std())
