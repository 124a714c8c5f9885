"""`engram study long-context`: needles land where asked, once, with well-formed queries; exact
retrieval scores a perfect retriever 1 and a wrong one 0; the quick study writes its report."""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engram.cli import main
from engram.data import read_texts, stdlib_files
from engram.experiments.long_context import QUICK, LongContextConfig
from engram.experiments.needles import (
    Composed,
    Filler,
    NeedleMix,
    draw_needles,
    make_probe,
    probe_set,
    run_probes,
    score,
    token_position,
    write_training_corpus,
)
from engram.tokenizer import Tokenizer, train_bpe

LENGTHS, DEPTHS = (128, 256), (0.1, 0.5, 0.9)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return list(read_texts(stdlib_files(max_files=30)))


@pytest.fixture(scope="module")
def tok(texts) -> Tokenizer:
    return train_bpe(texts, vocab_size=1024)  # byte-level, as the study's `bpe:N`


@pytest.fixture(scope="module")
def filler(texts, tok) -> Filler:
    return Filler.from_texts(texts, tok, max_lines=20_000)


@pytest.fixture(scope="module")
def probes(tok, filler):
    return probe_set(tok, filler, LENGTHS, DEPTHS, count=3, samples=4, seed=0)


def test_needles_are_distinct_and_formatted():
    needles = draw_needles(random.Random(0), 5)
    assert len({n.key for n in needles}) == len({n.value for n in needles}) == 5
    for n in needles:
        assert n.key.startswith("KEY_") and len(n.value) == 4 and n.value.isdigit()
        assert n.value not in n.key
        assert n.assignment() == f'{n.key} = "{n.value}"\n'
        assert n.query() == f'{n.key} == "'
    with pytest.raises(ValueError, match=r"needles=0"):
        draw_needles(random.Random(0), 0)


def test_a_key_is_the_same_tokens_in_its_needle_and_in_its_query(tok):
    # What a small model can learn to match: one spelling of the key, not two.
    for n in draw_needles(random.Random(1), 20):
        key = tok.encode(n.key)
        for line in (n.assignment(), n.query()):
            assert tok.encode("x\n" + line)[-len(tok.encode(line)) :][: len(key)] == key


def test_probes_have_the_length_and_depth_asked_for(probes):
    assert len(probes) == len(LENGTHS) * len(DEPTHS) * 4
    for p in probes:
        assert len(p.ids) == p.length and p.length in LENGTHS
        assert 0 <= p.needle_start < p.values[0][0]
    # In haystack tokens: the sizing corrects its estimates to about a token, the needles' own
    # count is measured apart from the context (a token more), and a truncated line can land a
    # few tokens off (measured: 5 at most, 1 on average, over 180 probes of two tokenizers).
    misses = [abs(p.depth - p.target_depth) * p.haystack for p in probes]
    assert max(misses) <= 5.5 and sum(misses) / len(misses) <= 1.5, misses
    for length in LENGTHS:
        starts = {
            d: [p.needle_start for p in probes if (p.length, p.target_depth) == (length, d)]
            for d in DEPTHS
        }
        assert max(starts[0.1]) < min(starts[0.5]) <= max(starts[0.5]) < min(starts[0.9])


def test_each_value_appears_once_and_each_query_is_well_formed(probes, tok):
    for p in probes:
        text = tok.decode(p.ids)
        assert text.endswith('"\n')
        for s, e in p.values:
            value = tok.decode(p.ids[s:e])
            assert len(value) == 4 and value.isdigit()
            before = tok.decode(p.ids[:s])
            key = before.rsplit("\n", 1)[1]  # the query's line, up to its value
            assert key.startswith("KEY_") and key.endswith(' == "'), key
            key = key[: -len(' == "')]
            assert tok.decode(p.ids[e : e + 1]).startswith('"')
            # Once in its needle, once as the answer to its query: nowhere else.
            assert text.count(value) == 2 and text.count(key) == 2
            assert f'{key} = "{value}"\n' in text


def test_probes_are_deterministic_given_the_seed(tok, filler, probes):
    again = probe_set(tok, filler, LENGTHS, DEPTHS, count=3, samples=4, seed=0)
    assert again == probes
    other = probe_set(tok, filler, LENGTHS, DEPTHS, count=3, samples=4, seed=1)
    assert [p.ids for p in other] != [p.ids for p in probes]


def test_bad_probe_requests_are_value_errors(tok, filler):
    with pytest.raises(ValueError, match="no room for corpus text"):
        make_probe(tok, filler, count=4, length=40, depth=0.5, rng=random.Random(0))
    with pytest.raises(ValueError, match=r"depth=1\.5"):
        make_probe(tok, filler, count=1, length=128, depth=1.5, rng=random.Random(0))


