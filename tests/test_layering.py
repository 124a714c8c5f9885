"""The core (hashing, module, spec, vocab, model) imports nothing from training, storage, data,
experiments or the CLI."""

from __future__ import annotations

import subprocess
import sys

CORE = [
    "engram.spec",
    "engram.vocab",
    "engram.hashing",
    "engram.module",
    "engram.tokenizer",
    "engram.model",
]
FORBIDDEN = [
    "engram.cli",
    "engram.optim",
    "engram.checkpoint",
    "engram.config_io",
    "engram.train",
    "engram.tables",
    "engram.data",
    "engram.experiments",
    "matplotlib",
]


def test_core_imports_no_outer_layer():
    code = (
        "import sys\n"
        f"for m in {CORE!r}: __import__(m)\n"
        f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core imported {out.stdout.strip()}"
