"""A pretrained Hugging Face decoder trained through `engram train` (`base.path`).

The suite builds a small Llama itself, saves it with `save_pretrained` beside its tokenizer (a
BPE of the test corpus), and trains it through the CLI as a user would: `from_pretrained` of a
local folder, nothing downloaded. Checked: every table placement trains, checkpoints and
resumes bit for bit; `eval` scores it with Engram on and off; `generate`'s cached decoding gives
what full forwards give; `base.train` freezes what it does not name; bad input is one line.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from small_runs import BASE
from transformers import (
    AutoModelForCausalLM,
    LlamaForCausalLM,
)

from engram.assembly import get_tokenizer
from engram.checkpoint import read_manifest, write_manifest
from engram.cli import main
from engram.hf.attach import add_engram, load_engram
from engram.hf.export import load_merged
from engram.hf.tiny import main as tiny_main
from engram.hf.tiny import save_tiny_decoder
from engram.inference import SamplingConfig, generate
from engram.inference.load import load_trained
from engram.spec import SpecConfig, resolve
from engram.tokenizer import load_tokenizer, train_bpe

IN_FLIGHT = shutil.ignore_patterns(".trash-*")  # deletions still running in the background
RUN = [a for a in BASE if not a.startswith("tokenizer=")] + ["steps=6", "eval_every=3"]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def save_base(folder: Path, corpus: Path, family: str = "llama") -> Path:
    """A small randomly initialised decoder (3 layers, 32 wide) and its tokenizer, as
    `save_pretrained` writes them (`family` gpt2: one the trainer does not support)."""
    tok = get_tokenizer("bpe:400", str(corpus))
    shape = {"hidden_size": 32, "intermediate_size": 64, "head_dim": 8}
    return save_tiny_decoder(folder, family, tok, max_position_embeddings=256, **shape)


@pytest.fixture(scope="module")
def corpus(stdlib_corpus) -> Path:
    return stdlib_corpus(80)


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ENGRAM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        return save_base(tmp_path_factory.mktemp("base") / "llama", corpus)


def _summary(argv: list[str]) -> dict:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0, argv
    return json.loads(printed.getvalue().strip().splitlines()[-1])


def _argv(corpus: Path, base: Path, out: Path, *extra: str) -> list[str]:
    return [f"base.path={base}", f"data={corpus}", f"out_dir={out}", *RUN, *extra]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(read_manifest(out)["path"]) / "model.safetensors"))


PLACEMENTS = {
    "device": [],
    "host": ["tables.placement=host"],
    "disk+cache": ["tables.placement=disk", "tables.cache_rows=2048"],
    "host, backbone frozen": ["tables.placement=host", "base.train=none"],  # left out of ckpts
}


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_a_pretrained_llama_trains_checkpoints_and_resumes_exactly(
    corpus, base, tmp_path, placement
):
    extra = [*PLACEMENTS[placement], "ckpt_every=2"]
    straight = _summary(["train", *_argv(corpus, base, tmp_path / "straight", *extra)])
    # The state of a run that stopped at step 4: its step-6 checkpoint dropped.
    shutil.copytree(tmp_path / "straight", tmp_path / "split", ignore=IN_FLIGHT)
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step-0000006")
    (tmp_path / "split" / "checkpoints" / "latest").write_text("step-0000004\n")
    resumed = _summary(["train", "--resume", *_argv(corpus, base, tmp_path / "split", *extra)])
    assert resumed["val_loss"] == straight["val_loss"] and resumed["steps"] == 6
    ours, ref = _weights(tmp_path / "split"), _weights(tmp_path / "straight")
    assert ours.keys() == ref.keys() and any(".engram." in k for k in ours)
    for name in ref:
        assert torch.equal(ours[name], ref[name]), name
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert config["base"]["path"] == str(base) and config["model"]["n_layers"] == 3
    assert config["model"]["d_model"] == 32  # the pretrained model's shape, not the preset's


def test_eval_and_generate_a_run_on_a_pretrained_model(corpus, base, tmp_path):
    out = tmp_path / "run"
    _summary(["train", *_argv(corpus, base, out)])
    scored = _summary(["eval", "--ckpt", str(out)])
    assert scored["val_loss"] != scored["val_loss_engram_off"]  # the trained Engram counts
    trained = load_trained(out, device="cpu")
    tok = trained.tokenizer
    prompts = [tok.encode("def __init__(self"), tok.encode("import os\n")]
    made = generate(trained.model, prompts, SamplingConfig(max_new_tokens=6), None, tok.pad_id)
    for prompt, new in zip(prompts, made.tokens, strict=True):  # against full forwards
        ids = list(prompt)
        for _ in range(6):
            logits = trained.model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
        assert new == ids[len(prompt) :]
    assert main(["generate", "--ckpt", str(out), "--prompt", "def ", "--max-new-tokens", "4"]) == 0
    assert main(["quantize", "--ckpt", str(out), "--kind", "int8"]) == 0  # int8 rows for serving
    folder = next(out.glob("quantized-int8-*"))
    quantized = _summary(["eval", "--ckpt", str(out), "--tables", str(folder)])
    assert quantized["quantized"]["kind"] == "int8"
    assert 0 < abs(quantized["val_loss"] - scored["val_loss"]) < 0.01  # installed, and close


def _trained_state(out: Path) -> dict[str, torch.Tensor]:
    trained = load_trained(out, device="cpu")
    return {k: v.clone() for k, v in trained.model.state_dict().items()}


def test_base_train_freezes_what_it_does_not_name(capsys, corpus, base, tmp_path):
    """Frozen weights stay as pretrained and stay out of the checkpoints, which record the
    base folder's digests instead and refuse to load once it has changed."""
    before = load_file(str(base / "model.safetensors"))
    out = tmp_path / "frozen"
    _summary(["train", *_argv(corpus, base, out, "base.train=none")])
    saved = _weights(out)
    assert saved and all(".engram." in k for k in saved)  # the trained weights only
    after = _trained_state(out)
    for name, value in before.items():
        assert torch.equal(after[f"hf.{name}"], value), name  # the backbone as pretrained
    engram = [k for k in after if ".engram." in k and "value_proj.weight" in k]
    assert engram and all(after[k].abs().sum() > 0 for k in engram)  # Engram trained
    out = tmp_path / "some"
    _summary(["train", *_argv(corpus, base, out, "base.train=model.layers.2.*")])
    assert {k for k in _weights(out) if ".engram." not in k} == {
        f"hf.{k}" for k in before if k.startswith("model.layers.2.")
    }
    after = _trained_state(out)
    changed = {k for k, v in before.items() if not torch.equal(after[f"hf.{k}"], v)}
    assert changed and all(k.startswith("model.layers.2.") for k in changed)
    # The base folder changes (a fine-tune saved over it): the run no longer loads.
    moved = tmp_path / "moved"
    shutil.copytree(base, moved)
    state = load_file(str(moved / "model.safetensors"))
    state["model.norm.weight"] = state["model.norm.weight"] + 1
    save_file(state, str(moved / "model.safetensors"), metadata={"format": "pt"})
    manifest = json.loads((Path(read_manifest(out)["path"]) / "manifest.json").read_text())
    manifest["base"]["path"] = str(moved)
    write_manifest(Path(read_manifest(out)["path"]), manifest)
    user_error(capsys, ["eval", "--ckpt", str(out)], "model.safetensors changed since")


