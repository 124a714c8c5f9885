"""Hash specs: the complete, versioned description of how Engram addresses its tables.

A `SpecConfig` is what a person writes (or a preset holds): tokenizer, layers, N-gram orders, heads,
base table sizes, seed. `resolve(config)` turns it into a `HashSpec`, which adds everything derived
from it: the tokenizer fingerprint and compressed vocabulary size, the odd hash multipliers of each
layer and the prime size of each (layer, order, head) table. A `HashSpec` round-trips through JSON;
loading re-derives every derived field and refuses a file whose numbers disagree, so a spec that
addresses differently can never pass for another.

Derivation follows the official demo (deepseek-ai/Engram `engram_demo_v1.py`, `NgramHashMapping`):
- multipliers: per layer, numpy `default_rng(seed + 10007 * layer_id)` draws `max_order` integers r
  in [0, max(1, (INT64_MAX // compressed_vocab_size) // 2)); multiplier = 2r + 1 (odd). The bound
  keeps every product `canonical_id * multiplier` inside int64, so hashing never overflows.
- primes: for each layer in order, each order, each head: the smallest prime >= the order's base
  size that no earlier head, order or layer has taken.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from sympy import nextprime

SPEC_FORMAT = 1
_LAYER_SEED_STRIDE = 10007  # the demo's PRIME_1


@dataclass(frozen=True)
class SpecConfig:
    """The free choices of an Engram addressing scheme (see module docstring for derivations)."""

    tokenizer: str  # "deepseek", a tokenizer.json path, or a local Hugging Face name
    layer_ids: tuple[int, ...]  # 0-based Transformer blocks that hold an Engram
    orders: tuple[int, ...]  # N-gram orders, e.g. (2, 3)
    heads_per_order: int  # K hash heads per order
    base_sizes: tuple[int, ...]  # base table size per order (primes are searched upward from it)
    row_dim: int  # dims of one head's row; d_mem = row_dim * heads_total
    seed: int = 0
    pad_id: int | None = None  # raw pad id filling positions before the start; None: tokenizer's
    doc_boundaries: bool = True  # no N-gram crosses an EOS / document start
    compress: bool = True  # canonicalise ids first (False: an ablation)

    def validate(self) -> None:
        if not self.layer_ids or sorted(set(self.layer_ids)) != list(self.layer_ids):
            # Increasing, because primes are handed out layer by layer in this order.
            raise ValueError(
                f"layer_ids={list(self.layer_ids)} must be non-empty, unique and increasing"
            )
        if any(i < 0 for i in self.layer_ids):
            raise ValueError(f"layer_ids={list(self.layer_ids)} must be >= 0")
        if not self.orders or sorted(set(self.orders)) != list(self.orders) or self.orders[0] < 2:
            raise ValueError(f"orders={list(self.orders)} must be increasing, unique and >= 2")
        if len(self.base_sizes) != len(self.orders):
            raise ValueError(
                f"base_sizes={list(self.base_sizes)} needs one size per order "
                f"({len(self.orders)} orders)"
            )
        if any(b < 2 for b in self.base_sizes):
            raise ValueError(f"base_sizes={list(self.base_sizes)} must all be >= 2")
        if self.heads_per_order < 1:
            raise ValueError(f"heads_per_order={self.heads_per_order} must be >= 1")
        if self.row_dim < 1:
            raise ValueError(f"row_dim={self.row_dim} must be >= 1")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0")


# Presets are data. Each comment says where its numbers come from (see shared/PAPER.md).
PRESETS: dict[str, SpecConfig] = {
    # The official demo's EngramConfig: engram_vocab_size [129280*5]*2, max_ngram_size 3,
    # n_embed_per_ngram 512 over 8 heads (64 per row), layer_ids [1, 15], pad_id 2, seed 0.
    # The demo lets N-grams cross documents, so boundaries are off for bit-compatibility.
    "demo-v1": SpecConfig(
        tokenizer="deepseek",
        layer_ids=(1, 15),
        orders=(2, 3),
        heads_per_order=8,
        base_sizes=(129280 * 5, 129280 * 5),
        row_dim=64,
        seed=0,
        pad_id=2,
        doc_boundaries=False,
    ),
    # Engram-27B (paper section 4): blocks 2 and 15 of 30, orders 2-3, 8 heads, base 2,262,400
    # per head, d_mem 1280 = 16 rows of 80.
    "paper-27b": SpecConfig(
        tokenizer="deepseek",
        layer_ids=(1, 14),
        orders=(2, 3),
        heads_per_order=8,
        base_sizes=(2_262_400, 2_262_400),
        row_dim=80,
        seed=0,
        pad_id=2,
    ),
    # DeepSeek-V4.1-Flash as public inference engines describe it: 0-based layers 1 and 14,
    # orders 2-4, 8 heads per order, base 16,000,000 per head, 256-value rows.
    "deepseek-v4.1-flash": SpecConfig(
        tokenizer="deepseek",
        layer_ids=(1, 14),
        orders=(2, 3, 4),
        heads_per_order=8,
        base_sizes=(16_000_000,) * 3,
        row_dim=256,
        seed=0,
        pad_id=2,
    ),
    # For tests: tiny prime tables so collisions are frequent and everything runs in milliseconds.
    "tiny": SpecConfig(
        tokenizer="deepseek",
        layer_ids=(0, 2),
        orders=(2, 3),
        heads_per_order=2,
        base_sizes=(1009, 1013),
        row_dim=8,
        seed=0,
        pad_id=2,
    ),
}


def preset(name: str) -> SpecConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown spec preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]


def derive_multipliers(
    seed: int, layer_id: int, max_order: int, compressed_vocab_size: int
) -> tuple[int, ...]:
    """The demo's odd multipliers m_0..m_{max_order-1} of one layer."""
    half_bound = max(1, (int(np.iinfo(np.int64).max) // compressed_vocab_size) // 2)
    rng = np.random.default_rng(int(seed + _LAYER_SEED_STRIDE * layer_id))
    r = rng.integers(low=0, high=half_bound, size=(max_order,), dtype=np.int64)
    return tuple(int(x) * 2 + 1 for x in r)


def derive_primes(
    layer_ids: tuple[int, ...],
    orders: tuple[int, ...],
    heads_per_order: int,
    base_sizes: tuple[int, ...],
) -> tuple[tuple[int, ...], ...]:
    """Per layer, the flat (order-major, then head) list of unique prime table sizes."""
    taken: set[int] = set()
    per_layer = []
    for _ in layer_ids:
        primes = []
        for base in base_sizes:
            candidate = base - 1  # nextprime is strict: start one below so `base` itself counts
            for _ in range(heads_per_order):
                candidate = int(nextprime(candidate))
                while candidate in taken:
                    candidate = int(nextprime(candidate))
                taken.add(candidate)
                primes.append(candidate)
        per_layer.append(tuple(primes))
    return tuple(per_layer)


@dataclass(frozen=True)
class HashSpec:
    """A resolved, self-describing addressing scheme. Build with `resolve`; compare with `==`."""

    config: SpecConfig
    tokenizer_fingerprint: str
    vocab_map_fingerprint: str  # digest of the id -> canonical id map itself
    normalizer_version: int
    vocab_size: int
    compressed_vocab_size: int
    canonical_pad_id: int
    eos_id: int | None  # raw id that ends a document (None: no EOS-based boundaries)
    multipliers: tuple[tuple[int, ...], ...]  # per layer, m_0..m_{max_order-1}
    primes: tuple[tuple[int, ...], ...]  # per layer, heads_total primes (order-major)
    format_version: int = field(default=SPEC_FORMAT)

    # ---- derived views -------------------------------------------------------------------------
    @property
    def layer_ids(self) -> tuple[int, ...]:
        return self.config.layer_ids

    @property
    def orders(self) -> tuple[int, ...]:
        return self.config.orders

    @property
    def max_order(self) -> int:
        return self.config.orders[-1]

    @property
    def heads_total(self) -> int:
        return self.config.heads_per_order * len(self.config.orders)

    @property
    def row_dim(self) -> int:
        return self.config.row_dim

    @property
    def d_mem(self) -> int:
        """Width of e_t, the concatenation of every head's row."""
        return self.row_dim * self.heads_total

    def _index(self, layer_id: int) -> int:
        if layer_id not in self.config.layer_ids:
            raise ValueError(
                f"layer {layer_id} has no Engram; spec layers are {list(self.config.layer_ids)}"
            )
        return self.config.layer_ids.index(layer_id)

    def layer_primes(self, layer_id: int) -> tuple[int, ...]:
        return self.primes[self._index(layer_id)]

    def layer_multipliers(self, layer_id: int) -> tuple[int, ...]:
        return self.multipliers[self._index(layer_id)]

    def layer_offsets(self, layer_id: int) -> tuple[int, ...]:
        """Row offset of each head inside the layer's single table."""
        primes = self.layer_primes(layer_id)
        return tuple(int(x) for x in np.concatenate([[0], np.cumsum(primes[:-1])]))

    def layer_rows(self, layer_id: int) -> int:
        return int(sum(self.layer_primes(layer_id)))

    @property
    def table_params(self) -> int:
        return sum(self.layer_rows(i) for i in self.layer_ids) * self.row_dim

    @property
    def digest(self) -> str:
        """Short content hash, handy to name caches and check checkpoints."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        cfg = asdict(self.config)
        return {
            "format_version": self.format_version,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "vocab_map_fingerprint": self.vocab_map_fingerprint,
            "normalizer_version": self.normalizer_version,
            "vocab_size": self.vocab_size,
            "compressed_vocab_size": self.compressed_vocab_size,
            "canonical_pad_id": self.canonical_pad_id,
            "eos_id": self.eos_id,
            "heads_total": self.heads_total,
            "d_mem": self.d_mem,
            "table_params": self.table_params,
            "layers": {
                str(layer): {
                    "multipliers": list(self.layer_multipliers(layer)),
                    "primes": list(self.layer_primes(layer)),
                    "offsets": list(self.layer_offsets(layer)),
                    "rows": self.layer_rows(layer),
                }
                for layer in self.layer_ids
            },
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HashSpec:
        """Rebuild and verify: every derived number must match what the config derives."""
        if not isinstance(data, dict):
            raise ValueError(f"a spec must be a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version != SPEC_FORMAT:
            raise ValueError(
                f"spec format_version={version!r} is not supported "
                f"(this library reads {SPEC_FORMAT})"
            )
        try:
            config = SpecConfig(
                tokenizer=data["tokenizer"],
                layer_ids=tuple(data["layer_ids"]),
                orders=tuple(data["orders"]),
                heads_per_order=int(data["heads_per_order"]),
                base_sizes=tuple(data["base_sizes"]),
                row_dim=int(data["row_dim"]),
                seed=int(data["seed"]),
                pad_id=data["pad_id"],
                doc_boundaries=bool(data["doc_boundaries"]),
                compress=bool(data["compress"]),
            )
            spec = _derive(
                config,
                data["tokenizer_fingerprint"],
                data["vocab_map_fingerprint"],
                int(data["normalizer_version"]),
                int(data["vocab_size"]),
                int(data["compressed_vocab_size"]),
                int(data["canonical_pad_id"]),
                data["eos_id"],
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"spec is missing or has a malformed field: {e}") from e
        # Every derived number stored in the file must be what the config derives.
        derived = spec.to_dict()
        wrong = sorted(k for k in data if k in derived and data[k] != derived[k])
        missing = sorted(k for k in derived if k not in data)
        if wrong or missing:
            raise ValueError(
                f"spec fields {wrong + missing} do not match what its config "
                "derives: corrupt or hand-edited spec"
            )
        return spec

    @classmethod
    def from_json(cls, text: str) -> HashSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"spec is not valid JSON: {e}") from e
        return cls.from_dict(data)


def _derive(
    config: SpecConfig,
    tokenizer_fingerprint: str,
    vocab_map_fingerprint: str,
    normalizer_version: int,
    vocab_size: int,
    compressed_vocab_size: int,
    canonical_pad_id: int,
    eos_id: int | None,
) -> HashSpec:
    config.validate()
    if not 0 <= canonical_pad_id < compressed_vocab_size:
        raise ValueError(
            f"canonical_pad_id={canonical_pad_id} is outside [0, {compressed_vocab_size})"
        )
    multipliers = tuple(
        derive_multipliers(config.seed, layer, config.orders[-1], compressed_vocab_size)
        for layer in config.layer_ids
    )
    primes = derive_primes(
        config.layer_ids, config.orders, config.heads_per_order, config.base_sizes
    )
    return HashSpec(
        config,
        tokenizer_fingerprint,
        vocab_map_fingerprint,
        normalizer_version,
        vocab_size,
        compressed_vocab_size,
        canonical_pad_id,
        eos_id,
        multipliers,
        primes,
    )


def resolve(config: SpecConfig | str, tokenizer=None, vocab=None, **overrides: Any) -> HashSpec:
    """Resolve a config (or preset name) against its tokenizer into a full `HashSpec`.

    `tokenizer` (an `engram.tokenizer.Tokenizer`) and `vocab` (its `CompressedVocab`) are loaded
    from `config.tokenizer` when not given. `overrides` replace config fields (e.g. seed=1).
    """
    from engram.tokenizer import load_tokenizer
    from engram.vocab import NORMALIZER_VERSION, compress

    if isinstance(config, str):
        config = preset(config)
    config = replace(config, **overrides) if overrides else config
    config.validate()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer)
    if vocab is None:
        vocab = compress(tokenizer, enabled=config.compress)
    if vocab.tokenizer_fingerprint != tokenizer.fingerprint or vocab.compressed != config.compress:
        raise ValueError("the vocab map given does not belong to this tokenizer/compression")
    pad_id = config.pad_id if config.pad_id is not None else tokenizer.pad_id
    if pad_id is None:
        raise ValueError(f"tokenizer {config.tokenizer!r} has no pad token: set pad_id")
    if not 0 <= pad_id < tokenizer.vocab_size:
        raise ValueError(f"pad_id={pad_id} is outside the tokenizer's [0, {tokenizer.vocab_size})")
    eos_id = tokenizer.eos_id if config.doc_boundaries else None
    return _derive(
        config,
        tokenizer.fingerprint,
        vocab.fingerprint,
        NORMALIZER_VERSION,
        tokenizer.vocab_size,
        vocab.size,
        int(vocab.lookup[pad_id]),
        eos_id,
    )
