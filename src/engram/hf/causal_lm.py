"""Our Engram LM as a Hugging Face transformers model: `EngramHFConfig` and `EngramForCausalLM`.

DeepSeek's Engram (conditional memory via scalable N-gram lookup, arXiv 2601.07372) needs more
than a weight file to run: the hasher must address the tables exactly as in training. So the
config carries, next to the `ModelConfig`, the resolved `HashSpec`, the tokenizer fingerprint
and the compressed-vocabulary map (raw id -> canonical id). `from_pretrained` rebuilds the
identical `NgramHasher` from the config alone, with no tokenizer file, and refuses a map whose
fingerprint is not the spec's.

The vocabulary map lives in the config, not in the safetensors: it is addressing data, like the
spec, and the hasher must be built and checked when the model is constructed (also by
`from_config`, which has no weights); the state dict then stays exactly `EngramLM`'s. It is
stored as int32 deltas, zlib-compressed and base64-encoded: under 1 KB for an identity map,
about 230 KB for the 129,280-id DeepSeek map (875 KB as a JSON list of ids). The fingerprint
check catches any corruption.

Generation. `EngramLM` stays the single source of truth: `EngramForCausalLM` holds one and
calls it. `generate()` gets an `EngramCache`, a `transformers.Cache` that owns our
`DecodeCache` (attention K/V, N-gram history, Engram conv windows), allocated at the first
forward for the batch it sees and reallocated larger when a chunk does not fit. Each step HF
passes the full attention mask; the forward keeps the columns of the new tokens, and the model
handles left padding (padding anywhere) itself. Beam search reorders every part of the cache.

Legend: B batch, T new tokens, S cache slots, V vocabulary.
"""

from __future__ import annotations

import base64
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

try:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        GenerationMixin,
        PretrainedConfig,
        PreTrainedModel,
    )
    from transformers import initialization as hf_init
    from transformers.cache_utils import Cache
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.utils.deprecation import deprecate_kwarg
    from transformers.utils.generic import can_return_tuple
except ImportError as e:  # pragma: no cover - exercised with transformers hidden
    raise ImportError(
        "engram.hf needs Hugging Face transformers: pip install 'engram-lm[hf]'"
    ) from e

from engram.config import from_dict, to_dict
from engram.hashing import HashState, NgramHasher
from engram.model import EngramLM, ModelConfig
from engram.model.decode_cache import DecodeCache
from engram.model.layers import Rotary
from engram.model.moe import MoE
from engram.module import HashedMemory
from engram.spec import HashSpec
from engram.tokenizer import Tokenizer
from engram.vocab import CompressedVocab

_MAP_ENCODING = "int32-delta+zlib+base64"


# ---- the vocabulary map, packed for config.json -------------------------------------------------
def pack_vocab_map(lookup: np.ndarray) -> dict[str, Any]:
    """`lookup[id] -> canonical id` as JSON-able data (see the module docstring for why)."""
    deltas = np.diff(np.asarray(lookup, dtype=np.int64), prepend=0).astype("<i4")
    data = base64.b64encode(zlib.compress(deltas.tobytes(), 9)).decode("ascii")
    return {"encoding": _MAP_ENCODING, "size": len(lookup), "data": data}


def unpack_vocab_map(packed: dict[str, Any]) -> np.ndarray:
    """The int64 lookup of `pack_vocab_map`; ValueError for anything else."""
    if not isinstance(packed, dict) or packed.get("encoding") != _MAP_ENCODING:
        raise ValueError(f"vocab_map must be a dict with encoding {_MAP_ENCODING!r}")
    try:
        raw = zlib.decompress(base64.b64decode(packed["data"]))
    except (KeyError, ValueError, zlib.error) as e:
        raise ValueError(f"vocab_map data is corrupt: {e}") from e
    lookup = np.cumsum(np.frombuffer(raw, dtype="<i4").astype(np.int64))
    if lookup.shape != (packed.get("size"),):
        raise ValueError(f"vocab_map holds {len(lookup)} ids, its header says {packed.get('size')}")
    return lookup


