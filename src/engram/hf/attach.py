"""Add Engram memory to a Hugging Face decoder of a verified family without editing its code.

Paper section 2.4 (arXiv 2601.07372): Engram sits before attention in chosen blocks,
`x = x + Engram(x, rows)`, with rows from hashing the token ids' suffix N-grams. A Hugging Face
decoder layer only sees hidden states, so the attachment works through forward hooks:

- a pre-hook on the base model (`model.model`) reads `input_ids`, `attention_mask` and the cache,
  hashes the chunk once for every Engram layer and keeps these facts for the layers;
- a pre-hook on each chosen decoder layer (which holds its `Engram` as the submodule `engram`)
  adds `Engram(x, rows)` to the hidden states the layer receives. M = 1 branch: these models
  have a plain residual stream.

Cached decoding. The next chunk needs, per sequence, the last N-1 canonical ids, whether the
last real token was an EOS, and each Engram layer's conv window. This state lives on the cache
object that carries the K/V (`cache.engram_state`, see `engram.hf.decoding`), so it survives
from one `generate()` step to the next and follows the K/V through beam search reordering.

Padding. Within a chunk each row is reordered stably so that its pads (attention_mask 0) come
first (as `engram.model.decode_cache` does): the row's real tokens then directly follow its
cached state, so no N-gram and no conv window ever contains a pad. Only the Engram computation
is reordered; its output is put back in the caller's order and is zero at pads. Left-padded
`generate()` batches therefore give each row what it gives alone.

Saving. `save_engram` writes the Engram parameters alone (safetensors) with a JSON of the spec,
the layers and the tokenizer fingerprint; `load_engram` attaches and loads, refusing mismatches.
"""

from __future__ import annotations

import inspect
import json
import weakref
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer as BackendTokenizer
from torch import nn

from engram.checkpoint import FILES, check_digests, file_digest, seal, unseal
from engram.config import from_dict
from engram.files import fsync_dir, fsync_file, save_tensors
from engram.hashing import NgramHasher
from engram.hf.decoding import (
    PreparedChunk,
    engram_output,
    hashed_chunk,
    prepare_chunk,
    state_for,
)
from engram.hf.families import check_family
from engram.module import Engram, EngramConfig, lazy_tables
from engram.rowinit import RowInit
from engram.spec import HashSpec
from engram.tables.placed import PlacedTables
from engram.tables.plan import TablePlan
from engram.tokenizer import Tokenizer, load_tokenizer
from engram.vocab import compress

try:
    from transformers import DynamicCache, PreTrainedModel
    from transformers.cache_utils import Cache
except ImportError as e:  # pragma: no cover - the `hf` extra is missing
    raise ImportError("engram.hf needs transformers: pip install 'engram-lm[hf]'") from e

FORMAT_VERSION = 1
WEIGHTS_FILE, META_FILE, TABLES = "engram.safetensors", "engram.json", "tables"
# Each model's attachment, kept beside the model rather than set on it (the attachment holds
# its base submodule, never the model, so the model stays collectable).
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, EngramAttachment] = weakref.WeakKeyDictionary()


