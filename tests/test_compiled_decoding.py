"""The AOT-compiled decode steps (`engram.inference.compiled`) against the eager ones.

Hashing is integer arithmetic: its rows and history must be equal bit for bit. The Engram step
fuses its float arithmetic, so logits may differ by rounding; ATOL is test_decoding's bar
(observed ~3e-7). Each compile takes seconds, so the packages are shared by the whole module.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engram.hashing import NgramHasher
from engram.inference import SamplingConfig, generate
from engram.inference.compiled import compile_decoding, uncompile_decoding
from engram.model import EngramLM, ModelConfig, model_preset
from engram.module import Engram
from engram.spec import resolve
from engram.vocab import compress

ATOL = 1e-5
B = 2


@pytest.fixture(scope="module")
def tok(small_tok):
    return small_tok


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    return tmp_path_factory.mktemp("aot")


def _model(tok, branches: int = 2) -> EngramLM:
    """The tiny preset with Engram at two blocks: one config, tables of different rows."""
    base = model_preset("tiny")
    two = replace(base.engram, spec=replace(base.engram.spec, layer_ids=(0, 2)))
    config: ModelConfig = base.with_(vocab_size=tok.vocab_size, hc_branches=branches, engram=two)
    vocab = compress(tok)
    spec = resolve(config.engram.spec, tokenizer=tok, vocab=vocab)
    torch.manual_seed(0)
    model = EngramLM(config, spec, NgramHasher(spec, vocab))
    with torch.no_grad():  # a trained conv and table are not zero or tiny
        for e in model.engram_layers:
            e.conv.conv.weight.normal_(std=0.5)
            e.table.weight.normal_(std=0.5)
    return model.eval()


def _engrams(model: EngramLM) -> list[Engram]:
    return [m for m in model.modules() if isinstance(m, Engram)]


def _decode(model: EngramLM, ids: torch.Tensor) -> tuple[torch.Tensor, object]:
    """Prefill ids[:, :4], then decode the rest a token at a time: logits [B, T-4, V]."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    model(ids[:, :4], cache=cache)
    steps = [model(ids[:, t : t + 1], cache=cache) for t in range(4, ids.shape[1])]
    return torch.cat(steps, dim=1), cache


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@torch.inference_mode()
def test_compiled_steps_match_eager(tok, packages, device):
    eager = _model(tok).to(device)
    compiled = compile_decoding(_model(tok).to(device), directory=packages)
    ids = torch.randint(3, tok.vocab_size, (B, 24), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    ids[0, 9] = ids[1, 15] = tok.eos_id  # documents end mid-stream: history and conv reset
    want, want_cache = _decode(eager, ids)
    got, got_cache = _decode(compiled, ids)
    assert (got - want).abs().max() < ATOL
    assert torch.equal(got_cache.hash_state.history, want_cache.hash_state.history)
    for layer, window in want_cache.conv.items():
        assert (got_cache.conv[layer] - window).abs().max() < ATOL
    assert all(e.fast_step._functions[True].compiles == 1 for e in _engrams(compiled))
    assert compiled.hasher.fast_hash_one.function.compiles == 1

    # The same rows bit for bit, straight from the hasher, on fresh histories.
    hasher = compiled.hasher
    constants = hasher._constants(ids.device)
    history = torch.randint(0, hasher.spec.compressed_vocab_size, (B, hasher.spec.max_order - 1))
    for t in range(ids.shape[1]):
        args = (ids[:, t : t + 1], history, *constants)
        rows, next_history = hasher.fast_hash_one(*args)
        want_rows, want_history = hasher.hash_one(*args)
        assert torch.equal(rows, want_rows) and torch.equal(next_history, want_history)
        history = want_history


@torch.inference_mode()
def test_packages_load_from_disk_and_follow_the_weights(tok, packages):
    """A second model loads the first one's packages; weights changed or a table swapped after
    compiling are what the compiled step reads."""
    compile_decoding(_model(tok), batch_size=B, directory=packages)  # built or loaded here
    eager, compiled = _model(tok), compile_decoding(_model(tok), directory=packages)
    ids = torch.randint(3, tok.vocab_size, (B, 8), generator=torch.Generator().manual_seed(2))
    for model in (eager, compiled):
        for e in _engrams(model):
            e.value_proj.weight.mul_(-2.0)
            e.use_table(e.table.weight.flip(0).contiguous())
    got, _ = _decode(compiled, ids)
    want, _ = _decode(eager, ids)
    assert (got - want).abs().max() < ATOL
    assert all(e.fast_step._functions[True].compiles == 0 for e in _engrams(compiled))
    assert compiled.hasher.fast_hash_one.function.compiles == 0
    # One hash, one step per layer (their tables differ in rows); nothing left partial.
    assert len(list(packages.glob("*.pt2"))) == 3
    assert not [p for p in packages.iterdir() if p.is_dir()]


@torch.inference_mode()
def test_each_layer_reads_its_own_table_to_the_last_row(tok, packages):
    """Layers of one config share code but not table sizes: each reads the last row of every
    head of its own table (a package compiled for a smaller table would refuse the index)."""
    model = compile_decoding(_model(tok), directory=packages)
    M, d = model.config.hc_branches, model.config.d_model
    for e in sorted(_engrams(model), key=lambda e: e.table.weight.shape[0]):
        last = torch.tensor(e.spec.layer_primes(e.layer_id)) - 1  # [H]
        rows = last.expand(B, 1, -1).contiguous()
        h = torch.randn(B, 1, M, d, generator=torch.Generator().manual_seed(e.layer_id))
        windows = [torch.zeros(B, e.conv.receptive, M, d) for _ in range(2)]
        starts = torch.zeros(B, 1, dtype=torch.bool)
        got = e.fast_step(h, rows, starts, windows[0])
        want = e._step(h, rows, starts, windows[1])
        assert (got - want).abs().max() < ATOL


def test_training_and_row_sources_stay_eager(tok, packages):
    """With grad enabled, or rows read through a row source, the eager step runs (compiled
    code has no backward, and a row source reads through Python)."""

    class Rows:  # a minimal RowSource over the module's own table
        def __init__(self, weight):
            self.store = weight

        def read(self, rows, offsets):
            return self.store[rows + offsets].flatten(start_dim=-2)

    model = compile_decoding(_model(tok), directory=packages / "fallback")
    ids = torch.randint(3, tok.vocab_size, (B, 6), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache(B, 6)
    model(ids[:, :5], cache=cache).sum()
    logits = model(ids[:, 5:], cache=cache)
    assert logits.requires_grad
    for e in _engrams(model):
        e.use_row_source(Rows(e.table.weight.detach().clone()))
    with torch.inference_mode():
        _decode(model, ids)
    assert not any(f.compiles for e in _engrams(model) for f in e.fast_step._functions.values())
    assert not list((packages / "fallback").glob("engram-step-*"))
    uncompile_decoding(model)
    assert all(e.fast_step is None for e in _engrams(model)) and model.hasher.fast_hash_one is None


@torch.inference_mode()
def test_generate_with_compiled_decoding(tok, packages):
    """`generate` gives the same greedy tokens compiled as eager, EOS and padding included."""
    prompts = [tok.encode("def f1(x):"), tok.encode("return x + 3")]
    cfg = SamplingConfig(max_new_tokens=12, stop_at_eos=True)
    want = generate(_model(tok), prompts, cfg, eos_id=tok.eos_id, pad_id=0)
    model = compile_decoding(_model(tok), batch_size=len(prompts), directory=packages)
    got = generate(model, prompts, cfg, eos_id=tok.eos_id, pad_id=0)
    assert got.tokens == want.tokens
