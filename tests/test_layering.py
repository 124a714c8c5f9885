"""The layers of the library, kept: the core imports no outer layer, serving imports no trainer,
and nothing outside the model sets attributes on it.

    core      spec, vocab, hashing, module, tokenizer, model/     (single-device model code)
    assembly  config, assembly, checkpoint                         (configs -> objects)
    storage   tables/                                              (where rows live; a plan)
    serving   inference/, hf/                                      (no trainer)
    training  train, optim, data                                   (the loop)
    outer     experiments/, cli
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "engram"

CORE = [
    "engram.spec",
    "engram.vocab",
    "engram.hashing",
    "engram.module",
    "engram.tokenizer",
    "engram.model",
]
CORE_FORBIDDEN = [
    "engram.cli",
    "engram.optim",
    "engram.checkpoint",
    "engram.config",
    "engram.train",
    "engram.tables",
    "engram.data",
    "engram.experiments",
    "matplotlib",
]
SERVING = [
    "engram.inference",
    "engram.inference.load",
    "engram.inference.generate",
    "engram.inference.quantized",
    "engram.hf",
    "engram.assembly",
]
SERVING_FORBIDDEN = ["engram.train", "engram.optim", "engram.experiments", "engram.cli"]


def _imported(modules: list[str], forbidden: list[str]) -> list[str]:
    code = (
        "import sys\n"
        f"for m in {modules!r}: __import__(m)\n"
        f"bad = [m for m in {forbidden!r} if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_core_imports_no_outer_layer():
    assert _imported(CORE, CORE_FORBIDDEN) == []


def test_serving_imports_no_trainer():
    pytest.importorskip("transformers")  # engram.hf needs the `hf` extra
    assert _imported(SERVING, SERVING_FORBIDDEN) == []


def _model_attribute_writes(path: Path) -> list[str]:
    """`model.x = ...` (or `self.model.x = ...`) statements in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        for target in targets:
            if isinstance(target, ast.Attribute) and _names_a_model(target.value):
                found.append(f"{path.relative_to(SRC)}:{node.lineno}: .{target.attr}")
    return found


def _names_a_model(node: ast.expr) -> bool:
    name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", "")
    return name in ("model", "lm")


def test_no_code_outside_the_model_sets_attributes_on_it():
    """The model declares what it owns (its Engram layers, a rows hook it registers); a
    placement or an export never hangs state on it from outside."""
    outside = [p for p in SRC.rglob("*.py") if "model" not in p.relative_to(SRC).parts[:1]]
    writes = [w for path in outside for w in _model_attribute_writes(path)]
    assert writes == []
