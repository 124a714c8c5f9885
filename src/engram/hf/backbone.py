"""A pretrained Hugging Face decoder as the trainer's backbone: `HFEngramLM`.

`engram train` with `base.path` set trains a model someone else pretrained, with Engram
attached (`engram.hf.attach`), through the same loop, table placements, checkpoints, resume and
evaluation as our own LM. `HFEngramLM` is the seam: it holds the transformers model and its
attachment and answers to the interface the trainer drives `EngramLM` through:

    forward(ids, rows=None, targets=None, engram_off=False) -> logits [B, T, V] (, mean CE)
    config, spec, hasher        the run's ModelConfig (derived from the pretrained config, with
                                the run's Engram settings), the hash spec and its hasher
    engram_layers               the attached Engram modules, for the table plan to place
    blocks                      the decoder layers, which FSDP shards one by one
    hash(ids), readout(x)       rows of a sequence; logits of any layer's stream (the studies)
    moe_layers, update_route_biases()   none: a pretrained MoE balances itself
    register_rows_hook(hook)    a placement starts fetching rows once a forward has them

The data loader hashes every batch (rows for each Engram layer); the attachment uses those rows
rather than hashing again. Nothing is downloaded: `from_pretrained` reads a local folder only.

Legend: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import fnmatch
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from engram.config import BaseConfig
from engram.hashing import NgramHasher
from engram.hf.attach import EngramAttachment, add_engram
from engram.hf.families import VERIFIED, check_family
from engram.model import ModelConfig
from engram.model.lm import next_token_loss
from engram.module import HashedMemory
from engram.spec import HashSpec

try:
    from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PreTrainedModel
    from transformers.cache_utils import Cache
    from transformers.utils import logging as hf_logging
except ImportError as e:  # pragma: no cover - the `hf` extra is missing
    raise ImportError("a pretrained backbone needs transformers: pip install engram-lm[hf]") from e

Rows = dict[int, torch.Tensor]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "auto": "auto"}


def base_model_config(base: BaseConfig, settings: ModelConfig, vocab_size: int) -> ModelConfig:
    """The run's ModelConfig for a pretrained model: its shape, read from its config.json
    (nothing allocated), with the run's Engram settings. ValueError names what is wrong."""
    folder = Path(base.path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"base.path={base.path!r} is not a model folder (no config.json)")
    try:
        hf = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"base.path={base.path!r}: cannot read its config.json: {e}") from e
    if hf.model_type not in VERIFIED:  # before reading its shape: a family may name it otherwise
        found = (getattr(hf, "architectures", None) or [hf.model_type])[0]
        raise ValueError(
            f"{base.path} holds a {found} (model_type {hf.model_type!r}), not a family Engram "
            "is verified on (engram.hf.families.VERIFIED, docs/hf.md)"
        )
    heads = hf.num_attention_heads
    config = replace(
        settings,
        vocab_size=vocab_size,
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=heads,
        n_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
        ffn_hidden=hf.intermediate_size,
        moe=None,
        hc_branches=1,
        max_seq_len=getattr(hf, "max_position_embeddings", settings.max_seq_len),
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
    )
    if config.engram is not None:
        bad = [i for i in config.engram.spec.layer_ids if not 0 <= i < config.n_layers]
        if bad:
            raise ValueError(
                f"Engram layer_ids {bad} are outside {base.path}'s {config.n_layers} layers"
            )
    return config


def load_base(base: BaseConfig) -> PreTrainedModel:
    """The pretrained model in `base.path`, refused by name unless its family is supported."""
    hf_logging.disable_progress_bar()  # one line per weight file on stderr otherwise
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base.path, local_files_only=True, dtype=DTYPES[base.dtype]
        )
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"base.path={base.path!r}: cannot load the model: {e}") from e
    check_family(model)
    return model


