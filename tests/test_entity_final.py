"""Entity-final tokens (the positions the paper's CKA reads) and the layerwise studies' pairs
trained from a preset (`--preset demo-deep --seeds 0,1 --tokens entity-final`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engram.cli import main
from engram.experiments.layerwise import mean_over_pairs, selections_of
from engram.experiments.token_kinds import entity_final_document, entity_final_stream
from engram.model import model_preset


def _chosen(pieces: list[str]) -> list[str]:
    return [p for p, c in zip(pieces, entity_final_document(pieces), strict=True) if c]


def test_the_last_piece_of_each_identifier_and_string_literal():
    pieces = ["def", " foo", "_bar", "(", "x", "):", "\n   ", " return", ' "', "hel", "lo", '"']
    pieces += [" +", " y", "\n", "if", " z", ":", " pass", "\n"]
    # Keywords (def, return, if, pass) are not identifiers; `foo_bar` ends at "_bar" and the
    # string literal at its closing quote.
    assert _chosen(pieces) == ["_bar", "x", '"', " y", " z"]
    # A piece that closes a string and opens a bracket still ends the literal; blanks never do.
    assert _chosen(["f", "(", '"', "a", '")', "\n"]) == ["f", '")']


def test_entities_the_lexer_never_closes_are_not_chosen():
    # A document cut inside a triple-quoted string: the names before it keep their ends.
    assert _chosen(["a", " =", " b", "\n", "c", ' = """', "doc", " x", "\n"]) == ["a", " b", "c"]
    # An inconsistent dedent stops the lexer: what it read before stays chosen.
    assert _chosen(["if", " x", ":\n", "    a", "\n", "  b", "\n"]) == [" x", "    a"]


def test_a_stream_is_split_into_documents_at_eos():
    pieces = ["<eos>", "x", "y", " =", " 1", "\n"]  # ids 0..5; "xy" is one identifier
    tokens = np.array([1, 2, 3, 4, 5, 0, 1, 3, 4, 0, 2])
    chosen = entity_final_stream(tokens, pieces, eos_id=0)
    # Document 1: "xy = 1\n" -> "y"; document 2: "x =" -> "x"; document 3: "y" -> "y"; EOS never.
    assert np.flatnonzero(chosen).tolist() == [1, 6, 10]


def test_real_tokenizer_pieces_end_where_the_entities_end(small_tok):
    text = 'def foo_bar(x):\n    return "hello" + x\n'
    ids = small_tok.encode(text)
    pieces = [small_tok.decode([i]) for i in range(small_tok.vocab_size)]
    assert "".join(pieces[i] for i in ids) == text  # the offsets below count these pieces
    chosen = entity_final_stream(np.array(ids), pieces, small_tok.eos_id)
    ends = np.cumsum([len(pieces[i]) for i in ids])  # the character after each piece
    entity_ends = [text.index(s) + len(s) for s in ("foo_bar", "(x", '"hello"', "+ x")]
    # Each chosen piece holds an entity's last character: foo_bar, x, "hello", x.
    assert ends[chosen].tolist() == entity_ends


def test_mean_over_pairs_and_selections():
    a = {"tokens": 7, "layers": [0, 1], "kl": [1.0, 3.0], "note": None}
    b = {"tokens": 7, "layers": [0, 1], "kl": [2.0, 5.0], "note": None}
    assert mean_over_pairs([a, b]) == {
        "tokens": 7,
        "layers": [0, 1],
        "kl": [1.5, 4.0],
        "note": None,
    }
    assert selections_of("all") == ("all",)
    assert selections_of("entity-final") == ("all", "entity-final")
    with pytest.raises(ValueError, match="--tokens 'names'"):
        selections_of("names")


# ---- the studies on pairs trained from a preset -------------------------------------------------
@pytest.fixture(scope="module")
def deep(tmp_path_factory, stdlib_corpus):
    """Both studies on `demo-deep` pairs of two seeds (2 steps each), sharing their models."""
    root = tmp_path_factory.mktemp("deep")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_CACHE_DIR", str(root / "cache"))
        corpus, models = stdlib_corpus(60), root / "models"
        common = ["--quick", "--preset", "demo-deep", "--seeds", "0,1", "--steps", "2"]
        common += ["--tokens", "entity-final", "--data", str(corpus), "--models", str(models)]
        for study in ("logit-lens", "cka"):
            argv = ["study", study, *common, "--out", str(root / study)]
            assert main([*argv, *(["--minibatch", "64"] if study == "cka" else [])]) == 0
        yield {"root": root, "models": models, "corpus": corpus}