# ---- the attachment ------------------------------------------------------------------------------
class EngramAttachment:
    """The Engram modules added to one model, their hasher and the hooks that run them."""

    def __init__(
        self,
        model: PreTrainedModel,
        spec: HashSpec,
        tokenizer: Tokenizer,
        layers: tuple[int, ...],
        config: EngramConfig,
    ) -> None:
        self.spec, self.tokenizer, self.layers, self.config = spec, tokenizer, layers, config
        self.hasher = NgramHasher(spec, compress(tokenizer, enabled=spec.config.compress))
        self.base = model.model
        self.modules: dict[int, Engram] = {}
        self._chunk: PreparedChunk | None = None
        # Set by a caller that hashed the batch itself (the trainer's loader), or switched off.
        self.given_rows: dict[int, torch.Tensor] | None = None
        self.off = False
        self.tables: PlacedTables | None = None  # tables placed off the model (load_engram)
        self._signature = inspect.signature(self.base.forward)
        self._handles = [
            self.base.register_forward_pre_hook(self._before_model, with_kwargs=True),
            self.base.register_forward_hook(self._after_model, always_call=True),
        ]
        for layer in layers:
            block = self.base.layers[layer]
            block.engram = _follow(Engram(spec, layer, config), block)
            self.modules[layer] = block.engram
            hook = block.register_forward_pre_hook(self._before_layer, with_kwargs=True)
            self._handles.append(hook)

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules.values() for p in m.parameters()]

    @property
    def engram_layers(self) -> list[Engram]:
        """The Engram modules in layer order (what a table plan places)."""
        return [self.modules[layer] for layer in sorted(self.modules)]

    def remove(self, model: PreTrainedModel) -> None:
        """Detach: remove the hooks and the Engram modules; the model is its old self again."""
        for handle in self._handles:
            handle.remove()
        for layer in self.layers:
            del self.base.layers[layer].engram
        if self.tables is not None:
            self.tables.close()
        del _ATTACHED[model]

    # ---- hooks -----------------------------------------------------------------------------------
    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = self._by_name(args, kwargs)
        if self.off:
            return (), kwargs
        ids = kwargs.get("input_ids")
        if ids is None:
            raise ValueError(
                "a model with Engram hashes token ids: call it with input_ids, not inputs_embeds"
            )
        if self.given_rows is not None:  # hashed by the caller: a training batch, no cache
            self._chunk = hashed_chunk(self.hasher, ids, self.given_rows, self.layers)
            return (), kwargs
        cache = self._cache_for(module, kwargs)
        state = None
        if cache is not None:  # (not `if cache`: an empty cache has length 0)
            state = state_for(cache, self.hasher, ids.shape[0], ids.device)
        mask = kwargs.get("attention_mask")
        self._chunk = prepare_chunk(self.hasher, ids, mask, state, self.layers)
        return (), kwargs

    def _after_model(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._chunk = None

    def _before_layer(self, block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.off:
            return args, kwargs
        if self._chunk is None:
            raise ValueError("a decoder layer with Engram runs only inside the model's forward")
        hidden = args[0] if args else kwargs["hidden_states"]
        x = hidden + engram_output(block.engram, hidden, self._chunk)
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    def _by_name(self, args: tuple, kwargs: dict) -> dict:
        """Every argument of the base model's forward by name (its **kwargs flattened)."""
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        named = {}
        for name, value in bound.items():
            kind = self._signature.parameters[name].kind
            named.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
        return named

    def _cache_for(self, module: nn.Module, kwargs: dict) -> Cache | None:
        """The cache this forward updates, created here when the model would create one."""
        cache = kwargs.pop("past_key_values", None)  # the deprecated name of `cache`
        cache = kwargs.get("cache") if kwargs.get("cache") is not None else cache
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(module.config, "use_cache", False)
        # Checkpointed training makes the layers drop the cache: Engram drops its state too.
        checkpointing = getattr(module, "gradient_checkpointing", False) and module.training
        if checkpointing and torch.is_grad_enabled():
            return None
        if cache is None and use_cache:
            # What the model would build itself: built here, it carries Engram's state too.
            cache = DynamicCache(config=module.config)
        if cache is not None:
            kwargs["cache"] = cache
        return cache


def _follow(engram: Engram, block: nn.Module) -> Engram:
    """`engram` on its decoder layer's device and dtype. A table still on the meta device (built
    under `lazy_tables()`, for a placement plan to allocate) stays there."""
    param = next(p for p in block.parameters() if p.is_floating_point())
    lazy = engram.table if engram.table is not None and engram.table.weight.is_meta else None
    if lazy is not None:
        engram.table = None
    engram.to(device=param.device, dtype=param.dtype)
    if lazy is not None:
        engram.table = lazy
    return engram


# ---- public API ----------------------------------------------------------------------------------
def as_engram_tokenizer(tokenizer: Tokenizer | Any) -> Tokenizer:
    """Our `Tokenizer` for: itself, a tokenizer.json path or local HF name, or a fast HF object.

    A transformers tokenizer object is converted from its `backend_tokenizer` with padding and
    truncation cleared (they change no id, but a padded call switches them on and would change
    the fingerprint). The wrapper may also have rewritten the backend (e.g. its post-processor),
    so resolve the spec from the converted tokenizer when you start from such an object.
    """
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, str | Path):
        return load_tokenizer(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"{type(tokenizer).__name__} is not a tokenizer Engram can use: pass an "
            "engram Tokenizer, a tokenizer.json path, or a fast (tokenizers) HF tokenizer"
        )
    clean = BackendTokenizer.from_str(backend.to_str())
    clean.no_padding()
    clean.no_truncation()
    name = str(getattr(tokenizer, "name_or_path", "") or "transformers")
    return Tokenizer(clean, name, eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token)


def _check_target(
    model: PreTrainedModel, spec: HashSpec, layers: tuple[int, ...], verified_only: bool
) -> None:
    if verified_only:
        check_family(model)
    if model in _ATTACHED:
        raise ValueError("this model already has Engram attached")
    n = len(model.model.layers)
    if (
        not layers
        or len(set(layers)) != len(layers)
        or any(i not in spec.layer_ids for i in layers)
    ):
        raise ValueError(
            f"layers={list(layers)} must be distinct layers of the spec {list(spec.layer_ids)}"
        )
    if any(not 0 <= i < n for i in layers):
        raise ValueError(f"layers={list(layers)}: the model has {n} decoder layers")
    if spec.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the spec's tokenizer has {spec.vocab_size} ids but the model embeds "
            f"{model.config.vocab_size}"
        )


