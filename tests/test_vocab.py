"""Tokenizer loading and compression: the demo's normalisation rules, caching, fingerprints."""

from __future__ import annotations

import numpy as np
import pytest

import engram.vocab as vocab_module
from engram.tokenizer import load_tokenizer, train_bpe
from engram.vocab import CompressedVocab, _normalizer, build_lookup, canonical_key, compress


def test_deepseek_tokenizer_has_129280_ids(deepseek):
    assert deepseek.vocab_size == 129_280
    assert deepseek.eos_id == 1
    assert len(deepseek.fingerprint) == 64


def test_fingerprint_is_stable_across_loads(deepseek):
    assert load_tokenizer("deepseek").fingerprint == deepseek.fingerprint


def test_deepseek_compression_matches_paper_scale(deepseek_vocab):
    # The paper reports 23.43% for DeepSeek-V3's tokenizer; the packaged tokenizer is a later one
    # with the same 129,280 ids, so we expect the same scale, not the same digits.
    assert deepseek_vocab.size == 99_092
    assert 0.22 < deepseek_vocab.reduction < 0.25
    assert deepseek_vocab.lookup.shape == (129_280,)


def test_map_is_surjective_and_first_occurrence_ordered(deepseek_vocab):
    lookup = deepseek_vocab.lookup
    assert set(np.unique(lookup)) == set(range(deepseek_vocab.size))
    # New ids are handed out in order of first occurrence: the first time each canonical id
    # appears, it equals the running maximum + 1.
    running_max = np.maximum.accumulate(lookup)
    firsts = np.unique(lookup, return_index=True)[1]
    assert np.array_equal(lookup[firsts], np.arange(deepseek_vocab.size))
    assert np.all(np.diff(running_max) <= 1)


def test_normalisation_merges_case_accents_and_spaces(deepseek, deepseek_vocab):
    def canon(text):
        ids = deepseek.encode(text)
        assert len(ids) == 1, f"{text!r} is not one token: {ids}"
        return int(deepseek_vocab.lookup[ids[0]])

    assert canon(" Apple") == canon(" apple") == canon("apple")
    assert canon("Hello") == canon("hello")


def test_normaliser_rules_match_the_demo():
    norm = _normalizer()
    assert norm.normalize_str("  Héllo\t\nWORLD  ") == "hello world"
    assert norm.normalize_str("\n\n") == " "  # whitespace-only stays a single space
    assert norm.normalize_str("ﬁ") == "fi"  # NFKC ligature


class _FakeTokenizer:
    """Decodes ids to fixed strings, to pin each branch of the key rule."""

    def __init__(self, texts, raw):
        self.texts, self.raw = texts, raw
        self.vocab_size = len(texts)
        self.fingerprint = "fake"

    def decode(self, ids):
        return self.texts[ids[0]]

    def id_to_token(self, i):
        return self.raw[i]


def test_key_rules_replacement_char_and_empty():
    tok = _FakeTokenizer(
        ["A", "a", "\ufffd", "\ufffd", "\u0301", " "], ["A", "a", "<0xE2>", "<0xE3>", "acc", "sp"]
    )
    norm = _normalizer()
    # U+FFFD keys on the raw token string, so two partial bytes stay distinct.
    assert canonical_key(tok, 2, norm) == "<0xE2>"
    assert canonical_key(tok, 3, norm) == "<0xE3>"
    # A lone combining accent normalises to "", so it keeps its decoded text.
    assert canonical_key(tok, 4, norm) == "\u0301"
    lookup, keys = build_lookup(tok)
    assert lookup.tolist() == [0, 0, 1, 2, 3, 4]
    assert keys[-1] == " "


def test_cache_roundtrip_and_corrupt_cache_is_rebuilt(tmp_path, monkeypatch, deepseek):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path))
    builds = []
    real = vocab_module.build_lookup
    monkeypatch.setattr(vocab_module, "build_lookup", lambda tok: builds.append(1) or real(tok))
    first = CompressedVocab.build(deepseek)
    files = list((tmp_path / "vocab").glob("*.safetensors"))
    assert len(files) == 1 and len(builds) == 1
    again = CompressedVocab.build(deepseek)
    assert len(builds) == 1  # served from the cache, not rebuilt
    assert np.array_equal(again.lookup, first.lookup) and again.size == first.size
    data = bytearray(files[0].read_bytes())
    data[-3] ^= 0x01  # one flipped bit in the map itself: still a readable file
    files[0].write_bytes(bytes(data))
    flipped = CompressedVocab.build(deepseek)
    assert len(builds) == 2 and np.array_equal(flipped.lookup, first.lookup)
    files[0].write_bytes(b"not a safetensors file")
    rebuilt = CompressedVocab.build(deepseek)
    assert len(builds) == 3 and np.array_equal(rebuilt.lookup, first.lookup)


def test_identity_map_when_compression_is_off(deepseek):
    vocab = compress(deepseek, enabled=False)
    assert vocab.size == deepseek.vocab_size and not vocab.compressed
    assert vocab.reduction == 0.0


def test_groups_lists_largest_merges(deepseek, deepseek_vocab):
    groups = deepseek_vocab.groups(deepseek, top=3)
    assert len(groups) == 3
    assert groups[0]["size"] >= groups[1]["size"] >= groups[2]["size"] >= 2


def test_train_bpe_and_load_from_path(tmp_path):
    texts = ["def f(x):\n    return x + 1\n"] * 50 + ["class A:\n    pass\n"] * 50
    tok = train_bpe(texts, vocab_size=300)
    assert tok.eos_id is not None and tok.pad_id is not None
    assert tok.decode(tok.encode("def f(x):")) == "def f(x):"
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    loaded = load_tokenizer(path)
    assert loaded.fingerprint == tok.fingerprint
    assert load_tokenizer(tmp_path).eos_id == tok.eos_id  # a folder holding tokenizer.json
    vocab = compress(loaded, use_cache=False)
    assert 0 < vocab.size <= loaded.vocab_size


def test_unknown_tokenizer_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown tokenizer 'no/such-model'"):
        load_tokenizer("no/such-model")


def test_corrupt_tokenizer_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="could not load tokenizer file"):
        load_tokenizer(bad)


def test_bpe_vocab_too_small():
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe(["x"], vocab_size=100)
