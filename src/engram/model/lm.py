"""The Engram language model: a decoder-only Transformer with Engram memory at chosen blocks.

Each block (paper section 2.4: Engram sits before attention):

    x = x + Engram(x, rows)                  only at the spec's layer_ids; per-branch gated memory
    x = R_attn(x, h -> Attention(RMSNorm(h)))
    x = R_ffn(x, h -> FFN(RMSNorm(h)))       SwiGLU, or DeepSeekMoE after the first dense blocks

R is the plain residual for M = 1 and an mHC hyper-connection for M > 1. With the memory's
site "input" (the OverEncoding baseline of the paper's memory-scaling study) no
block holds an Engram; the same tables' lookups are projected and added to the token embedding.
The model is single-device code: it never names a device and knows nothing of training or storage.

Legend: B batch, T time, M residual branches, d width, V vocabulary, H Engram heads.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from engram.hashing import NgramHasher
from engram.model.config import ModelConfig
from engram.model.decode_cache import Chunk, DecodeCache, cached_chunk, plain_chunk
from engram.model.hyper import residual_for
from engram.model.layers import Attention, Rotary, SwiGLU
from engram.model.moe import MoE
from engram.module import Engram, HashedMemory, OverEncoding
from engram.spec import HashSpec

Rows = dict[int, torch.Tensor]  # Engram layer id -> row indices [B, T, H]


class Block(nn.Module):
    def __init__(
        self, config: ModelConfig, layer: int, rotary: Rotary, spec: HashSpec | None
    ) -> None:
        super().__init__()
        d, M = config.d_model, config.hc_branches
        self.layer = layer
        self.engram = None
        opts = config.engram
        if spec is not None and layer in spec.layer_ids and opts.site == "block":
            self.engram = Engram(spec, layer, opts.module_config(d, M))
        self.attn_norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.attn = Attention(config, rotary, layer)
        self.attn_res = residual_for(d, M)
        self.ffn_norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.ffn = (
            MoE(d, config.moe) if config.is_moe_layer(layer) else SwiGLU(d, config.ffn_hidden)
        )
        self.ffn_res = residual_for(d, M)

    def forward(
        self,
        x: torch.Tensor,
        rows: Rows | None,
        chunk: Chunk | None = None,
        cache: DecodeCache | None = None,
        engram_off: bool = False,
    ) -> torch.Tensor:
        # x [B, T, M, d]
        if self.engram is not None and not engram_off:
            starts = pads = window = None
            if chunk is not None:
                starts, pads = chunk.starts, chunk.pads
            if cache is not None:
                window = cache.conv.get(self.layer)
            x = x + self.engram(x, rows[self.layer], starts, pads, window)
        x = self.attn_res(x, lambda h: self.attn(self.attn_norm(h), chunk, cache))
        return self.ffn_res(x, lambda h: self.ffn(self.ffn_norm(h)))


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [B, T, V] against targets [B, T] (-100 ignored), in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def _layout(spec_config) -> tuple:
    c = spec_config
    return (c.layer_ids, c.orders, c.heads_per_order, c.base_sizes, c.row_dim)


class EngramLM(nn.Module):
    """`forward(ids [B, T], rows=None, targets=None) -> logits [B, T, V]` (and the loss)."""

    def __init__(
        self, config: ModelConfig, spec: HashSpec | None = None, hasher: NgramHasher | None = None
    ) -> None:
        super().__init__()
        config.validate()
        if (config.engram is None) != (spec is None):
            raise ValueError("pass a resolved HashSpec exactly when the config has Engram")
        if spec is not None and _layout(spec.config) != _layout(config.engram.spec):
            raise ValueError(
                f"the spec's table layout {_layout(spec.config)} differs from the "
                f"config's {_layout(config.engram.spec)}"
            )
        if spec is not None and spec.vocab_size > config.vocab_size:
            raise ValueError(
                f"the spec's tokenizer has {spec.vocab_size} ids but the model's "
                f"vocab_size is {config.vocab_size}"
            )
        self.config, self.spec, self.hasher = config, spec, hasher
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        # OverEncoding tables (site "input"); empty for Engram and for no memory.
        inputs = spec.layer_ids if spec is not None and config.engram.site == "input" else ()
        self.input_memory = nn.ModuleList(
            OverEncoding(spec, layer, config.d_model, config.engram.table_init_std)
            for layer in inputs
        )
        rotary = Rotary(config.head_dim, config.max_seq_len, config.rope_theta)
        self.blocks = nn.ModuleList(Block(config, i, rotary, spec) for i in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._init_weights()
        # OrderedDict: torch's RemovableHandle holds its hooks by weak reference.
        self._rows_hooks: OrderedDict[int, Callable[[Rows], None]] = OrderedDict()
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    def _init_weights(self) -> None:
        """N(0, init_std) for projections and embeddings, zero biases. Engram tables keep their
        own init (`table_init_std`), the Engram conv and the mHC dynamic terms stay zero."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if name.endswith("_res") or ".conv" in name or name.endswith(".dynamic"):
                continue
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding) and not name.endswith(".table"):
                nn.init.normal_(module.weight, std=std)

    @property
    def engram_layers(self) -> list[HashedMemory]:
        """Every hashed N-gram memory: the blocks' Engrams, or the input OverEncoding tables.

        The optimiser's table group and the accounting of rows read both start here.
        """
        return [b.engram for b in self.blocks if b.engram is not None] + list(self.input_memory)

    def register_rows_hook(self, hook: Callable[[Rows], None]) -> RemovableHandle:
        """Call `hook(rows)` with each forward's rows of every Engram layer, before any layer runs.

        How a table placement (`engram.tables`) starts reading the rows of later layers while
        earlier layers compute. `handle.remove()` detaches it, as for torch's module hooks.
        """
        handle = RemovableHandle(self._rows_hooks)
        self._rows_hooks[handle.id] = hook
        return handle

    @property
    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    def hash(self, ids: torch.Tensor, doc_starts: torch.Tensor | None = None) -> Rows | None:
        """Rows for every Engram layer, through the attached hasher (None without Engram)."""
        if self.spec is None:
            return None
        if self.hasher is None:
            raise ValueError(
                "this model has Engram layers but no hasher: pass rows= (hash in "
                "the data loader) or build the model with a hasher"
            )
        return self.hasher(ids, doc_starts=doc_starts)

    def forward(
        self,
        ids: torch.Tensor,
        rows: Rows | None = None,
        targets: torch.Tensor | None = None,
        engram_off: bool = False,
        cache: DecodeCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T, V]; with `targets` [B, T] also the mean cross-entropy (-100 ignored).

        `engram_off=True` skips every Engram layer (the paper's switch-off test), and the
        OverEncoding tables of site "input" alike. With a `cache` (see `new_cache`) the
        chunk continues the cached sequences: the model hashes it itself from the cache's
        N-gram history, so `rows` must be None. `attention_mask` [B, T] (True = a real token)
        marks padding, which is then invisible to every other token, with or without a cache.
        """
        if ids.ndim != 2:
            raise ValueError(f"ids must be [B, T], got {list(ids.shape)}")
        B, T = ids.shape
        if attention_mask is not None and cache is None:
            cache = self.new_cache(B, T)  # a padded batch is a one-chunk decode
        eos_id = self.spec.eos_id if self.spec is not None else None
        if cache is None:
            chunk = plain_chunk(ids, eos_id)
        else:
            if rows is not None:
                raise ValueError("with a cache, pass rows=None: the cache holds the N-gram history")
            ids, chunk = cached_chunk(  # pads first
                ids, attention_mask, cache, eos_id, self.config.max_seq_len
            )
            if not engram_off:
                rows = self._hash_cached(ids, chunk, cache)
        if rows is None and not engram_off:
            rows = self.hash(ids)
        if rows is not None:
            for hook in self._rows_hooks.values():  # a placement may start fetching every layer
                hook(rows)
        M = self.config.hc_branches
        x = self.embed(ids)  # [B, T, d]
        if not engram_off:
            for memory in self.input_memory:  # OverEncoding: the N-grams join the token
                x = x + memory(rows[memory.layer_id])  # [B, T, d]
        x = x.unsqueeze(2).expand(B, T, M, self.config.d_model)  # [B, T, M, d]
        for block in self.blocks:
            x = block(x, rows, chunk, cache, engram_off)
        if cache is not None:
            cache.commit(chunk, ids, eos_id)
        logits = chunk.restore(self.readout(x))  # [B, T, V], in the caller's order
        if targets is None:
            return logits
        return logits, next_token_loss(logits, targets)

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] of branch streams x [..., M, d]: their mean, final norm and head.

        Also the early exit of the analyses (logit lens), which read any layer's stream this way.
        """
        return self.head(self.norm(x.mean(dim=-2)))

    def _hash_cached(self, ids: torch.Tensor, chunk: Chunk, cache: DecodeCache) -> Rows | None:
        if self.spec is None:
            return None
        if self.hasher is None:
            raise ValueError("cached decoding of an Engram model needs the model's hasher")
        rows, cache.hash_state = self.hasher.step(ids, cache.hash_state, pads=chunk.pads)
        return rows

    def new_cache(self, batch_size: int, capacity: int) -> DecodeCache:
        """An empty decoding cache for `batch_size` sequences of up to `capacity` tokens."""
        if batch_size < 1 or capacity < 1:
            raise ValueError(f"batch_size={batch_size} and capacity={capacity} must be >= 1")
        p = next(self.parameters())
        c, device = self.config, p.device
        kv = (batch_size, c.n_kv_heads, capacity, c.head_dim)
        conv = {
            b.layer: torch.zeros(
                batch_size, b.engram.conv.receptive, c.hc_branches, c.d_model, device=device
            )
            for b in self.blocks
            if b.engram is not None and b.engram.conv is not None
        }
        return DecodeCache(
            keys=[torch.zeros(kv, dtype=p.dtype, device=device) for _ in self.blocks],
            values=[torch.zeros(kv, dtype=p.dtype, device=device) for _ in self.blocks],
            valid=torch.zeros(batch_size, capacity, dtype=torch.bool, device=device),
            positions=torch.zeros(batch_size, dtype=torch.int64, device=device),
            last_eos=torch.zeros(batch_size, dtype=torch.bool, device=device),
            hash_state=(
                self.hasher.initial_state(batch_size, device)
                if self.spec is not None and self.hasher is not None
                else None
            ),
            conv=conv,
        )

    @torch.no_grad()
    def update_route_biases(self) -> dict[str, float]:
        """The MoE balancing step; call after each optimiser step. Returns worst-layer stats."""
        stats: dict[str, float] = {}
        for moe in self.moe_layers:
            for key, value in moe.update_route_bias().items():
                worse = max if key == "max_load" else min
                stats[key] = worse(stats.get(key, value), value)
        return stats