def add_engram(
    model: PreTrainedModel,
    spec: HashSpec,
    tokenizer: Tokenizer | Any,
    layers: Sequence[int] | None = None,
    config: EngramConfig | None = None,
    identity_init: bool = True,
    verified_only: bool = True,
) -> EngramAttachment:
    """Attach an Engram before attention in `layers` (default: the spec's) of a decoder.

    `tokenizer` is the model's tokenizer (see `as_engram_tokenizer`); its fingerprint must be
    the spec's. `config` sets the module's switches (hidden size: the model's, one branch).
    `identity_init` zeroes the value projection, so the attached model computes exactly what
    the base model did until it is trained (the paper trains from scratch and is silent on
    this); False keeps the demo's initialisation. `verified_only=False` skips the check that
    the model's family is one Engram is verified on (`engram.hf.families`), for checking a new
    one. Returns the attachment, also what `get_attachment(model)` returns.
    """
    layers = tuple(spec.layer_ids if layers is None else layers)
    _check_target(model, spec, layers, verified_only)
    tok = as_engram_tokenizer(tokenizer)
    if tok.fingerprint != spec.tokenizer_fingerprint:
        raise ValueError(
            f"tokenizer fingerprint {tok.fingerprint[:12]} is not the spec's "
            f"{spec.tokenizer_fingerprint[:12]}: resolve the spec with this tokenizer"
        )
    d = model.config.hidden_size
    config = config if config is not None else EngramConfig(hidden_size=d)
    if config.hidden_size != d or config.num_branches != 1:
        raise ValueError(
            f"config has hidden_size={config.hidden_size}, num_branches={config.num_branches}; "
            f"this model needs hidden_size={d} and one branch"
        )
    attachment = EngramAttachment(model, spec, tok, layers, config)
    if identity_init:
        with torch.no_grad():
            for engram in attachment.modules.values():
                engram.value_proj.weight.zero_()
                engram.value_proj.bias.zero_()
    _ATTACHED[model] = attachment
    return attachment


def get_attachment(model: PreTrainedModel) -> EngramAttachment:
    attachment = _ATTACHED.get(model)
    if attachment is None:
        raise ValueError("this model has no Engram: call add_engram or load_engram first")
    return attachment


def engram_parameters(model: PreTrainedModel) -> list[nn.Parameter]:
    """Every parameter of the attached Engram modules (tables, projections, norms, conv)."""
    return get_attachment(model).parameters()


