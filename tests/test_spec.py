"""Hash specs: the demo's derivations, presets, JSON round trips, golden files, validation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from sympy import isprime

from engram.spec import PRESETS, HashSpec, SpecConfig, derive_primes, preset, resolve

GOLDEN = Path(__file__).parent / "golden"


def demo_multipliers(seed, layer_id, max_ngram, vocab):
    """Written from the demo's NgramHashMapping.__init__, independently of engram.spec."""
    half_bound = max(1, int(np.iinfo(np.int64).max // vocab) // 2)
    g = np.random.default_rng(int(seed + 10007 * int(layer_id)))
    return (g.integers(low=0, high=half_bound, size=(max_ngram,), dtype=np.int64) * 2 + 1).tolist()


def demo_primes(layer_ids, max_ngram, vocab_sizes, heads):
    """The demo's calculate_vocab_size_across_layers with a linear prime search."""
    seen, out = set(), {}
    for layer in layer_ids:
        sizes = []
        for n in range(2, max_ngram + 1):
            start = vocab_sizes[n - 2] - 1
            for _ in range(heads):
                candidate = start + 1
                while not (isprime(candidate) and candidate not in seen):
                    candidate += 1
                seen.add(candidate)
                sizes.append(candidate)
                start = candidate
        out[layer] = sizes
    return out


def test_demo_v1_multipliers_and_primes_match_the_demo(demo_spec):
    want_primes = demo_primes([1, 15], 3, [129280 * 5] * 2, 8)
    for layer in (1, 15):
        assert list(demo_spec.layer_primes(layer)) == want_primes[layer]
        assert list(demo_spec.layer_multipliers(layer)) == demo_multipliers(0, layer, 3, 99_092)
        assert all(m % 2 == 1 for m in demo_spec.layer_multipliers(layer))


def test_primes_are_unique_across_layers_orders_and_heads():
    primes = derive_primes((1, 14), (2, 3, 4), 8, (16_000_000,) * 3)
    flat = [p for layer in primes for p in layer]
    assert len(flat) == len(set(flat)) == 48
    assert all(isprime(p) and p >= 16_000_000 for p in flat)
    assert flat == sorted(flat)  # the upward search visits them in increasing order


def test_offsets_and_rows(tiny_spec):
    primes = tiny_spec.layer_primes(0)
    offsets = tiny_spec.layer_offsets(0)
    assert offsets[0] == 0 and offsets[1] == primes[0]
    assert tiny_spec.layer_rows(0) == sum(primes) == offsets[-1] + primes[-1]
    assert tiny_spec.d_mem == tiny_spec.heads_total * tiny_spec.row_dim == 4 * 8


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_match_golden_files(name, deepseek, deepseek_vocab):
    spec = resolve(name, tokenizer=deepseek, vocab=deepseek_vocab)
    golden = json.loads((GOLDEN / f"spec-{name}.json").read_text())
    assert spec.to_dict() == golden, f"preset {name} no longer derives its golden spec"


def test_paper_numbers_of_presets(deepseek, deepseek_vocab):
    paper = resolve("paper-27b", tokenizer=deepseek, vocab=deepseek_vocab)
    assert paper.d_mem == 1280  # 16 rows of 80
    assert 5.7e9 < paper.table_params < 5.9e9  # the paper's "5.7B Engram parameters"
    flash = resolve("deepseek-v4.1-flash", tokenizer=deepseek, vocab=deepseek_vocab)
    assert flash.heads_total == 24  # 24 row reads per token per layer
    per_layer_bytes = flash.layer_rows(1) * flash.row_dim  # FP8: one byte per value
    assert 97e9 < per_layer_bytes < 99e9  # "about 98 GB per layer's table"


def test_json_roundtrip(demo_spec):
    again = HashSpec.from_json(demo_spec.to_json())
    assert again == demo_spec
    assert again.digest == demo_spec.digest


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 1},
        {"layer_ids": (1, 14)},
        {"orders": (2, 3, 4), "base_sizes": (646400,) * 3},
        {"heads_per_order": 4},
        {"base_sizes": (646400, 646401)},
        {"pad_id": 3},
        {"doc_boundaries": True},
        {"compress": False},
        {"row_dim": 32},
    ],
)
def test_specs_that_address_differently_are_not_equal(change, deepseek, demo_spec):
    other = resolve(dataclasses.replace(demo_spec.config, **change), tokenizer=deepseek)
    assert other != demo_spec
    assert other.digest != demo_spec.digest


def test_tampered_json_is_rejected(demo_spec):
    data = demo_spec.to_dict()
    data["layers"]["1"]["primes"][0] += 2
    with pytest.raises(ValueError, match="corrupt or hand-edited"):
        HashSpec.from_dict(data)
    for key, value in (("compressed_vocab_size", 99_000), ("table_params", 1), ("d_mem", 3)):
        data = demo_spec.to_dict()
        data[key] = value
        if key == "compressed_vocab_size":
            del data["layers"]
        with pytest.raises(ValueError, match="corrupt or hand-edited"):
            HashSpec.from_dict(data)
    data = demo_spec.to_dict()
    data["format_version"] = 99
    with pytest.raises(ValueError, match="format_version=99"):
        HashSpec.from_dict(data)
    data = demo_spec.to_dict()
    del data["seed"]
    with pytest.raises(ValueError, match="missing or has a malformed field"):
        HashSpec.from_dict(data)
    with pytest.raises(ValueError, match="not valid JSON"):
        HashSpec.from_json("{")


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown spec preset 'nope'"):
        preset("nope")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layer_ids": ()}, "layer_ids"),
        ({"layer_ids": (1, 1)}, "layer_ids"),
        ({"layer_ids": (2, 0)}, "increasing"),
        ({"orders": (3, 2)}, "orders"),
        ({"orders": (1, 2)}, "orders"),
        ({"base_sizes": (1009,)}, "base_sizes"),
        ({"heads_per_order": 0}, "heads_per_order=0"),
        ({"row_dim": 0}, "row_dim=0"),
        ({"seed": -1}, "seed=-1"),
    ],
)
def test_config_validation_names_the_bad_value(change, message):
    config = dataclasses.replace(PRESETS["tiny"], **change)
    with pytest.raises(ValueError, match=message):
        config.validate()


def test_pad_id_out_of_range(deepseek):
    with pytest.raises(ValueError, match="pad_id=200000"):
        resolve("tiny", tokenizer=deepseek, pad_id=200_000)


def test_wrong_vocab_for_tokenizer(deepseek):
    from engram.tokenizer import train_bpe
    from engram.vocab import compress

    other = compress(train_bpe(["abc abd abe"] * 20, vocab_size=260), use_cache=False)
    with pytest.raises(ValueError, match="does not belong"):
        resolve("tiny", tokenizer=deepseek, vocab=other)


def test_spec_config_is_hashable_and_frozen():
    config = PRESETS["tiny"]
    assert hash(config) == hash(dataclasses.replace(config))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 3  # type: ignore[misc]
    assert isinstance(config, SpecConfig)