def user_error(capsys, argv: list[str], *needles: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_bad_input_is_one_line(capsys, corpus, base, tmp_path):
    out = str(tmp_path / "bad")
    user_error(capsys, ["train", *_argv(corpus, tmp_path, out)], "not a model folder")
    layers = "model.engram.spec.layer_ids=7"
    user_error(capsys, ["train", *_argv(corpus, base, out, layers)], "outside", "3 layers")
    user_error(capsys, ["train", *_argv(corpus, base, out, "base.train=nothing.*")], "names no")
    gpt2 = save_base(tmp_path / "gpt2", corpus, "gpt2")
    user_error(capsys, ["train", *_argv(corpus, gpt2, out)], "GPT2LMHeadModel", "not a family")
    no_tok = tmp_path / "no-tok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes((base / name).read_bytes())
    user_error(capsys, ["train", *_argv(corpus, no_tok, out)], "no tokenizer.json")
    # The model's tokenizer is not the one the run was trained with: a resume is refused.
    run = tmp_path / "run"
    _summary(["train", *_argv(corpus, base, run, "steps=2")])
    other = tmp_path / "other-tokenizer"
    shutil.copytree(base, other)
    train_bpe(["def g(y):\n    return y * 2\n"] * 50, vocab_size=300).save(other / "tokenizer.json")
    resume = ["train", "--resume", *_argv(corpus, other, run, "steps=4")]
    user_error(capsys, resume, "trained with another tokenizer")


def test_the_readme_commands_run(corpus, tmp_path):
    """The README's two lines: make a small HF Llama, then train it with the recipe."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "python -m engram.hf.tiny runs/hf-base" in readme
    assert "engram train --recipe recipes/hf-llama.toml" in readme
    folder = tmp_path / "hf-base"
    tiny_main([str(folder), "--tokenizer", "bpe:400", "--data", str(corpus), "--layers", "2"])
    recipe = str(Path(__file__).parent.parent / "recipes" / "hf-llama.toml")
    overrides = [f"base.path={folder}", f"data={corpus}", f"out_dir={tmp_path / 'run'}"]
    overrides += ["steps=2", "eval_every=2", "eval_tokens=1024", "seq_len=32", "progress=false"]
    summary = _summary(["train", "--recipe", recipe, *overrides])
    assert summary["steps"] == 2 and summary["val_loss"] < 7  # a 400-id vocabulary: ln 400 = 6


@pytest.mark.parametrize("dense", ["fsdp", "ddp"])
def test_a_pretrained_model_trains_on_two_ranks_as_on_one(corpus, base, tmp_path, dense):
    """torchrun, 2 ranks (gloo): each decoder layer sharded (FSDP2) or replicated (DDP), the
    Engram table sharded by rows; every step's loss within 1e-5 of one process."""
    steps = ["steps=8", "log_every=1", "optim.warmup_steps=50", f"parallel.dense={dense}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    losses = []
    for ranks, out in ((1, tmp_path / "one"), (2, tmp_path / "two")):
        train = ["-m", "engram", "train", *_argv(corpus, base, out, *steps)]
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
        cmd = [sys.executable, *(launch if ranks > 1 else []), *train]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["loss"] for r in records if "loss" in r])
        assert {r["world_size"] for r in records} == {ranks}
    assert len(losses[0]) == len(losses[1]) == 8
    for one, two in zip(*losses, strict=True):
        assert abs(one - two) <= 1e-5 * abs(one), losses