class HFEngramLM(nn.Module):
    """A pretrained decoder with Engram attached, driven as the trainer drives `EngramLM`."""

    def __init__(
        self,
        hf: PreTrainedModel,
        config: ModelConfig,
        spec: HashSpec | None = None,
        hasher: NgramHasher | None = None,
        attachment: EngramAttachment | None = None,
    ) -> None:
        super().__init__()
        self.hf, self.config, self.spec, self.hasher = hf, config, spec, hasher
        self.attachment = attachment
        self._rows_hooks: OrderedDict[int, Callable[[Rows], None]] = OrderedDict()

    @classmethod
    def build(
        cls,
        base: BaseConfig,
        config: ModelConfig,
        spec: HashSpec | None,
        hasher: NgramHasher | None,
        tokenizer,
    ) -> HFEngramLM:
        """Load `base`, attach Engram as `config.engram` says (zeroed value projection: the
        model starts as the pretrained one), and freeze what `base.train` does not name."""
        hf = load_base(base)
        _set_trainable(hf, base)
        attachment = None
        if spec is not None:
            module = config.engram.module_config(config.d_model, num_branches=1)
            attachment = add_engram(hf, spec, tokenizer, config=module)
        return cls(hf, config, spec, hasher, attachment)

    @property
    def engram_layers(self) -> list[HashedMemory]:
        return self.attachment.engram_layers if self.attachment is not None else []

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder layers: the units a data-parallel plan shards (`engram.parallel`)."""
        return self.hf.model.layers

    @property
    def moe_layers(self) -> list[nn.Module]:
        return []

    def update_route_biases(self) -> dict[str, float]:
        return {}

    def hash(self, ids: torch.Tensor, doc_starts: torch.Tensor | None = None) -> Rows | None:
        """Rows for every Engram layer of `ids` [B, T] (None without Engram)."""
        return self.hasher(ids, doc_starts=doc_starts) if self.hasher is not None else None

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] of residual streams x [..., M, d] (M = 1 here): the final norm and
        head, as the model reads its last layer out (the logit lens reads any layer so)."""
        logits = self.hf.lm_head(self.hf.model.norm(x.mean(dim=-2)))
        return logits[..., : self.config.vocab_size]

    def register_rows_hook(self, hook: Callable[[Rows], None]) -> RemovableHandle:
        """Call `hook(rows)` in every forward once its rows are known, before any layer runs."""
        handle = RemovableHandle(self._rows_hooks)
        self._rows_hooks[handle.id] = hook
        return handle

    def new_cache(self, batch: int, slots: int) -> Cache:
        """A cache for `engram.inference.generate` (the K/V, and Engram's state once used)."""
        return DynamicCache(config=self.hf.config)

    def forward(
        self,
        ids: torch.Tensor,
        rows: Rows | None = None,
        targets: torch.Tensor | None = None,
        engram_off: bool = False,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T, V] of `ids` [B, T]; with `targets` also the mean CE. With a `cache`
        (`new_cache`) the chunk continues the cached sequences, `attention_mask` [B, T] marking
        its real tokens, as our own LM's decoding does."""
        if ids.ndim != 2:
            raise ValueError(f"ids must be [B, T], got {list(ids.shape)}")
        attachment = self.attachment
        if attachment is not None and cache is None and not engram_off:
            if rows is None:
                rows = self.hasher(ids)
            for hook in self._rows_hooks.values():
                hook(rows)
            attachment.given_rows = rows
        if attachment is not None:
            attachment.off = engram_off
        try:
            logits = self._logits(ids, cache, attention_mask)  # [B, T, V']
        finally:
            if attachment is not None:
                attachment.given_rows, attachment.off = None, False
        if logits.shape[-1] != self.config.vocab_size:  # an embedding padded past the tokenizer
            logits = logits[..., : self.config.vocab_size].contiguous()
        if targets is None:
            return logits
        return logits, next_token_loss(logits, targets)

    def _logits(
        self, ids: torch.Tensor, cache: Cache | None, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        if cache is None:
            return self.hf(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits
        # transformers takes the mask over past and chunk, and (left padding) positions that
        # count real tokens only, as its own generate() derives them.
        chunk = torch.ones_like(ids) if attention_mask is None else attention_mask.long()
        seen = getattr(cache, "engram_seen_mask", None)
        mask = chunk if seen is None else torch.cat([seen, chunk], dim=1)  # [B, past + T]
        cache.engram_seen_mask = mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        out = self.hf(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
        )
        return out.logits


def _set_trainable(hf: PreTrainedModel, base: BaseConfig) -> None:
    """Freeze every backbone parameter `base.train` does not name (before Engram is attached:
    Engram's own parameters always train). A glob that names nothing is a ValueError."""
    patterns = base.patterns
    names = [name for name, _ in hf.named_parameters()]
    unmatched = [p for p in patterns if not fnmatch.filter(names, p)]
    if unmatched:
        raise ValueError(
            f"base.train names no parameter of {base.path}: {unmatched} (names look like "
            f"{names[0]!r})"
        )
    for name, param in hf.named_parameters():
        param.requires_grad_(any(fnmatch.fnmatchcase(name, p) for p in patterns))