# ---- the config ----------------------------------------------------------------------------------
class EngramHFConfig(PretrainedConfig):
    """Everything needed to rebuild an `EngramLM` and its hasher, as plain JSON data.

    `model_config` is `engram.config.to_dict(ModelConfig)`, `hash_spec` is `HashSpec.to_dict()`
    (None for a model without Engram), `vocab_map` is `pack_vocab_map(lookup)`.
    """

    model_type = "engram"

    model_config: dict | None = None
    hash_spec: dict | None = None
    tokenizer_fingerprint: str | None = None
    vocab_map: dict | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @classmethod
    def from_engram(cls, model: EngramLM, tokenizer: Tokenizer, **kwargs: Any) -> EngramHFConfig:
        """The config of `model`, whose spec must belong to `tokenizer`."""
        spec, lookup = model.spec, None
        if spec is not None:
            if spec.tokenizer_fingerprint != tokenizer.fingerprint:
                raise ValueError(
                    f"the model's hash spec was resolved for tokenizer "
                    f"{spec.tokenizer_fingerprint[:12]}, not for {tokenizer.fingerprint[:12]}"
                )
            if model.hasher is None:
                raise ValueError("the model has Engram layers but no hasher to export")
            # Canonicalising every id through the public API yields the hasher's own map.
            every_id = torch.arange(spec.vocab_size)[None]
            lookup = model.hasher.canonicalize(every_id)[0].cpu().numpy()
        return cls(
            model_config=to_dict(model.config),
            hash_spec=spec.to_dict() if spec is not None else None,
            tokenizer_fingerprint=tokenizer.fingerprint,
            vocab_map=pack_vocab_map(lookup) if lookup is not None else None,
            tie_word_embeddings=model.config.tie_embeddings,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id,
            **kwargs,
        )

    def engram_parts(self) -> tuple[ModelConfig, HashSpec | None, NgramHasher | None]:
        """Rebuild (and check) the model config, the spec and the hasher."""
        if self.model_config is None:
            raise ValueError("this EngramHFConfig has no model_config; build it with from_engram")
        config = from_dict(ModelConfig, self.model_config)
        if (config.engram is None) != (self.hash_spec is None):
            raise ValueError("hash_spec must be given exactly when the model has Engram memory")
        if self.tie_word_embeddings != config.tie_embeddings:
            raise ValueError(
                f"tie_word_embeddings={self.tie_word_embeddings} contradicts the model config's "
                f"tie_embeddings={config.tie_embeddings}"
            )
        if self.hash_spec is None:
            return config, None, None
        spec = HashSpec.from_dict(self.hash_spec)
        if self.tokenizer_fingerprint != spec.tokenizer_fingerprint:
            raise ValueError(
                f"tokenizer_fingerprint {str(self.tokenizer_fingerprint)[:12]} is not the one "
                f"the hash spec was resolved for ({spec.tokenizer_fingerprint[:12]})"
            )
        if self.vocab_map is None:
            raise ValueError("an Engram model's config needs its vocab_map to rebuild the hasher")
        lookup = unpack_vocab_map(self.vocab_map)
        size = int(lookup.max()) + 1 if len(lookup) else 0
        vocab = CompressedVocab(lookup, size, spec.tokenizer_fingerprint, spec.config.compress)
        return config, spec, NgramHasher(spec, vocab)  # raises when the map is not the spec's

    # Views HF code reads from any causal LM config.
    @property
    def vocab_size(self) -> int | None:
        return self.model_config["vocab_size"] if self.model_config else None

    @property
    def hidden_size(self) -> int | None:
        return self.model_config["d_model"] if self.model_config else None

    @property
    def num_hidden_layers(self) -> int | None:
        return self.model_config["n_layers"] if self.model_config else None

    @property
    def num_attention_heads(self) -> int | None:
        return self.model_config["n_heads"] if self.model_config else None

    @property
    def max_position_embeddings(self) -> int | None:
        return self.model_config["max_seq_len"] if self.model_config else None