def freeze_backbone(model: PreTrainedModel) -> list[nn.Parameter]:
    """Train Engram alone: every other parameter stops requiring grad. Returns the trainable."""
    trainable = {id(p) for p in engram_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return engram_parameters(model)


def engram_param_groups(
    model: PreTrainedModel, lr: float, table_lr_multiplier: float = 5.0, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimiser groups as the paper trains Engram: tables at 5x the rate without weight decay."""
    engrams = get_attachment(model).modules.values()
    tables = [e.table.weight for e in engrams]
    table_ids = {id(p) for p in tables}
    dense = [p for e in engrams for p in e.parameters() if id(p) not in table_ids]
    return [
        {"params": tables, "lr": lr * table_lr_multiplier, "weight_decay": 0.0},
        {"params": dense, "lr": lr, "weight_decay": weight_decay},
    ]


# ---- saving and loading --------------------------------------------------------------------------
def save_engram(
    model: PreTrainedModel, directory: str | Path, tables: dict[str, Any] | None = None
) -> Path:
    """Write the Engram parameters (safetensors) and their spec, layers and tokenizer (JSON),
    with the SHA-256 of each file it holds. `tables`: tables placed off the model (host, disk)
    that the caller has written into `directory/tables` ({"plan": a TablePlan as data,
    "saved": their manifest entries}, as a checkpoint holds them); `load_engram` places them
    again, reading disk tables where they lie."""
    attachment = get_attachment(model)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{layer}.{name}": t.detach().cpu().contiguous()
        for layer, engram in attachment.modules.items()
        for name, t in engram.state_dict().items()
    }
    save_tensors(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    fsync_file(folder / WEIGHTS_FILE)
    meta = {
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "layers": list(attachment.layers),
        "tokenizer_fingerprint": attachment.tokenizer.fingerprint,
        "engram": asdict(attachment.config),
        "spec": attachment.spec.to_dict(),
        **({"tables": tables} if tables else {}),
    }
    files = [folder / WEIGHTS_FILE]
    if tables:
        files += sorted(p for p in (folder / TABLES).rglob("*") if p.is_file())
    meta[FILES] = {p.relative_to(folder).as_posix(): file_digest(p) for p in files}
    (folder / META_FILE).write_text(json.dumps(seal(meta), indent=2), encoding="utf-8")
    fsync_file(folder / META_FILE)
    fsync_dir(folder)
    return folder


def _read_meta(folder: Path) -> tuple[dict[str, Any], HashSpec, EngramConfig]:
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder / META_FILE} is missing or not JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else meta
        raise ValueError(
            f"{META_FILE} format_version={found!r}; this library reads {FORMAT_VERSION}"
        )
    unseal(meta, str(folder / META_FILE))
    if FILES in meta:  # written before digests: accepted as it is
        check_digests(folder, meta[FILES], f"Engram folder {folder}", "is damaged")
    try:
        return meta, HashSpec.from_dict(meta["spec"]), EngramConfig(**meta["engram"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{META_FILE} is missing or has a malformed field: {e}") from e


def load_engram(
    model: PreTrainedModel,
    directory: str | Path,
    tokenizer: Tokenizer | Any,
    verified_only: bool = True,
) -> EngramAttachment:
    """Attach (unless attached already) and load what `save_engram` wrote.

    Raises ValueError when the saved tokenizer fingerprint is not `tokenizer`'s, or when the
    model already has an Engram with another spec, other layers or another module config.
    """
    folder = Path(directory)
    meta, spec, config = _read_meta(folder)
    tok = as_engram_tokenizer(tokenizer)
    if tok.fingerprint != meta["tokenizer_fingerprint"]:
        raise ValueError(
            f"the Engram in {folder} was trained with tokenizer "
            f"{meta['tokenizer_fingerprint'][:12]}, not this one ({tok.fingerprint[:12]})"
        )
    layers = tuple(meta["layers"])
    attachment = _ATTACHED.get(model)
    placed = meta.get("tables")
    if attachment is None:
        with lazy_tables() if placed else nullcontext():  # the placement allocates its tables
            attachment = add_engram(model, spec, tok, layers, config, verified_only=verified_only)
        if placed:
            attachment.tables = place_saved(attachment, placed, folder / TABLES)
    elif placed:
        raise ValueError(f"{folder} holds placed tables: load it into a model without Engram")
    elif attachment.spec != spec:
        raise ValueError(f"the saved spec ({spec.digest}) differs from the attached one")
    elif attachment.layers != layers:
        raise ValueError(f"saved layers {list(layers)} differ from attached {attachment.layers}")
    elif attachment.config != config:
        raise ValueError(f"saved Engram config {config} differs from attached {attachment.config}")
    _load_weights(attachment, folder / WEIGHTS_FILE)
    return attachment


def place_saved(attachment: EngramAttachment, tables: dict[str, Any], folder: Path) -> PlacedTables:
    """The attachment's tables as `save_engram` wrote them into `folder`: placed as the run
    placed them (a disk table mapped read-only where it lies), their rows restored."""
    from engram.inference.load import place_saved_tables, restore_saved

    try:
        plan, saved = from_dict(TablePlan, tables["plan"]), tables["saved"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{folder.parent / META_FILE} has malformed tables: {e}") from e
    memories = attachment.engram_layers
    for memory in memories:  # the run's inits: untouched rows read as them
        init = tables.get("inits", {}).get(str(memory.layer_id))
        if init is None:
            raise ValueError(f"{folder.parent / META_FILE} has no init for layer {memory.layer_id}")
        memory.init = RowInit.from_json(init)
    device = next(p for p in memories[0].parameters() if not p.is_meta).device
    betas = tuple(tables.get("betas", (0.9, 0.999)))  # the row optimiser's, as saved
    placed = place_saved_tables(memories, plan, device, folder, saved, betas)
    try:
        restore_saved(placed, plan, folder, saved)
    except BaseException:
        placed.close()
        raise
    return placed


def _load_weights(attachment: EngramAttachment, path: Path) -> None:
    tensors = load_file(str(path))
    expected = {
        f"{layer}.{name}" for layer, e in attachment.modules.items() for name in e.state_dict()
    }
    if set(tensors) != expected:
        raise ValueError(
            f"{path.name} does not match the attached modules: missing "
            f"{sorted(expected - set(tensors))}, unexpected {sorted(set(tensors) - expected)}"
        )
    for layer, engram in attachment.modules.items():
        prefix = f"{layer}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            engram.load_state_dict(state, strict=True)
        except RuntimeError as e:  # shape mismatches
            raise ValueError(f"{path.name}, layer {layer}: {e}") from e


__all__ = [
    "EngramAttachment",
    "add_engram",
    "as_engram_tokenizer",
    "engram_param_groups",
    "engram_parameters",
    "freeze_backbone",
    "get_attachment",
    "load_engram",
    "save_engram",
]
