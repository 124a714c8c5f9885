"""Text generation with the decoding cache: greedy, temperature, top-k and top-p sampling.

A batch of prompts of different lengths is left-padded and prefilled (in chunks of any size);
then every step feeds one token per sequence. The cache carries attention K/V, the N-gram
history and the Engram conv windows, so a step costs the same whatever the context length and
gives the logits the full forward would. A sequence that has finished (EOS, or its budget)
feeds padding from then on, which leaves its state untouched.

With a `CapturedDecoder` (`engram.inference.captured`), each one-token step is one compiled
call. A captured step has no padding mask, so a finished row goes on decoding its padding: its
own cache changes, which nobody reads, and the other rows are untouched (rows of a batch never
mix). So the tokens are those of the eager loop, up to the rounding of compiled arithmetic. The
cache's capacity is rounded up to a power of two, so that a few compiled layouts serve every
prompt length.

Legend: B sequences, T prompt length, V vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engram.model import EngramLM

if TYPE_CHECKING:  # compiling is optional: plain generation does not import it
    from engram.inference.captured import CapturedDecoder


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    seed: int = 0
    stop_at_eos: bool = True
    prefill_chunk: int = 0  # 0: the whole prompt in one forward

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.prefill_chunk < 0:
            raise ValueError(f"prefill_chunk={self.prefill_chunk} must be >= 0")


@dataclass
class Generation:
    tokens: list[list[int]]  # the new tokens of each prompt (EOS included when produced)
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    steps: int = 0
    finished: list[bool] = field(default_factory=list)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0


def sample_next(
    logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The next token of each row from logits [B, V]: [B] int64."""
    if cfg.temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the
        # most likely token always stays.
        drop = probs.cumsum(dim=-1) - probs >= cfg.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] and attention mask [B, T] (True = real) with every prompt right-aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.int64)
    mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(p, dtype=torch.int64)
        mask[i, T - len(p) :] = True
    return ids, mask


@torch.inference_mode()  # no autograd bookkeeping: each of decoding's small ops costs less
def generate(
    model: EngramLM,
    prompts: list[list[int]],
    cfg: SamplingConfig = SamplingConfig(),
    eos_id: int | None = None,
    pad_id: int = 0,
    on_token: Callable[[int, int], None] | None = None,
    decoder: CapturedDecoder | None = None,
) -> Generation:
    """Continue every prompt (lists of token ids); `on_token(row, id)` streams each new token.
    `decoder`, a CapturedDecoder of `model`, runs the one-token steps (see the module doc)."""
    cfg.validate()
    if decoder is not None and decoder.model is not model:
        raise ValueError("the decoder was captured from another model")
    model.eval()
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    B, T = ids.shape
    cache = model.new_cache(B, _capacity(T + cfg.max_new_tokens, model, decoder))
    generator = torch.Generator(device=device).manual_seed(cfg.seed)

    start = time.perf_counter()
    chunk = cfg.prefill_chunk or T
    for a in range(0, T, chunk):
        logits = model(ids[:, a : a + chunk], cache=cache, attention_mask=mask[:, a : a + chunk])
    last = logits[:, -1]  # left padding: the last column is every prompt's last real token
    prefill_s = time.perf_counter() - start
    if decoder is not None:  # bound to the prefilled cache off the clock: compiling takes a while
        decoder.prepare(cache)

    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    start, steps = time.perf_counter(), 0
    for steps in range(1, cfg.max_new_tokens + 1):  # steps: tokens sampled so far
        token = sample_next(last, cfg, generator)  # [B]
        for row in (~done).nonzero().flatten().tolist():
            out[row].append(int(token[row]))
            if on_token is not None:
                on_token(row, int(token[row]))
        if cfg.stop_at_eos and eos_id is not None:
            done |= token == eos_id
        if bool(done.all()) or steps == cfg.max_new_tokens:
            break  # no forward for a token nobody will read
        token = torch.where(done, pad_id, token)
        if decoder is not None:
            last = decoder(token[:, None], cache)[:, -1]
            continue
        # Until a row finishes there is no padding: the plain step, without the mask's work.
        step_mask = ~done[:, None] if bool(done.any()) else None
        last = model(token[:, None], cache=cache, attention_mask=step_mask)[:, -1]
    decode_s = time.perf_counter() - start
    if decoder is not None:  # the cache dies with this call: the decoder must not keep it
        decoder.release()
    return Generation(
        out, int(mask.sum()), prefill_s, decode_s, steps, [bool(d) for d in done.tolist()]
    )


def _capacity(needed: int, model: EngramLM, decoder: CapturedDecoder | None) -> int:
    """The cache's capacity: what the tokens need, or for a captured decoder (compiled per
    capacity) the next power of two. A finished row's positions go on counting under a
    captured decoder, so its tokens must all fit below max_seq_len."""
    if decoder is None:
        return needed
    top = model.config.max_seq_len
    if needed > top:
        raise ValueError(
            f"the longest prompt plus max_new_tokens is {needed} tokens, over the model's "
            f"max_seq_len={top}: a captured decoder needs them all to fit"
        )
    return min(top, 1 << (needed - 1).bit_length())


__all__ = ["Generation", "SamplingConfig", "generate", "left_pad", "sample_next"]