# ---- the cache -----------------------------------------------------------------------------------
def _select(cache: DecodeCache, index: torch.Tensor) -> DecodeCache:
    """The cache of rows `index` [B'] (beam reordering, expansion): every per-row state."""
    index = index.to(cache.valid.device)

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t.index_select(0, index)

    state = cache.hash_state
    return replace(
        cache,
        keys=[pick(k) for k in cache.keys],
        values=[pick(v) for v in cache.values],
        valid=pick(cache.valid),
        positions=pick(cache.positions),
        last_eos=pick(cache.last_eos),
        hash_state=None if state is None else HashState(pick(state.history), state.pad_id),
        conv={layer: pick(window) for layer, window in cache.conv.items()},
    )


def _grown(cache: DecodeCache, capacity: int) -> DecodeCache:
    """The same cache with room for `capacity` slots; new slots are empty (never valid)."""

    def widen(t: torch.Tensor, dim: int) -> torch.Tensor:
        shape = list(t.shape)
        shape[dim] = capacity - shape[dim]
        return torch.cat([t, t.new_zeros(shape)], dim=dim)

    return replace(
        cache,
        keys=[widen(k, 2) for k in cache.keys],  # [B, n_kv, S, hd]
        values=[widen(v, 2) for v in cache.values],
        valid=widen(cache.valid, 1),  # [B, S]
    )