def test_a_tokenizer_merging_across_a_boundary_is_refused():
    class Pairs:  # "tokens" of two characters: every odd boundary falls inside one
        name = "pairs"

        def encode(self, text: str) -> list[int]:
            return [hash(text[i : i + 2]) for i in range(0, len(text), 2)]

    composed = Composed('a = "1"\n', 0, 8, ((5, 6),), (0,))
    ids = Pairs().encode(composed.text)
    assert token_position(Pairs(), composed, ids, 4) == 2
    with pytest.raises(ValueError, match="merges tokens across a needle boundary"):
        token_position(Pairs(), composed, ids, 5)


# ---- scoring -------------------------------------------------------------------------------------
def _one_hot(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    return F.one_hot(ids, vocab).float()  # [B, T, V]


def test_a_perfect_retriever_scores_one_and_a_wrong_one_zero(probes, tok):
    vocab = tok.vocab_size
    perfect = lambda ids: _one_hot(ids.roll(-1, dims=1), vocab)  # noqa: E731 - the next token
    echo = lambda ids: _one_hot(ids, vocab)  # noqa: E731 - repeats the current token: never right
    cpu = torch.device("cpu")
    right = run_probes(perfect, probes, batch_size=5, device=cpu)
    assert len(right) == 3 * len(probes)
    assert all(r["exact"] and r["tokens"] == 1.0 for r in right)
    wrong = run_probes(echo, probes, batch_size=5, device=cpu)
    assert not any(r["exact"] for r in wrong)
    assert {r["length"] for r in right} == set(LENGTHS)


def test_one_wrong_value_token_fails_the_query(probes, tok):
    probe = next(p for p in probes if all(e - s >= 2 for s, e in p.values))
    ids = torch.tensor([probe.ids])
    logits = _one_hot(ids.roll(-1, dims=1), tok.vocab_size)
    s, e = probe.values[0]
    wrong = (probe.ids[e - 1] + 1) % tok.vocab_size
    logits[0, e - 2] = _one_hot(torch.tensor(wrong), tok.vocab_size)  # the last value token
    first, *rest = score(logits, [probe])[0]
    assert first == (False, (e - s - 1) / (e - s))
    assert all(r == (True, 1.0) for r in rest)


# ---- the training corpus -------------------------------------------------------------------------
def test_training_corpus_mixes_needles_into_the_text(tmp_path, texts, tok):
    mix = NeedleMix(count=2, lengths=(128, 256), share=0.5)
    path = tmp_path / "corpus.jsonl"
    stats = write_training_corpus(path, tok, texts, mix, max_tokens=60_000, seed=0)
    records = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert len(records) == stats["documents"] and 60_000 <= stats["tokens"] < 120_000
    query_line = re.compile(r'^KEY_\d{4} == "\d{4}"$', re.MULTILINE)
    with_needles = [r for r in records if query_line.search(r)]
    assert len(with_needles) == stats["needle_documents"] > 0
    assert 0.3 < stats["needle_tokens"] / stats["tokens"] < 0.8
    for text in with_needles:
        queries = query_line.findall(text)
        assert len(queries) == 2 and text.endswith('"\n')
        for q in queries:
            key, value = q.split(' == "')
            assert f'{key} = "{value[:-1]}"\n' in text  # each query answers a needle above it
    path2 = tmp_path / "again.jsonl"
    write_training_corpus(path2, tok, texts, mix, max_tokens=60_000, seed=0)
    assert path2.read_text() == path.read_text()


# ---- the study -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, message",
    [
        ({"lengths": (128, 512)}, "exceeds the arms' context"),
        ({"depths": (0.5, 1.2)}, "depths"),
        ({"needles": 0}, "needles=0"),
        ({"needle_share": 0.0}, "needle_share"),
        ({"rho": 1.0}, "rho"),
        ({"overrides": ("data=stdlib",)}, "--set data"),
    ],
)
def test_bad_study_configs_are_value_errors(change, message):
    with pytest.raises(ValueError, match=message):
        replace(QUICK, **change).validate()
    LongContextConfig().validate()  # the defaults fit the demo preset's context


def test_quick_study_writes_the_report(tmp_path, monkeypatch, capsys, stdlib_corpus):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "quick"
    argv = ["study", "long-context", "--quick", "--data", str(stdlib_corpus(60)), "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["arms"]) == {"moe", "engram", "dense"}
    for arm in report["arms"].values():
        assert len(arm["exact"]) == len(QUICK.lengths) and len(arm["exact"][0]) == len(QUICK.depths)
        assert 0.0 <= arm["accuracy"] <= 1.0 and arm["queries_per_seed"] == 16
    moe, engram = report["arms"]["moe"], report["arms"]["engram"]
    assert engram["table_params"] > 0 and moe["p_tot"] == pytest.approx(engram["p_tot"], rel=0.01)
    assert {c["verdict"] for c in report["comparisons"]} == {"unresolved"}  # one seed
    assert (out / "long_context.png").stat().st_size > 1000
    text = (out / "report.md").read_text()
    assert "84.2" in text and "97.0" in text and "attention-only control" in text
    capsys.readouterr()
    assert main(argv) == 0  # a second run reuses the corpus and the finished arms
    assert capsys.readouterr().out.count("reusing the finished run") == 3
    assert len(list(Path(out).glob("corpus-*.jsonl"))) == 1
