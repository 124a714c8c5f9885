"""Whole decode steps captured ahead of time: backbone, Engram and head in one compiled call.

Why: on a CPU a decode step of a small model is a few hundred tiny ops, and each costs
microseconds of dispatch whatever its size. `engram.inference.compiled` compiles Engram's part
of a step; what is left around it (the backbone's ops, the model's bookkeeping) is the same in a
model without Engram, so Engram's share can only shrink so far (docs/benchmarks.md, Cached
decoding). Capturing the whole step, for a model with Engram and one without alike, removes
the dispatch from both and leaves each what it computes.

A captured step needs static shapes and no reads to the host, so it differs from the eager
step in three places, each with the same sums up to rounding (tests/test_captured_decoding.py):

- attention reads every slot of the cache, the unused ones masked, instead of a growing slice;
  the step's position is a tensor, so one compiled package serves every step;
- each token's routed experts are read from stacked copies of the experts' weights by index
  (a gather inside the kernel), instead of sorting tokens by expert and looping;
- each Engram layer computes its value and keys in one matrix product, from a stacked copy of
  its two projections;
- the cache's bookkeeping (slot validity, positions, the last EOS, the N-gram history) is
  updated in place.

`CapturedDecoder(model)` holds a snapshot of the weights: the parameters as they are when it is
built or `refresh()`ed, and the stacked copies made then. Weights read only through stacked
copies (the routed experts', Engram's two projections) are not inputs of the compiled step: a
runner's call costs about 0.1 us per input tensor on this project's CPU
(`bench/call_overhead.py`), and the `demo` model's routed experts alone are 384 tensors. Decode
with `decoder(ids, cache)` on a cache from `model.new_cache`, after a prefill through the model
itself; it returns the step's logits and advances the cache as `model(ids, cache=cache)` would;
`prepare(cache)` compiles ahead of the first step. A chunk of more than one token, or one with
padding, stays with the model. `engram.inference.generate(..., decoder=...)` decodes with it.
Packages are compiled per layout (batch size, cache capacity, dtypes) and kept with those of
`engram.inference.compiled`.

The decoder binds a package to one cache's tensors: the inputs are listed once, a step writes
only its ids and the cache's length into tensors of its own, and the compiled step updates the
cache in place, its N-gram history too (the cache's history is the decoder's own from the
first step). A new cache, or a step of the
model that replaced one of its tensors, binds anew. On CUDA, `cuda_graph=True` records each
binding as a CUDA graph and replays it: one launch per step instead of one per kernel. A
decoder is for one thread at a time: its steps share buffers, and its runner skips the locks
and events that calls from several threads would need.

Legend: B batch, S cache slots, M branches, d width, E experts, k experts per token, V vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import engram.inference.captured
import engram.model.lm
from engram.hashing import HashState, check_ids
from engram.inference.compiled import AotFunction, _layout, _source_digest, _tensor_slots
from engram.model import EngramLM
from engram.model.decode_cache import DecodeCache
from engram.model.layers import Attention
from engram.model.moe import MoE
from engram.vocab import cache_dir


class CapturedDecoder:
    """One-token decode steps of `model`, each one AOT-compiled call (see the module doc)."""

    def __init__(
        self, model: EngramLM, directory: Path | str | None = None, cuda_graph: bool = False
    ) -> None:
        if any(memory.row_source is not None for memory in model.engram_layers):
            raise ValueError(
                "a table read through a row source (host or disk placement) cannot be captured: "
                "decode with the model itself"
            )
        self.model, self.cuda_graph = model, cuda_graph
        where = Path(directory) if directory is not None else cache_dir() / "aot"
        source = (
            _source_digest(engram.inference.captured)
            + _source_digest(engram.model.lm)
            + repr(model.config)
            + (model.spec.digest if model.spec is not None else "")
        )
        self._step = _Step(model)
        # Single-threaded: a decoder writes each step's ids into buffers of its own anyway.
        self.function = AotFunction(
            "decode-step", self._step.traced, source, where, single_threaded=True
        )
        self.refresh()

    def refresh(self) -> None:
        """Take a new snapshot of the model's weights (after training or loading them)."""
        self._weights = self._step.weights()
        self._weights_layout = _layout(self._weights)
        self._bound: _Bound | None = None

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
        """Logits [B, 1, V] of one decode step of ids [B, 1]; `cache` advances by one slot."""
        model = self.model
        if ids.ndim != 2 or ids.shape[1] != 1:
            raise ValueError(f"a captured step takes ids [B, 1], got {list(ids.shape)}")
        check_ids(ids, model.config.vocab_size)
        if cache.batch_size != ids.shape[0]:
            raise ValueError(
                f"the cache holds {cache.batch_size} sequences, ids have {ids.shape[0]}"
            )
        if cache.length + 1 > cache.capacity:
            raise ValueError(
                f"the cache has room for {cache.capacity} tokens and all are used: build a "
                "larger cache"
            )
        top = model.config.max_seq_len
        if cache.length + 1 > top and int(cache.positions.max()) >= top:
            raise ValueError(f"position {int(cache.positions.max())} exceeds max_seq_len={top}")
        logits = self._bind(cache)(ids, cache.length)
        cache.length += 1
        return logits

    @torch.inference_mode()
    def prepare(self, cache: DecodeCache) -> None:
        """Load, or compile, the package for `cache`'s layout now, so that no step waits for it."""
        self._bind(cache)

    def release(self) -> None:
        """Let go of the cache the decoder is bound to, so that its tensors are freed with it
        (the next step binds anew; `generate` releases when it returns)."""
        self._bound = None

    def _bind(self, cache: DecodeCache) -> _Bound:
        """The compiled step bound to `cache`'s tensors, bound anew when one of them is not the
        object it was (another cache, or a step of the model that replaced a tensor)."""
        if self._bound is not None and self._bound.fits(self._cache_tensors(cache)):
            return self._bound
        if cache.hash_state is not None:  # ours to update in place from now on
            history = cache.hash_state.history.clone(memory_format=torch.contiguous_format)
            cache.hash_state = HashState(history, cache.hash_state.pad_id)
        state = self._cache_tensors(cache)
        device = cache.valid.device
        ids = torch.zeros(cache.batch_size, 1, dtype=torch.int64, device=device)
        length = torch.zeros((), dtype=torch.int64, device=device)
        layout = (self._weights_layout, _layout(state), _layout([ids, length]))
        run = self.function.prepare(layout, [*self._weights, ids, length, *state])
        graph = self.cuda_graph and device.type == "cuda"
        self._bound = _Bound(run, self._weights, [ids, length, *state], graph)
        return self._bound

    def _cache_tensors(self, cache: DecodeCache) -> list[torch.Tensor]:
        tensors = [*cache.keys, *cache.values, cache.valid, cache.positions, cache.last_eos]
        tensors += [cache.conv[layer] for layer in self._step.conv_layers]
        if cache.hash_state is not None:
            tensors.append(cache.hash_state.history)
        return tensors


