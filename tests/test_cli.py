"""The CLI contracts: JSON shapes, the demo's numbers, and clean errors with non-zero exits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engram.cli import main

GOLDEN = Path(__file__).parent / "golden"
EXAMPLE = "Only Alexander the Great could tame the horse Bucephalus."


def run_json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_vocab_json(capsys):
    out = run_json(capsys, "vocab", "--tokenizer", "deepseek", "--json", "--top", "3")
    assert out["vocab_size"] == 129_280
    assert out["compressed_vocab_size"] == 99_092
    assert out["reduction"] == pytest.approx(1 - 99_092 / 129_280, abs=1e-6)
    assert len(out["largest_groups"]) == 3


def test_spec_json_has_layers_with_primes_and_rows(capsys):
    out = run_json(capsys, "spec", "--preset", "demo-v1", "--json")
    assert out["compressed_vocab_size"] == 99_092
    assert set(out["layers"]) == {"1", "15"}
    layer = out["layers"]["1"]
    assert len(layer["primes"]) == 16 and layer["rows"] == sum(layer["primes"])
    assert out == json.loads((GOLDEN / "spec-demo-v1.json").read_text())


def test_spec_overrides(capsys):
    out = run_json(
        capsys, "spec", "--preset", "tiny", "--set", "seed=3", "--set", "layer_ids=1,4", "--json"
    )
    assert out["seed"] == 3 and set(out["layers"]) == {"1", "4"}


def test_hash_text_matches_golden(capsys):
    out = run_json(capsys, "hash", "--preset", "demo-v1", "--text", EXAMPLE, "--json")
    assert out == json.loads((GOLDEN / "hash-demo-v1.json").read_text())
    primes = run_json(capsys, "spec", "--preset", "demo-v1", "--json")["layers"]["15"]["primes"]
    for position in out["layers"]["15"]:
        assert len(position) == 16
        assert all(0 <= r < p for r, p in zip(position, primes, strict=True))


def test_hash_ids(capsys):
    out = run_json(capsys, "hash", "--preset", "tiny", "--ids", "5,6,7,1,8", "--json")
    assert out["ids"] == [5, 6, 7, 1, 8]
    assert len(out["compressed_ids"]) == 5 and set(out["layers"]) == {"0", "2"}
    assert all(len(p) == 4 for p in out["layers"]["0"])


def test_human_output(capsys):
    assert main(["spec", "--preset", "tiny"]) == 0
    assert "layer 0" in capsys.readouterr().out
    assert main(["hash", "--preset", "tiny", "--ids", "5,6"]) == 0
    assert main(["vocab", "--top", "2"]) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["spec", "--preset", "nope"], "unknown spec preset 'nope'"),
        (["spec", "--preset", "tiny", "--set", "colour=red"], "unknown key 'colour'"),
        (["spec", "--preset", "tiny", "--set", "seed=x"], "seed='x' is not a valid int"),
        (["spec", "--preset", "tiny", "--set", "heads_per_order=0"], "heads_per_order=0"),
        (["hash", "--preset", "tiny", "--ids", "1,-5"], "negative id"),
        (["hash", "--preset", "tiny", "--ids", "1,999999"], "outside the tokenizer"),
        (["hash", "--preset", "tiny", "--ids", "a,b"], "comma-separated integers"),
        (["hash", "--preset", "tiny", "--text", ""], "no tokens"),
        (["vocab", "--tokenizer", "/no/such/tokenizer"], "unknown tokenizer"),
    ],
)
def test_errors_exit_nonzero_with_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_console_script_exit_status():
    engram = Path(sys.executable).parent / "engram"
    result = subprocess.run(
        [str(engram), "hash", "--preset", "tiny", "--ids", "-1"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "negative id" in result.stderr
