"""Exact cached decoding: full forward == chunked prefill == token-by-token decode.

Tolerance: 1e-5 absolute on fp32 logits. The three paths compute the same sums, but attention
over a cache reduces over a different number of (masked) keys and matmuls are blocked
differently for one token than for a whole sequence, so the float summation order differs;
observed differences are ~1e-6. Anything structural (a wrong N-gram, a conv window crossing a
pad or an EOS, a shifted rotary position) moves logits by 1e-2 or more.
"""

from __future__ import annotations

import json

import pytest
import torch

from engram.hashing import NgramHasher
from engram.inference import SamplingConfig, generate, left_pad, sample_next
from engram.model import EngramLM, ModelConfig, model_preset
from engram.model.decode_cache import document_starts
from engram.spec import resolve
from engram.tokenizer import train_bpe
from engram.vocab import compress

ATOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    text = "\n".join(f"def f{i}(x):\n    return x + {i}  # note {i % 7}" for i in range(300))
    return train_bpe([text], vocab_size=300)


def _model(tok, branches: int, conv: bool = True, seed: int = 0) -> EngramLM:
    base = model_preset("tiny")
    engram = base.engram
    config: ModelConfig = base.with_(
        vocab_size=tok.vocab_size,
        hc_branches=branches,
        engram=type(engram)(spec=engram.spec, conv=conv),
    )
    vocab = compress(tok)
    spec = resolve(config.engram.spec, tokenizer=tok, vocab=vocab)
    torch.manual_seed(seed)
    model = EngramLM(config, spec, NgramHasher(spec, vocab))
    # A trained conv is not zero: give it weights so that the conv path is really tested. And
    # a trained attention is not uniform: at init (std 0.02) losing the keys or shifting every
    # position moves the logits by 1e-4 only; sharper attention makes such a loss show.
    with torch.no_grad():
        for e in model.engram_layers:
            if e.conv is not None:
                e.conv.conv.weight.normal_(std=0.5)
            e.table.weight.normal_(std=0.5)
        for block in model.blocks:
            block.attn.q_proj.weight.normal_(std=0.3)
            block.attn.kv_proj.weight.normal_(std=0.3)
    return model.eval()


def _ids(tok, B: int, T: int, eos_at: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, tok.vocab_size, (B, T), generator=g)
    if eos_at is not None:
        ids[:, eos_at] = tok.eos_id
    return ids


def _decode(model, ids, chunk: int, mask=None) -> torch.Tensor:
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    out = []
    for a in range(0, ids.shape[1], chunk):
        m = None if mask is None else mask[:, a : a + chunk]
        out.append(model(ids[:, a : a + chunk], cache=cache, attention_mask=m))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("branches", [1, 4])
@pytest.mark.parametrize("eos_at", [None, 9])
@torch.no_grad()
def test_full_equals_chunked_equals_stepwise(tok, branches, eos_at):
    model = _model(tok, branches)
    ids = _ids(tok, 2, 23, eos_at)
    full = model(ids)
    for chunk in (23, 5, 1):
        got = _decode(model, ids, chunk)
        assert (got - full).abs().max() < ATOL, (chunk, (got - full).abs().max())


def _sabotage(cache, part: str, fresh) -> None:
    """Lose one piece of the state decoding carries from chunk to chunk."""
    if part == "ngram history":
        cache.hash_state = fresh.hash_state
    elif part == "conv windows":
        for window in cache.conv.values():
            window.zero_()
    elif part == "rotary positions":
        cache.positions += 1
    else:  # "attention keys"
        for keys in cache.keys:
            keys.zero_()


@pytest.mark.parametrize(
    "part", ["ngram history", "conv windows", "rotary positions", "attention keys"]
)
@torch.no_grad()
def test_losing_any_piece_of_state_is_caught(tok, part):
    """The negative control of the equality above: decoding that loses one piece of its state
    after the first chunk moves later logits far beyond ATOL (so the tests can fail)."""
    model = _model(tok, 4)
    ids = _ids(tok, 2, 23)
    full = model(ids)
    cache = model.new_cache(2, 23)
    first = model(ids[:, :8], cache=cache)
    _sabotage(cache, part, model.new_cache(2, 23))
    rest = model(ids[:, 8:], cache=cache)
    assert (first - full[:, :8]).abs().max() < ATOL
    assert (rest - full[:, 8:]).abs().max() > 1e-2, part