class EngramCache(Cache):
    """A `transformers.Cache` that owns our `DecodeCache`, so HF generation decodes exactly.

    `capacity` is a first-allocation hint (generate passes its max length); the `DecodeCache` is
    built at the first forward for that batch and reallocated (doubling) when a chunk does not
    fit. Cropping (assisted decoding) is not supported: the N-gram history and conv windows of
    dropped tokens are not recorded.
    """

    def __init__(self, capacity: int = 0) -> None:
        super().__init__(layers=[])
        self.capacity_hint = capacity
        self.decode: DecodeCache | None = None

    def reserve(self, model: EngramLM, batch_size: int, length: int) -> DecodeCache:
        """The `DecodeCache` with room for `length` more tokens of `batch_size` rows."""
        if self.decode is None:
            self.decode = model.new_cache(batch_size, max(self.capacity_hint, length, 1))
        elif self.decode.length + length > self.decode.capacity:
            need = self.decode.length + length
            self.decode = _grown(self.decode, max(2 * self.decode.capacity, need))
        return self.decode

    def __repr__(self) -> str:
        d = self.decode
        held = "empty" if d is None else f"batch={d.batch_size}, length={d.length}/{d.capacity}"
        return f"EngramCache({held})"

    def __len__(self) -> int:
        return 0 if self.decode is None else len(self.decode.keys)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Slots used so far (pads included), the same for every row and layer."""
        return 0 if self.decode is None else self.decode.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # grows on demand

    @property
    def batch_size(self) -> int:
        return -1 if self.decode is None else self.decode.batch_size

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.decode is not None

    @property
    def is_linear(self) -> list[bool]:
        # Not all-linear, so `generate` slices already-cached tokens off the inputs.
        return [False] * max(1, len(self))

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * max(1, len(self))

    def reset(self) -> None:
        self.decode = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError(
                "EngramCache cannot be cropped (assisted decoding): the N-gram history and "
                "conv windows of removed tokens are not recorded"
            )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.decode is not None:
            self.decode = _select(self.decode, beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.decode is not None:
            rows = torch.arange(self.decode.batch_size).repeat_interleave(repeats)
            self.decode = _select(self.decode, rows)


# ---- the model -----------------------------------------------------------------------------------
_REJECTED = ("inputs_embeds", "position_ids")  # ids only; positions follow the attention mask
_UNSUPPORTED_OUTPUTS = ("output_attentions", "output_hidden_states")


class EngramForCausalLM(PreTrainedModel, GenerationMixin):
    """An `EngramLM` behind the transformers API: `forward`, `generate`, `save_pretrained`."""

    config_class = EngramHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules: ClassVar[list[str]] = ["Block"]
    # Tied only when the config says so (tie_word_embeddings = ModelConfig.tie_embeddings).
    _tied_weights_keys: ClassVar[dict[str, str]] = {"model.head.weight": "model.embed.weight"}

    def __init__(self, config: EngramHFConfig, lm: EngramLM | None = None) -> None:
        super().__init__(config)
        model_config, spec, hasher = config.engram_parts()
        if lm is None:
            lm = EngramLM(model_config, spec, hasher)
        elif lm.config != model_config or lm.spec != spec:
            raise ValueError("the EngramLM given does not match the config's model and spec")
        self.model = lm
        self.post_init()

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_engram(cls, model: EngramLM, tokenizer: Tokenizer) -> EngramForCausalLM:
        """Wrap `model` (weights shared, not copied); `tokenizer` is the one it was built for."""
        return cls(EngramHFConfig.from_engram(model, tokenizer), lm=model)

    @classmethod
    def from_run(cls, path: str | Path, device: str = "cpu") -> EngramForCausalLM:
        """A trained run folder or checkpoint (see `engram.inference.load_trained`). Tables the
        run placed in host memory or on disk become embeddings again, so that `save_pretrained`
        writes them with the other weights (ValueError if they do not fit in RAM)."""
        from engram.inference.load import load_trained

        trained = load_trained(path, device=device)
        trained.tables.embed()
        return cls.from_engram(trained.model, trained.tokenizer)

    def to_engram(self) -> EngramLM:
        """The wrapped `EngramLM` (the same object: weights are shared)."""
        return self.model

    @classmethod
    def get_init_context(cls, *args: Any, **kwargs: Any) -> list:
        # from_pretrained builds models on the meta device, but ours computes an mHC bias with
        # `.item()` while being built. So it is built on the CPU instead, with every init
        # function switched off (the weights are about to be loaded over it); `_init_weights`
        # then re-derives the non-persistent buffers.
        contexts = super().get_init_context(*args, **kwargs)
        contexts = [c for c in contexts if not (isinstance(c, torch.device) and c.type == "meta")]
        return [*contexts, hf_init.no_init_weights()]

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """HF's `from_pretrained`, refusing a checkpoint that does not fill every weight: a
        missing one would stay uninitialised (the model is not built with random weights)."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        wrong = {
            key: sorted(str(k) for k in info[key])[:5]
            for key in ("missing_keys", "unexpected_keys", "mismatched_keys")
            if info[key]
        }
        if wrong:
            raise ValueError(f"the checkpoint does not fit this EngramForCausalLM: {wrong}")
        return (model, info) if want_info else model

    def _init_weights(self, module: nn.Module) -> None:
        """Re-derive non-persistent buffers; never touch a parameter.

        `EngramLM` initialises its own parameters. HF calls this on every module after building
        and after loading a checkpoint, having replaced each non-persistent buffer (absent from
        the checkpoint) by an uninitialised tensor.
        """
        if isinstance(module, Rotary):
            c = self.model.config
            with torch.device("cpu"):
                reference = Rotary(c.head_dim, c.max_seq_len, c.rope_theta)
            module.cos.copy_(reference.cos)
            module.sin.copy_(reference.sin)
        elif isinstance(module, HashedMemory):
            module.offsets.copy_(torch.tensor(module.spec.layer_offsets(module.layer_id)))
        elif isinstance(module, MoE):
            module.load.zero_()  # tokens routed since the last balancing step
        elif module._non_persistent_buffers_set:
            raise TypeError(
                f"{type(module).__name__} has non-persistent buffers "
                f"{sorted(module._non_persistent_buffers_set)} that EngramForCausalLM does not "
                "know how to rebuild after loading: add them to _init_weights"
            )

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.head

    # ---- forward -------------------------------------------------------------------------------
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: EngramCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits [B, T, V] of `input_ids` [B, T]; with `labels` the shifted-label loss (HF).

        Without `cache` and `use_cache` this is `EngramLM`'s plain forward. With them, the
        tokens continue the cached sequences and the (new or given) `EngramCache` is returned.
        `attention_mask` (1 = real token) covers either the new tokens or, as in `generate`,
        the cached and the new ones; padding may be anywhere.
        """
        for key in _REJECTED:
            if kwargs.get(key) is not None:
                raise ValueError(f"EngramForCausalLM takes input_ids only, not {key}")
        for key in _UNSUPPORTED_OUTPUTS:
            if kwargs.pop(key, None):
                raise ValueError(f"EngramForCausalLM does not support {key}=True")
        if use_cache is None:
            use_cache = cache is not None
        if use_cache:
            cache = cache if cache is not None else EngramCache()
            logits = self._cached_forward(input_ids, attention_mask, cache)
        else:
            cache = None
            mask = None if attention_mask is None else attention_mask.bool()
            if mask is not None and bool(mask.all()):
                mask = None  # no padding: the plain forward, bit-identical with EngramLM's
            logits = self.model(input_ids, attention_mask=mask)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def _cached_forward(
        self, ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: EngramCache
    ) -> torch.Tensor:
        if not isinstance(cache, EngramCache):
            raise ValueError(
                f"EngramForCausalLM decodes with an EngramCache, got {type(cache).__name__}: "
                "attention K/V alone misses the N-gram history and the conv windows"
            )
        B, T = ids.shape
        past = cache.get_seq_length()
        mask = None
        if attention_mask is not None:
            if attention_mask.shape[1] == past + T:
                attention_mask = attention_mask[:, past:]  # HF passes the whole mask each step
            elif attention_mask.shape[1] != T:
                raise ValueError(
                    f"attention_mask has {attention_mask.shape[1]} columns; expected the "
                    f"{T} new tokens or the {past} cached plus {T} new ones"
                )
            mask = attention_mask.bool()
        decode = cache.reserve(self.model, B, T)
        return self.model(ids, cache=decode, attention_mask=mask)

    # ---- generate ------------------------------------------------------------------------------
    def _prepare_cache_for_generation(
        self,
        generation_config: Any,
        model_kwargs: dict,
        generation_mode: Any,
        batch_size: int,
        max_cache_length: int,
    ) -> None:
        """`generate` decodes with an `EngramCache`: a DynamicCache would lose the N-gram
        history and the conv windows, so every other cache implementation is refused."""
        given = model_kwargs.get("cache")
        if given is not None and not isinstance(given, EngramCache):
            raise ValueError(
                f"EngramForCausalLM generates with an EngramCache, got {type(given).__name__}"
            )
        if given is None and generation_config.use_cache is not False:
            implementation = generation_config.cache_implementation
            if implementation not in (None, "dynamic"):
                raise ValueError(
                    f"cache_implementation={implementation!r} is not supported: Engram "
                    "decoding uses its own EngramCache (leave cache_implementation unset)"
                )
            model_kwargs["cache"] = EngramCache(capacity=max_cache_length)
            return
        super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )


AutoConfig.register(EngramHFConfig.model_type, EngramHFConfig, exist_ok=True)
AutoModelForCausalLM.register(EngramHFConfig, EngramForCausalLM, exist_ok=True)

__all__ = [
    "EngramCache",
    "EngramForCausalLM",
    "EngramHFConfig",
    "pack_vocab_map",
    "unpack_vocab_map",
]
