"""engram: conditional memory via scalable N-gram lookup (DeepSeek Engram, arXiv 2601.07372)."""

from engram.hashing import HashState, NgramHasher
from engram.module import Engram, EngramConfig
from engram.spec import PRESETS, HashSpec, SpecConfig, preset, resolve
from engram.tokenizer import Tokenizer, load_tokenizer, train_bpe
from engram.vocab import CompressedVocab, compress

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CompressedVocab",
    "Engram",
    "EngramConfig",
    "HashSpec",
    "HashState",
    "NgramHasher",
    "SpecConfig",
    "Tokenizer",
    "compress",
    "load_tokenizer",
    "preset",
    "resolve",
    "train_bpe",
]
