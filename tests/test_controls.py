"""`engram study controls`: the table controls train and evaluate what they claim to."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from engram.cli import main
from engram.data import Batch
from engram.experiments.control_arms import CONTROLS, random_rows, shuffled_table
from engram.experiments.controls import QUICK, ControlsConfig
from engram.experiments.token_kinds import classify_pieces, classify_stream, group_table
from engram.inference.load import load_trained
from engram.model import model_preset
from engram.spec import HashSpec
from engram.train import train


def _batch(ids: torch.Tensor, epoch: int = 0, index: int = 0) -> Batch:
    return Batch(ids, ids, None, epoch, index, ids.numel())


def test_capacity_one_reads_one_row_per_head(tiny_spec: HashSpec):
    ids = torch.randint(0, 1000, (3, 17))
    rows = CONTROLS["capacity-1"].address(_batch(ids), tiny_spec, 0).rows
    for layer in tiny_spec.layer_ids:
        r = rows[layer]  # [B, T, H]
        assert r.shape == (3, 17, tiny_spec.heads_total)
        assert (r == r[:1, :1]).all()  # one address per head, whatever the N-gram


def test_random_rows_ignore_the_tokens(tiny_spec: HashSpec):
    control = CONTROLS["random-rows"]
    a, b = torch.randint(0, 1000, (2, 4, 32))  # two different token batches, same position
    rows_a = control.address(_batch(a, 1, 5), tiny_spec, 0).rows
    rows_b = control.address(_batch(b, 1, 5), tiny_spec, 0).rows
    elsewhere = control.address(_batch(a, 1, 6), tiny_spec, 0).rows
    for layer in tiny_spec.layer_ids:
        primes = torch.tensor(tiny_spec.layer_primes(layer))
        assert torch.equal(rows_a[layer], rows_b[layer])
        assert not torch.equal(rows_a[layer], elsewhere[layer])  # but they move with the stream
        assert (rows_a[layer] >= 0).all() and (rows_a[layer] < primes).all()
        assert rows_a[layer][..., 0].unique().numel() > 10  # spread over the head's rows
    with pytest.raises(ValueError, match="non-negative"):
        random_rows(tiny_spec, 1, 1, (-1,))


def test_shuffle_permutes_rows_within_each_head(tiny_spec: HashSpec):
    layer = tiny_spec.layer_ids[0]
    weight = torch.randn(tiny_spec.layer_rows(layer), tiny_spec.row_dim)
    shuffled = shuffled_table(weight, tiny_spec, layer, seed=0)
    assert not torch.equal(shuffled, weight)
    assert torch.equal(shuffled, shuffled_table(weight, tiny_spec, layer, seed=0))
    offsets, primes = tiny_spec.layer_offsets(layer), tiny_spec.layer_primes(layer)
    for o, p in zip(offsets, primes, strict=True):
        head, mixed = weight[o : o + p], shuffled[o : o + p]
        assert torch.equal(head[:, 0].sort().values, mixed[:, 0].sort().values)


def test_token_kinds_on_hand_made_pieces():
    pieces = ["def", " foo", "_bar", "(", "x", "):", "\n   ", " return", " 4", "2", "  #", " hi"]
    pieces += ["\n", "s", " =", ' "', "a", " ", 'b"', "\n", "wh", "ile", " x", ":", " pass", "\n"]
    assert classify_pieces(pieces) == [
        "keyword",
        "name-start",
        "name-cont",
        "operator",
        "name-start",
        "operator",
        "whitespace",
        "keyword",
        "number",
        "number",
        "comment",
        "comment",
        "whitespace",
        "name-start",
        "operator",
        "string",
        "string",
        "string",  # a blank inside a string literal belongs to it
        "string",
        "whitespace",
        "keyword",  # a keyword split into pieces stays a keyword
        "keyword",
        "name-start",
        "operator",
        "keyword",
        "whitespace",
    ]
    # Where the lexer gives up (an inconsistent dedent), a character heuristic takes over.
    pieces = ["if", " x", ":\n", "    a", "\n", "  b", "c", " 12", " ;", "\n"]
    assert classify_pieces(pieces) == [
        "keyword",
        "name-start",
        "operator",
        "name-start",
        "whitespace",
        "name-start",
        "name-cont",
        "number",
        "operator",
        "whitespace",
    ]


def test_stream_kinds_split_documents_and_group():
    pieces = ["<eos>", "x", " =", " 1", "\n", '"""', "doc"]
    tokens = np.array([1, 2, 3, 4, 0, 5, 6, 0, 1])
    kinds, words = classify_stream(tokens, pieces, eos_id=0)
    assert kinds.tolist() == [1, 4, 3, 7, 8, 5, 5, 8, 1]  # EOS is "other" (8)
    assert words.tolist() == [0, 2, 0, 2, 2, 2, 0, 2, 0]
    on = np.array([np.nan, 1.0, 2.0, 1.0, 1.0, 3.0, 3.0, 1.0, 1.0])
    table = group_table(kinds, ("a", "b"), {"on": on, "off": on + 0.5}, np.full(9, 3.0))
    assert [r["kind"] for r in table] == ["a", "b", "all"]
    b, total = table[1], table[2]
    assert b["tokens"] == 1 and b["loss_on"] == 1.0 and b["increase"] == 0.5
    assert b["retained"] == pytest.approx((3.0 - 1.5) / (3.0 - 1.0))
    assert total["tokens"] == 8 and table[0]["tokens"] == 0 and table[0]["loss_on"] is None