def _report(deep: dict, study: str) -> dict:
    return json.loads((deep["root"] / study / "report.json").read_text())


def test_preset_pairs_are_the_demo_arms_of_each_seed(deep):
    report = _report(deep, "logit-lens")
    models = report["models"]
    assert models["engram"]["n_layers"] == models["baseline"]["n_layers"] == 8
    assert models["engram"]["engram_layers"] == [1] and models["baseline"]["engram_layers"] == []
    # The iso-parameter plan: P_tot within one expert, P_act up to Engram's dense weights.
    assert abs(models["engram"]["p_tot"] / models["baseline"]["p_tot"] - 1) < 0.01
    assert report["config"]["seeds"] == [0, 1] and len(report["per_seed"]) == 2
    for seed in (0, 1):
        for arm in ("engram", "moe"):
            assert (deep["models"] / f"seed-{seed}" / arm / "summary.json").is_file()
    # cka reused the runs logit-lens trained: the same seeds, no second training.
    assert _report(deep, "cka")["per_seed"][1]["paths"] == report["per_seed"][1]["paths"]


def test_logit_lens_reports_both_selections_and_their_seed_mean(deep):
    report = _report(deep, "logit-lens")
    entity = report["entity_final"]
    assert 0 < entity["tokens"] < report["tokens"]
    seeds = report["per_seed"]
    for part, per_seed in ((report, seeds), (entity, [s["entity_final"] for s in seeds])):
        for arm in ("engram", "baseline"):
            assert len(part[arm]["kl"]) == 9 and abs(part[arm]["kl"][-1]) < 1e-5
            kls = torch.tensor([s[arm]["kl"] for s in per_seed], dtype=torch.float64)
            assert part[arm]["kl"] == pytest.approx(kls.mean(dim=0).tolist(), rel=1e-12)
            spread = (kls.max(dim=0).values - kls.min(dim=0).values).tolist()
            assert part[arm]["kl_spread"] == pytest.approx(spread, rel=1e-12, abs=1e-15)
        assert part["comparison"]["inner_layers"] == list(range(1, 8))
    text = (deep["root"] / "logit-lens" / "report.md").read_text()
    assert "Ours (entity-final tokens):" in text and "### Entity-final tokens" in text


def test_cka_reports_both_selections(deep):
    report = _report(deep, "cka")
    entity = report["entity_final"]
    assert entity["tokens"] == entity["minibatches"] * 64 and len(entity["cka"]) == 9
    assert len(entity["alignment"]) == 9 and entity["self_cka_diagonal_max_error"] < 1e-9
    assert report["config"]["tokens"] == "entity-final"
    assert "## Entity-final tokens" in (deep["root"] / "cka" / "report.md").read_text()


def test_bad_pair_flags_exit_2(deep, tmp_path, capsys, granularity_report):
    engram = str(deep["models"] / "seed-0" / "engram")
    assert main(["study", "cka", "--quick", "--seeds", "0,1"]) == 2  # seeds without --preset
    argv = ["study", "logit-lens", "--preset", "demo-deep", "--ckpt", engram]
    assert main([*argv, "--baseline-ckpt", engram]) == 2  # a preset to train and checkpoints
    assert main(["study", "logit-lens", "--preset", "nope", "--out", str(tmp_path)]) == 2
    # --baseline is a granularity report for the pair trained here: not for checkpoints, and
    # only for the preset it swept (the demo's experts are not demo-deep's).
    report = granularity_report(model_preset("demo").moe)
    argv = ["study", "cka", "--ckpt", engram, "--baseline-ckpt", engram, "--baseline", str(report)]
    assert main(argv) == 2
    argv = ["study", "cka", "--preset", "demo-deep", "--baseline", str(report)]
    assert main([*argv, "--models", str(tmp_path / "m"), "--out", str(tmp_path / "c")]) == 2
    assert "not 'demo-deep'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's own exit 2
        main(["study", "cka", "--quick", "--tokens", "names"])
    # A text with no identifier or string in its first tokens has no entity-final position.
    prose = tmp_path / "prose"
    prose.mkdir()
    for i in range(40):  # enough documents for a validation split
        (prose / f"{i}.txt").write_text(". , ; " * 200)
    argv = [
        "study",
        "logit-lens",
        "--ckpt",
        engram,
        "--baseline-ckpt",
        engram,
        "--data",
        str(prose),
    ]
    capsys.readouterr()
    assert main([*argv, "--tokens", "entity-final", "--out", str(tmp_path / "o")]) == 2
    assert "no entity-final tokens" in capsys.readouterr().err
