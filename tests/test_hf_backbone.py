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
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from small_runs import BASE
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from engram.assembly import get_tokenizer
from engram.checkpoint import read_manifest
from engram.cli import main
from engram.hf.tiny import main as tiny_main
from engram.inference import SamplingConfig, generate
from engram.inference.load import load_trained

IN_FLIGHT = shutil.ignore_patterns(".trash-*")  # deletions still running in the background
RUN = [a for a in BASE if not a.startswith("tokenizer=")] + ["steps=6", "eval_every=3"]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def save_base(folder: Path, corpus: Path, family: str = "llama") -> Path:
    """A small randomly initialised decoder and its tokenizer, as `save_pretrained` writes them."""
    tok = get_tokenizer("bpe:400", str(corpus))
    torch.manual_seed(0)
    if family == "gpt2":  # a family the trainer does not support
        ids = {"bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id}
        config = GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=4, **ids)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
            bos_token_id=None,
        )
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tok.save(folder / "tokenizer.json")
    return folder


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


def test_base_train_freezes_what_it_does_not_name(corpus, base, tmp_path):
    before = load_file(str(base / "model.safetensors"))
    out = tmp_path / "frozen"
    _summary(["train", *_argv(corpus, base, out, "base.train=none")])
    after = _weights(out)
    for name, value in before.items():
        assert torch.equal(after[f"hf.{name}"], value), name  # the backbone as pretrained
    engram = [k for k in after if ".engram." in k and "value_proj.weight" in k]
    assert engram and all(after[k].abs().sum() > 0 for k in engram)  # Engram trained
    out = tmp_path / "some"
    _summary(["train", *_argv(corpus, base, out, "base.train=model.layers.2.*")])
    after = _weights(out)
    changed = {k for k, v in before.items() if not torch.equal(after[f"hf.{k}"], v)}
    assert changed and all(k.startswith("model.layers.2.") for k in changed)


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