def test_bad_config():
    with pytest.raises(ValueError, match="arms"):
        ControlsConfig(arms=("reference", "nope")).validate()
    with pytest.raises(ValueError, match="seeds"):
        ControlsConfig(seeds=()).validate()
    assert main(["study", "controls", "--arms", "zero"]) == 2


def test_quick_study_trains_every_control(tmp_path, monkeypatch, capsys, stdlib_corpus):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path / "cache"))
    corpus = stdlib_corpus(60)
    out = tmp_path / "controls"
    argv = ["study", "controls", "--quick", "--data", str(corpus), "--out", str(out)]
    argv += ["--steps", "3", "--eval-tokens", "4096"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    arms = report["arms"]
    assert list(arms) == list(CONTROLS)
    assert all(math.isfinite(a["val_loss"]) for a in arms.values())
    assert arms["no-engram"]["table_params"] == 0 < arms["reference"]["table_params"]
    assert arms["zero-table"]["trained_table_params"] == 0
    assert arms["capacity-1"]["trained_table_params"] == 8 * 16  # 8 heads of one 16-dim row

    # The control loop trains the reference exactly as `engram.train.train` would.
    template = replace(QUICK.train, steps=3, eval_tokens=4096, data=str(corpus))
    plain = train(replace(QUICK, train=template).arm(model_preset("demo"), 0, tmp_path / "plain"))
    assert plain["val_loss"] == arms["reference"]["val_loss"]

    # zero-table: the table never left zero, while the rest of its Engram trained.
    model = load_trained(out / "seed-0" / "zero-table").model
    (engram,) = model.engram_layers
    assert not engram.table.weight.any()
    assert engram.value_proj.bias.abs().max() > 0  # initialised at zero
    assert (engram.key_norm.weight != 1).any()  # initialised at one
    assert engram.conv.conv.weight.abs().max() > 0  # initialised at zero

    ev = report["eval"]
    assert ev["ckpt"].startswith(str(out / "seed-0" / "reference"))
    # The per-token evaluation scores the very tokens and windows the training run validated on.
    assert ev["loss"]["on"] == pytest.approx(arms["reference"]["val_loss"], abs=1e-5)
    assert abs(ev["loss"]["shuffled"] - ev["loss"]["on"]) > 1e-6
    assert abs(ev["loss"]["zeroed"] - ev["loss"]["on"]) > 1e-6
    kinds = {r["kind"]: r for r in ev["kinds"]}
    assert kinds["all"]["tokens"] == ev["scored"] == sum(r["tokens"] for r in ev["kinds"][:-1])
    assert kinds["name-start"]["tokens"] > 0 and kinds["string"]["tokens"] > 0
    assert (out / "controls.png").stat().st_size > 1000
    assert "Sensitivity by token kind" in (out / "report.md").read_text()

    # --ckpt runs only the evaluation-time controls, and only on a content-addressed run.
    evaluated = tmp_path / "evaluated"
    ckpt = ["study", "controls", "--quick", "--eval-tokens", "4096", "--out", str(evaluated)]
    assert main([*ckpt, "--ckpt", str(out / "seed-0" / "random-rows")]) == 2
    assert main([*ckpt, "--ckpt", str(out / "seed-0" / "reference")]) == 0
    again = json.loads((evaluated / "report.json").read_text())
    assert again["arms"] is None and again["eval"]["loss"] == ev["loss"]

    # A rerun reads the finished arms back instead of training them again.
    capsys.readouterr()
    assert main([*argv, "--arms", "zero-table,no-engram"]) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == 2
    rerun = json.loads((out / "report.json").read_text())
    assert rerun["eval"] is None
    assert rerun["arms"]["zero-table"]["val_loss"] == arms["zero-table"]["val_loss"]