@torch.no_grad()
def test_conv_and_ngrams_do_not_cross_an_eos(tok):
    """After an EOS the model sees a new document: the same as starting fresh."""
    model = _model(tok, 1)
    ids = _ids(tok, 1, 20, eos_at=7)
    # Attention still reaches across the EOS (packed training does), so compare Engram outputs.
    rows = model.hash(ids)
    h = torch.randn(1, 20, 32)
    both = model.engram_layers[0](h, rows[1], starts=document_starts(ids, model.spec.eos_id))
    alone = model.engram_layers[0](h[:, 8:], model.hash(ids[:, 8:])[1])
    assert (both[:, 8:] - alone).abs().max() < ATOL


@pytest.mark.parametrize("branches", [1, 4])
@torch.no_grad()
def test_padding_left_and_right_is_invisible(tok, branches):
    model = _model(tok, branches)
    a, b = _ids(tok, 1, 15, seed=1)[0].tolist(), _ids(tok, 1, 9, eos_at=4, seed=2)[0].tolist()
    ref_a, ref_b = model(torch.tensor([a])), model(torch.tensor([b]))
    ids, mask = left_pad([a, b], pad_id=tok.eos_id)  # a pad that equals EOS must not count
    for chunk in (15, 4, 1):
        got = _decode(model, ids, chunk, mask)
        assert (got[0] - ref_a[0]).abs().max() < ATOL
        assert (got[1, 6:] - ref_b[0]).abs().max() < ATOL
    # Right padding, then decoding continues each sequence where its real tokens end.
    right = torch.full((2, 15), tok.eos_id)
    right[0], right[1, :9] = torch.tensor(a), torch.tensor(b)
    rmask = torch.zeros(2, 15, dtype=torch.bool)
    rmask[0], rmask[1, :9] = True, True
    for chunk in (15, 4, 1):  # pads after real tokens in a chunk, then real tokens again
        cache = model.new_cache(2, 16)
        got = torch.cat(
            [
                model(right[:, i : i + chunk], cache=cache, attention_mask=rmask[:, i : i + chunk])
                for i in range(0, 15, chunk)
            ],
            dim=1,
        )
        assert (got[1, :9] - ref_b[0]).abs().max() < ATOL
        step = model(torch.tensor([[5], [6]]), cache=cache)
        assert (step[0] - model(torch.tensor([[*a, 5]]))[0, -1:]).abs().max() < ATOL
        assert (step[1] - model(torch.tensor([[*b, 6]]))[0, -1:]).abs().max() < ATOL


@torch.no_grad()
def test_reset_starts_a_sequence_afresh(tok):
    model = _model(tok, 1)
    ids = _ids(tok, 2, 12)
    cache = model.new_cache(2, 24)
    model(ids, cache=cache)
    cache.reset(torch.tensor([True, False]))
    got = model(ids, cache=cache)
    assert (got[0] - model(ids[:1])[0]).abs().max() < ATOL  # row 0 forgot its past
    assert (got[1] - model(torch.cat([ids[1:], ids[1:]], 1))[0, 12:]).abs().max() < ATOL


def test_cache_errors(tok):
    model = _model(tok, 1)
    cache = model.new_cache(2, 4)
    with pytest.raises(ValueError, match="room for 4"):
        model(_ids(tok, 2, 5), cache=cache)
    with pytest.raises(ValueError, match="holds 2 sequences"):
        model(_ids(tok, 3, 2), cache=cache)
    with pytest.raises(ValueError, match="attention_mask"):
        model(_ids(tok, 2, 2), cache=cache, attention_mask=torch.ones(2, 3, dtype=torch.bool))
    # Decoding past the rotary table: caught once per forward, whatever the chunk.
    limit = model.config.max_seq_len
    for before, chunk in ((limit, 1), (limit - 1, 2)):  # a decode step; a chunk across it
        cache = model.new_cache(1, limit + 2)
        model(_ids(tok, 1, before), cache=cache)  # positions below the limit: fine
        with pytest.raises(ValueError, match=f"position {limit} exceeds max_seq_len={limit}"):
            model(_ids(tok, 1, chunk), cache=cache)
    # Padding takes slots, not positions: a padded row may use more slots than the table.
    cache = model.new_cache(2, limit + 1)
    mask = torch.ones(2, limit + 1, dtype=torch.bool)
    mask[0, :2] = False  # row 0: two pads, so its last position is limit - 2
    with pytest.raises(ValueError, match=f"position {limit} exceeds"):
        model(_ids(tok, 2, limit + 1), cache=cache, attention_mask=mask)
    mask[1, :1] = False  # both rows padded: every position below the limit
    model(_ids(tok, 2, limit + 1), cache=model.new_cache(2, limit + 1), attention_mask=mask)