@pytest.mark.parametrize("placement", ["device", "disk+cache"])
def test_export_the_engram_or_a_merged_model_and_load_it_back_exactly(
    capsys, corpus, base, tmp_path, placement
):
    """`engram export`: the Engram alone (tables as placed: a disk table stays one) attaches
    to the pretrained model it was trained on; a merged folder loads with one call. Both give
    the trained run's logits exactly, and the merged model generates with its cache what full
    forwards give."""
    frozen, joint = tmp_path / "frozen", tmp_path / "joint"
    extra = PLACEMENTS[placement]
    _summary(["train", *_argv(corpus, base, frozen, "base.train=none", *extra)])
    _summary(["train", *_argv(corpus, base, joint, *extra)])
    ids = torch.tensor([list(range(3, 40))])
    assert main(["export", "--ckpt", str(frozen), "--out", str(tmp_path / "engram")]) == 0
    assert (tmp_path / "engram" / "tables").is_dir() == (placement != "device")
    model = LlamaForCausalLM.from_pretrained(base)
    load_engram(model, tmp_path / "engram", load_tokenizer(base))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, load_trained(frozen).model(ids))
    assert main(["export", "--ckpt", str(joint), "--out", str(tmp_path / "m"), "--merged"]) == 0
    merged = load_merged(tmp_path / "m")
    trained = load_trained(joint).model
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, trained(ids))
        made = merged.generate(ids[:, :8], max_new_tokens=6, do_sample=False)
        full = ids[:, :8]
        for _ in range(6):
            full = torch.cat([full, trained(full)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(made, full)
    user_error(capsys, ["export", "--ckpt", str(joint), "--out", str(tmp_path / "m")], "exists")
    weights = tmp_path / "engram" / "engram.safetensors"  # every file is checked on load
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"engram\.safetensors is damaged"):
        load_engram(LlamaForCausalLM.from_pretrained(base), weights.parent, load_tokenizer(base))


@pytest.mark.parametrize("placement", ["device", "host"])
def test_a_bf16_backbone_trains_with_engram_in_its_dtype(corpus, base, tmp_path, placement):
    """base.dtype=bf16: Engram follows its layer's dtype; the tables stay fp32 (row stores and
    their optimiser keep them exact) and their rows are cast as they enter the module."""
    out = tmp_path / "bf16"
    extra = ["base.dtype=bf16", *PLACEMENTS[placement]]
    summary = _summary(["train", *_argv(corpus, base, out, *extra)])
    assert math.isfinite(summary["val_loss"])
    model = load_trained(out).model
    (engram,) = model.engram_layers
    assert engram.value_proj.weight.dtype == torch.bfloat16
    assert next(model.hf.parameters()).dtype == torch.bfloat16
    rows = (
        engram.table.weight
        if engram.table is not None
        else engram.row_source.store.read(torch.arange(4))
    )
    assert rows.dtype == torch.float32


def test_the_studies_take_a_run_of_a_pretrained_model(corpus, base, tmp_path):
    """controls (its tables placed in host memory: embedded for the whole-table edits), gates,
    collisions, and the layerwise pair studies against the same model trained without Engram."""
    run, plain = tmp_path / "engram", tmp_path / "plain"
    _summary(["train", *_argv(corpus, base, run, "tables.placement=host")])
    _summary(["train", *_argv(corpus, base, plain, "model.engram=none")])
    studies = [
        ["controls", "--ckpt", str(run), "--eval-tokens", "1024"],
        ["gates", "--ckpt", str(run), "--text", "def f(x):\n    return x"],
        ["collisions", "--ckpt", str(run), "--max-tokens", "2048"],
        ["logit-lens", "--ckpt", str(run), "--baseline-ckpt", str(plain), "--max-tokens", "1024"],
        ["cka", "--ckpt", str(run), "--baseline-ckpt", str(plain), "--max-tokens", "2048"],
    ]
    for argv in studies:
        out = tmp_path / argv[0]
        assert main(["study", *argv, "--out", str(out)]) == 0, argv
        report = json.loads((out / "report.json").read_text())
        assert report, argv
    controls = json.loads((tmp_path / "controls" / "report.json").read_text())["eval"]["loss"]
    assert controls["on"] != controls["off"]  # the trained Engram counts
    lens = json.loads((tmp_path / "logit-lens" / "report.json").read_text())["models"]
    assert lens["engram"]["engram_layers"] == [1] and lens["baseline"]["engram_layers"] == []
    assert lens["engram"]["n_layers"] == 3  # the pretrained model's decoder layers
    # A run without Engram exports the backbone alone (pretraining with engram train, say).
    assert (
        main(["export", "--ckpt", str(plain), "--out", str(tmp_path / "plain-hf"), "--merged"]) == 0
    )
    ids = torch.tensor([list(range(3, 30))])
    with torch.no_grad():
        assert torch.equal(
            load_merged(tmp_path / "plain-hf")(ids).logits, load_trained(plain).model(ids)
        )


def test_engram_follows_its_layer_when_loaded_with_a_device_map(base):
    """`from_pretrained(..., device_map=..., dtype=bf16)`: each Engram module is made on its
    decoder layer's device in its dtype (one device here; the code reads the layer's)."""
    model = AutoModelForCausalLM.from_pretrained(base, device_map={"": "cpu"}, dtype=torch.bfloat16)
    tok = load_tokenizer(base)
    config = SpecConfig(
        tokenizer="t", layer_ids=(1,), orders=(2, 3), heads_per_order=2,
        base_sizes=(1009, 1013), row_dim=8,
    )  # fmt: skip
    attachment = add_engram(model, resolve(config, tokenizer=tok), tok)
    layer = next(model.model.layers[1].parameters())
    for p in attachment.modules[1].parameters():
        assert p.device == layer.device and p.dtype == torch.bfloat16
    with torch.no_grad():
        assert model(torch.tensor([list(range(3, 20))])).logits.isfinite().all()


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "datasets"])
def test_a_pretrained_model_trains_on_records(corpus, base, tmp_path, kind):
    """The data of a fine-tune as users hold it: JSONL, Parquet, or a `save_to_disk` folder."""
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(corpus.iterdir())]
    if kind == "jsonl":
        source = tmp_path / "data.jsonl"
        source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    elif kind == "parquet":
        pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
        source = tmp_path / "data.parquet"
        pq.write_table(pa.table({"text": texts}), source)
    else:
        datasets = pytest.importorskip("datasets")
        source = tmp_path / "saved"
        datasets.Dataset.from_dict({"text": texts}).save_to_disk(source)
    data = f"hf:{source}" if kind == "datasets" else str(source)
    argv = _argv(Path(data), base, tmp_path / "run")
    summary = _summary(["train", *argv, "steps=2", "eval_every=2"])
    assert math.isfinite(summary["val_loss"])
    recorded = json.loads((tmp_path / "run" / "data.json").read_text())
    assert recorded["train"]["documents"] + recorded["val"]["documents"] == len(texts)