class _Bound:
    """One layout's compiled step bound to one cache's tensors. The inputs are listed once;
    each step writes its ids and the cache's length into buffers of their own, and the compiled
    step updates the cache in place (its N-gram history too), so that every step reads the same
    tensors. On CUDA, with `cuda_graph`, the call is recorded once as a CUDA graph and replayed:
    one launch a step."""

    def __init__(self, run, weights: list, step: list, graph: bool) -> None:
        self.run, self.weights, self.step = run, weights, step
        self.ids, self.length, *self.state = step
        self.inputs = [*weights, *step]
        self.graph: torch.cuda.CUDAGraph | None = None
        if graph:
            self._record()

    def fits(self, state: list[torch.Tensor]) -> bool:
        return len(state) == len(self.state) and all(
            a is b for a, b in zip(state, self.state, strict=True)
        )

    def __call__(self, ids: torch.Tensor, length: int) -> torch.Tensor:
        self.ids.copy_(ids)
        self.length.fill_(length)
        if self.graph is None:
            return self.run(self.inputs)[0]
        self.graph.replay()
        return self.outputs[0].clone()  # the graph's own buffer: the next replay overwrites it

    def _record(self) -> None:
        """Record the step as a CUDA graph. Recording launches nothing, but the first run of a
        package initialises libraries, which a recording may not do: so a run first, on copies
        of the step's inputs (a run on the cache itself would advance it)."""
        scratch = [*self.weights, *(t.clone() for t in self.step)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.run(scratch)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self.run(self.inputs)


class _Step(nn.Module):
    """The traced step: a pure function of the weights, the ids and the cache's tensors."""

    def __init__(self, model: EngramLM) -> None:
        super().__init__()
        self.model = model
        self.moe_blocks = [i for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoE)]
        self.engram_blocks = [i for i, b in enumerate(model.blocks) if b.engram is not None]
        # Weights the step reads through stacked copies only are not inputs.
        stacked = [model.blocks[i].ffn.experts for i in self.moe_blocks]
        stacked += [proj for i in self.engram_blocks for proj in model.blocks[i].engram.projections]
        self.left_out = {id(p) for module in stacked for p in module.parameters()}
        self.slots, self.count = _slots(model, _kept(model, self.left_out))
        self.conv_layers = [
            b.layer for b in model.blocks if b.engram is not None and b.engram.conv is not None
        ]
        self.hashed = model.spec is not None and model.hasher is not None

    def weights(self) -> list[torch.Tensor]:
        """Parameters and buffers (aliases: a later `param.data = ...` cannot move them under
        the compiled code) but those read through stacked copies, the hasher's constants, each
        MoE's experts stacked, and each Engram layer's projections stacked."""
        model = self.model
        tensors = [t.detach() for t in _kept(model, self.left_out)]
        if self.hashed:
            device = next(model.parameters()).device
            tensors += list(model.hasher._constants(device))
        for i in self.moe_blocks:
            experts = model.blocks[i].ffn.experts
            tensors.append(torch.stack([e.gate_up.weight.detach() for e in experts]))
            tensors.append(torch.stack([e.down.weight.detach() for e in experts]))
        for i in self.engram_blocks:
            tensors += model.blocks[i].engram.stacked_projection()
        return tensors

    def traced(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The flat function compiled: weights() then the step's inputs, in order."""
        rest = list(tensors[self.count :])
        constants = [rest.pop(0) for _ in range(3)] if self.hashed else []
        experts = {i: (rest.pop(0), rest.pop(0)) for i in self.moe_blocks}
        projections = {i: (rest.pop(0), rest.pop(0)) for i in self.engram_blocks}
        saved = [owner[key] for owner, key, _ in self.slots]
        try:  # each slot once, so that a shared module (the rotary tables) is restored exactly
            for owner, key, i in self.slots:
                owner[key] = tensors[i]
            return self(constants, experts, projections, *rest)
        finally:
            for (owner, key, _), original in zip(self.slots, saved, strict=True):
                owner[key] = original

    def forward(
        self, constants, experts, projections, ids, length, *cache
    ) -> tuple[torch.Tensor, ...]:
        model = self.model
        n = len(model.blocks)
        keys, values = cache[:n], cache[n : 2 * n]
        valid, positions, last_eos = cache[2 * n : 2 * n + 3]
        windows = dict(zip(self.conv_layers, cache[2 * n + 3 :], strict=False))
        B, S = valid.shape
        # 1. Rows of every Engram layer from the N-gram history: [L, B, 1, H]
        rows, history = {}, None
        if self.hashed:
            stacked, history = model.hasher.hash_one(ids, cache[-1], *constants)
            rows = dict(zip(model.spec.layer_ids, stacked.unbind(0), strict=True))
        eos = model.spec.eos_id if model.spec is not None else None
        starts = last_eos[:, None] if eos is not None else None  # [B, 1]
        # 2. What a query may see: the real slots so far and its own. mask [B, 1, 1, S]
        slot = torch.arange(S, device=ids.device)
        mask = (valid | (slot == length)[None, :])[:, None, None, :]
        x = model.embed(ids)  # [B, 1, d]
        for memory in model.input_memory:  # OverEncoding: the N-grams join the token
            x = x + memory(rows[memory.layer_id])
        x = x.unsqueeze(2).expand(B, 1, model.config.hc_branches, model.config.d_model)
        for i, block in enumerate(model.blocks):  # x [B, 1, M, d]
            if block.engram is not None:  # the eager step, whatever fast step is installed
                window = windows.get(block.layer)
                x = x + block.engram._step(x, rows[block.layer], starts, window, projections[i])
            k_cache, v_cache = keys[i], values[i]

            def attend(h, attn=block.attn, norm=block.attn_norm, kc=k_cache, vc=v_cache):
                return _attention(attn, norm(h), positions, kc, vc, mask, length)

            x = block.attn_res(x, attend)
            if i in experts:
                gate_up, down = experts[i]

                def routed(h, f=block.ffn, n=block.ffn_norm, g=gate_up, w=down):
                    return _moe(f, n(h), g, w)

                x = block.ffn_res(x, routed)
            else:
                x = block.ffn_res(x, lambda h, f=block.ffn, n=block.ffn_norm: f(n(h)))
        logits = model.readout(x)  # [B, 1, V]
        # 3. The cache's bookkeeping, in place: what DecodeCache.commit does for one token
        valid.index_fill_(1, length.view(1), True)
        positions.add_(1)
        if eos is not None:
            last_eos.copy_(ids[:, -1] == eos)
        if history is not None:
            cache[-1].copy_(history)
        return (logits,)


def _attention(
    attn: Attention,
    x: torch.Tensor,
    positions: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    length: torch.Tensor,
) -> torch.Tensor:
    """`Attention.forward` for one token over every slot of its cache: x [B, 1, d] -> [B, 1, d].
    The token's K/V are written to slot `length`; unused slots are masked, not sliced off."""
    B, _, d = x.shape
    q = attn.q_proj(x).view(B, 1, attn.n_heads, attn.head_dim).transpose(1, 2)  # [B, nh, 1, hd]
    kv = attn.kv_proj(x).view(B, 1, 2, attn.n_kv, attn.head_dim)
    k, v = (t.transpose(1, 2) for t in kv.unbind(2))  # [B, nkv, 1, hd]
    q, k = attn.rotary.at(q, positions[:, None]), attn.rotary.at(k, positions[:, None])
    keys.index_copy_(2, length.view(1), k.to(keys.dtype))
    values.index_copy_(2, length.view(1), v.to(values.dtype))
    y = F.scaled_dot_product_attention(
        q,
        keys.to(q.dtype),
        values.to(q.dtype),
        attn_mask=mask,
        enable_gqa=attn.n_kv != attn.n_heads,
    )
    return attn.o_proj(y.transpose(1, 2).reshape(B, 1, d))


def _moe(moe: MoE, h: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """`MoE.forward` of a few tokens with each token's experts read by index from the stacked
    weights gate_up [E, 2h, d] and down [E, d, h]: no sort, no loop, no read to the host."""
    shape = h.shape
    flat = h.reshape(-1, shape[-1])  # [N, d]
    idx, weights = moe.route(flat)  # [N, k] each
    hidden = (gate_up[idx] * flat[:, None, None, :]).sum(-1)  # [N, k, 2h]
    gate, up = hidden.chunk(2, dim=-1)
    act = F.silu(gate) * up  # [N, k, h]
    out = ((down[idx] * act[:, :, None, :]).sum(-1) * weights[..., None]).sum(1)  # [N, d]
    if moe.shared is not None:
        out = out + moe.shared(flat)
    return out.view(shape)


def _distinct_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer once (a tied weight too), in a fixed order."""
    seen: dict[int, torch.Tensor] = {}
    for _, owner, key in _tensor_slots(model):
        seen.setdefault(id(owner[key]), owner[key])
    return list(seen.values())


def _kept(model: nn.Module, leave_out: set[int]) -> list[torch.Tensor]:
    """The distinct tensors but those whose id is in `leave_out` (they stay where they are,
    unread): the step's weight inputs, in their order."""
    return [t for t in _distinct_tensors(model) if id(t) not in leave_out]


def _slots(model: nn.Module, kept: list[torch.Tensor]) -> tuple[list[tuple[dict, str, int]], int]:
    """(owning dict, key, input index) of every place a tensor of `kept` sits, each place once
    (a module shared by the blocks is one place), and the number of such inputs."""
    index = {id(t): i for i, t in enumerate(kept)}
    slots = [
        (owner, key, index[id(owner[key])])
        for _, owner, key in _tensor_slots(model)
        if id(owner[key]) in index
    ]
    return slots, len(index)


__all__ = ["CapturedDecoder"]