@torch.no_grad()
def test_generate_matches_uncached_greedy(tok):
    model = _model(tok, 4)
    prompts = [_ids(tok, 1, 6, seed=3)[0].tolist(), _ids(tok, 1, 11, seed=4)[0].tolist()]
    cfg = SamplingConfig(max_new_tokens=8, stop_at_eos=False, prefill_chunk=4)
    gen = generate(model, prompts, cfg, eos_id=tok.eos_id, pad_id=tok.eos_id)
    for prompt, new in zip(prompts, gen.tokens, strict=True):
        seq = list(prompt)
        for _ in range(8):  # the uncached reference: re-run the whole sequence every step
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert new == seq[len(prompt) :]
    assert gen.new_tokens == 16 and gen.decode_tokens_per_s > 0


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    top2 = sample_next(logits, SamplingConfig(temperature=1.0, top_k=2), g)
    assert set(top2.tolist()) == {2, 3}
    # p(3) = 0.64, p(2) = 0.24: top_p = 0.7 keeps tokens 3 and 2 only.
    nucleus = sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.7), g)
    assert set(nucleus.tolist()) == {2, 3}
    assert sample_next(logits[:1], SamplingConfig()).item() == 3
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0).validate()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run trained for 2 steps on stdlib files (what `engram generate` loads)."""
    from engram.cli import main
    from engram.data import stdlib_files

    root = tmp_path_factory.mktemp("gen")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, path in enumerate(stdlib_files(max_files=20)):
        (corpus / f"{i:03d}.txt").write_text(path.read_text(encoding="utf-8"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_CACHE_DIR", str(root / "cache"))
        argv = ["train", "preset=tiny", f"data={corpus}", "tokenizer=bpe:400", "steps=2"]
        argv += ["seq_len=32", "batch_size=2", "eval_tokens=64", f"out_dir={root / 'run'}"]
        argv += ["progress=false"]
        assert main(argv) == 0
    return root / "run"


def test_generate_cli(trained, tmp_path, capsys):
    from engram.cli import main

    assert (
        main(["generate", "--ckpt", str(trained), "--prompt", "def f(", "--max-new-tokens", "5"])
        == 0
    )
    out = capsys.readouterr()
    assert out.out.startswith("def f(") and "tokens/s" in out.err
    # --compile: Engram's decode steps AOT-compiled (engram.inference.compiled), same tokens.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_CACHE_DIR", str(tmp_path / "cache"))
        argv = ["generate", "--ckpt", str(trained), "--prompt", "def f(", "--max-new-tokens", "5"]
        assert main([*argv, "--compile"]) == 0
        assert capsys.readouterr().out == out.out
        # --capture: each whole decode step one compiled call (engram.inference.captured).
        assert main([*argv, "--capture"]) == 0
        assert capsys.readouterr().out == out.out
        with pytest.raises(SystemExit, match="2"):  # one or the other: argparse refuses
            main([*argv, "--capture", "--compile"])
    assert list((tmp_path / "cache" / "aot").glob("engram-step-*.pt2"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import os\n\nclass A:\n")
    argv = ["generate", "--ckpt", str(trained), "--prompts-file", str(prompts), "--top-k", "5"]
    assert main([*argv, "--temperature", "0.7", "--max-new-tokens", "4"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["prompt"] for x in lines] == ["import os", "class A:"]
    assert main(["generate", "--ckpt", str(trained), "--prompt", "x", "--top-p", "2"]) == 2
    assert main(["generate", "--ckpt", str(tmp_path), "--prompt", "x"]) == 2
    assert "Traceback" not in capsys.readouterr().err
