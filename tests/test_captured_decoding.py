"""Whole decode steps captured ahead of time (`engram.inference.captured`) against the model's
own cached decoding: the same logits within rounding, the same cache afterwards.

The tiny preset covers every piece a step has: a dense first block, MoE blocks (their experts
read by index from stacked weights), mHC with M = 2, Engram with its gate and conv, and an EOS
inside the decoded tokens. A compile takes seconds, so the packages are shared by the module.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

from engram.hashing import NgramHasher
from engram.inference import SamplingConfig, generate
from engram.inference.captured import CapturedDecoder
from engram.inference.generate import _capacity
from engram.model import EngramLM, model_preset
from engram.spec import resolve
from engram.vocab import compress

ATOL = 1e-5  # test_compiled_decoding's bar: fused float arithmetic, not other sums
B = 2
SLOTS = 32  # every test's cache: one compiled layout, what generate() rounds 17-32 tokens to


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    return tmp_path_factory.mktemp("aot")


@pytest.fixture(scope="module")
def model(small_tok) -> EngramLM:
    config = model_preset("tiny").with_(vocab_size=small_tok.vocab_size)
    vocab = compress(small_tok)
    spec = resolve(config.engram.spec, tokenizer=small_tok, vocab=vocab)
    torch.manual_seed(0)
    model = EngramLM(config, spec, NgramHasher(spec, vocab))
    with torch.no_grad():  # a trained conv is not zero
        for e in model.engram_layers:
            e.conv.conv.weight.normal_(std=0.5)
    return model.eval()


def _ids(model: EngramLM) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (B, 14), generator=gen)
    ids[0, 7] = model.spec.eos_id  # a document ends mid-decode in one row
    return ids


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize(
    "device, graph",
    [
        ("cpu", False),
        pytest.param("cuda", False, marks=CUDA),
        pytest.param("cuda", True, marks=CUDA, id="cuda-graph"),
    ],
)
@torch.inference_mode()
def test_captured_steps_match_the_models_decoding(model, packages, device, graph):
    if device != "cpu":
        model = copy.deepcopy(model).to(device)
    decoder = CapturedDecoder(model, packages, cuda_graph=graph)
    ids = _ids(model).to(device)
    eager, captured = model.new_cache(B, SLOTS), model.new_cache(B, SLOTS)
    model(ids[:, :4], cache=eager)
    model(ids[:, :4], cache=captured)
    for t in range(4, ids.shape[1]):
        want = model(ids[:, t : t + 1], cache=eager)
        got = decoder(ids[:, t : t + 1], captured)
        assert torch.allclose(got, want, atol=ATOL), (t, (got - want).abs().max())
    assert captured.length == eager.length
    for name in ("valid", "positions", "last_eos"):
        assert torch.equal(getattr(captured, name), getattr(eager, name)), name
    assert torch.equal(captured.hash_state.history, eager.hash_state.history)
    for layer, window in eager.conv.items():
        assert torch.allclose(captured.conv[layer], window, atol=ATOL)
    used = eager.length
    for k_eager, k_captured in zip(eager.keys, captured.keys, strict=True):
        assert torch.allclose(k_captured[:, :, :used], k_eager[:, :, :used], atol=ATOL)
    # The model's state is untouched by tracing: it still decodes as before.
    last = ids[:, -1:]
    assert torch.allclose(model(last, cache=eager), model(last, cache=captured), atol=ATOL)


@torch.inference_mode()
def test_steps_of_the_model_and_the_decoder_mix(model, packages):
    """A step of the model between captured ones replaces cache tensors (the N-gram history):
    the decoder binds to the new ones, and the steps are those of the model alone."""
    decoder = CapturedDecoder(model, packages)
    ids = _ids(model)
    eager, mixed = model.new_cache(B, SLOTS), model.new_cache(B, SLOTS)
    model(ids[:, :4], cache=eager)
    model(ids[:, :4], cache=mixed)
    for t in range(4, ids.shape[1]):
        want = model(ids[:, t : t + 1], cache=eager)
        step = decoder if t % 3 else lambda x, cache: model(x, cache=cache)
        got = step(ids[:, t : t + 1], mixed)
        assert torch.allclose(got, want, atol=ATOL), (t, (got - want).abs().max())
    assert torch.equal(mixed.hash_state.history, eager.hash_state.history)


@pytest.mark.parametrize("stacked", ["experts", "engram projections"])
@torch.inference_mode()
def test_the_weights_are_a_snapshot_until_refresh(model, packages, stacked):
    """Weights the step reads through stacked copies (not as inputs) are seen after refresh()."""
    decoder = CapturedDecoder(model, packages)
    ids = _ids(model)
    caches = [model.new_cache(B, SLOTS) for _ in range(3)]
    for cache in caches:  # prefilled alike, before any change
        model(ids[:, :4], cache=cache)
    before = decoder(ids[:, 4:5], caches[0])
    if stacked == "experts":
        weights = [e.gate_up.weight for e in model.moe_layers[0].experts]
    else:
        weights = [p.weight for e in model.engram_layers for p in e.projections]
    saved = [w.clone() for w in weights]
    try:
        for w in weights:  # stacked into a copy: unseen until refresh()
            w.mul_(3.0)
        assert torch.equal(decoder(ids[:, 4:5], caches[1]), before)
        decoder.refresh()
        assert not torch.allclose(decoder(ids[:, 4:5], caches[2]), before, atol=ATOL)
    finally:
        for w, original in zip(weights, saved, strict=True):
            w.copy_(original)


@torch.inference_mode()
def test_bad_calls_are_refused(model, packages):
    decoder = CapturedDecoder(model, packages)
    cache = model.new_cache(B, 5)
    with pytest.raises(ValueError, match="ids \\[B, 1\\]"):
        decoder(torch.zeros(B, 2, dtype=torch.int64), cache)
    with pytest.raises(ValueError, match="holds 2 sequences"):
        decoder(torch.zeros(3, 1, dtype=torch.int64), cache)
    with pytest.raises(ValueError, match="outside the tokenizer"):
        decoder(torch.full((B, 1), model.config.vocab_size), cache)
    cache.length = 5
    with pytest.raises(ValueError, match="room for 5 tokens"):
        decoder(torch.zeros(B, 1, dtype=torch.int64), cache)


@torch.inference_mode()
def test_generate_with_the_decoder_gives_the_eager_tokens(model, packages, monkeypatch):
    """Prompts of two lengths (left padding) and a row that ends at an EOS mid-way while the
    other goes on: the finished row decodes padding unseen and the other's tokens do not move.
    The decoder lets go of generate's cache when generate returns: its tensors are freed."""
    decoder = CapturedDecoder(model, packages)
    caches = []

    def new_cache(*args, **kwargs):
        cache = type(model).new_cache(model, *args, **kwargs)
        caches.append(weakref.ref(cache.keys[0]))
        return cache

    monkeypatch.setattr(model, "new_cache", new_cache)
    prompts = _ids(model)[:, :9].tolist()
    prompts[1] = prompts[1][:5]
    cfg = SamplingConfig(max_new_tokens=12)  # 9 + 12 tokens: 32 slots
    free = generate(model, prompts, cfg, eos_id=None)
    eos = free.tokens[0][3]  # row 0 ends at its 4th token (not seen before it), row 1 goes on
    want = generate(model, prompts, cfg, eos_id=eos)
    got = generate(model, prompts, cfg, eos_id=eos, decoder=decoder)
    gc.collect()
    assert len(caches) == 3 and caches[-1]() is None  # not held by the decoder's binding
    assert want.tokens[0] == free.tokens[0][:4] and len(want.tokens[1]) > 4
    assert got.tokens == want.tokens and got.finished == want.finished
    sampled = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    assert (
        generate(model, prompts, sampled, decoder=decoder).tokens
        == generate(model, prompts, sampled).tokens
    )


def test_generate_refuses_a_decoder_it_cannot_use(model, packages):
    decoder = CapturedDecoder(model, packages)
    # Capacities a captured cache gets: powers of two, at most max_seq_len (256 here).
    got = [_capacity(n, model, decoder) for n in (1, 17, 32, 33, 200, 256)]
    assert got == [1, 32, 32, 64, 256, 256]
    assert _capacity(21, model, None) == 21  # the eager loop: what the tokens need
    with pytest.raises(ValueError, match="max_seq_len=256"):
        generate(model, [[1] * 250], SamplingConfig(max_new_tokens=10), decoder=decoder)
    other = EngramLM(model.config.with_(engram=None)).eval()
    with pytest.raises(ValueError, match="another model"):
        generate(other, [[1, 2]], SamplingConfig(max_new_tokens=2), decoder=decoder)
