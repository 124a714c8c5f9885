"""`EngramForCausalLM`: the transformers wrapper computes what `EngramLM` computes.

Logits of the wrapper, and of a model saved (sharded) and loaded again, are bit-identical to
`EngramLM`'s: the same module runs on the same weights. Cached against uncached decoding is
compared at 1e-5 absolute on fp32 logits, for the reason given in tests/test_decoding.py (float
summation order over a cache); generated tokens must be identical.
"""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import replace

import pytest
import torch

pytest.importorskip("transformers")

from test_decoding import _ids, _model
from transformers import AutoModelForCausalLM, DynamicCache

from engram.hf.causal_lm import (
    EngramCache,
    EngramForCausalLM,
    EngramHFConfig,
    pack_vocab_map,
    unpack_vocab_map,
)
from engram.inference import SamplingConfig, generate, left_pad
from engram.tokenizer import train_bpe

ATOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    text = "\n".join(f"def f{i}(x):\n    return x + {i}  # note {i % 7}" for i in range(300))
    return train_bpe([text], vocab_size=300)


@pytest.fixture(scope="module")
def wrapped(tok):
    """{M: (EngramLM, EngramForCausalLM)} for M = 1 and M = 4 branches."""
    out = {}
    for branches in (1, 4):
        model = _model(tok, branches)
        out[branches] = model, EngramForCausalLM.from_engram(model, tok).eval()
    return out


def _prompts(tok) -> list[list[int]]:
    return [_ids(tok, 1, 6, seed=3)[0].tolist(), _ids(tok, 1, 11, seed=4)[0].tolist()]


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def _diff(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a - b).abs()
    return f"max {d.max().item():.2e}, mean {d.mean().item():.2e}"


@pytest.mark.parametrize("branches", [1, 4])
@torch.no_grad()
def test_logits_and_loss_equal_engramlm(wrapped, tok, branches):
    model, hf = wrapped[branches]
    ids = _ids(tok, 2, 17, eos_at=5)
    out = hf(ids, labels=ids)
    assert torch.equal(out.logits, model(ids)) and out.cache is None
    # HF shifts labels inside the loss: position t predicts label t+1.
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    _, loss = model(ids, targets=targets)
    assert torch.allclose(out.loss, loss)
    assert torch.equal(hf(ids, return_dict=False)[0], out.logits)
    assert hf.to_engram() is model


@torch.no_grad()
def test_sharded_round_trip_is_exact(wrapped, tok, tmp_path):
    model, hf = wrapped[4]
    hf.save_pretrained(tmp_path, max_shard_size="200KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (tmp_path / "model.safetensors.index.json").is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "engram" and config["hash_spec"] == model.spec.to_dict()
    for loader in (EngramForCausalLM, AutoModelForCausalLM):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, EngramForCausalLM)
        ids = _ids(tok, 2, 19, eos_at=7, seed=5)
        assert torch.equal(loaded(ids).logits, model(ids))
        rows, again = model.hasher(ids), loaded.model.hasher(ids)
        assert all(torch.equal(rows[layer], again[layer]) for layer in rows)
        # Non-persistent buffers (rotary tables, row offsets) are re-derived, not loaded.
        for (name, a), (_, b) in zip(hf.named_buffers(), loaded.named_buffers(), strict=True):
            assert torch.equal(a, b), name


@torch.no_grad()
def test_tied_embeddings_round_trip(tok, tmp_path):
    model = _model(tok, 1)
    tied = type(model)(model.config.with_(tie_embeddings=True), model.spec, model.hasher).eval()
    EngramForCausalLM.from_engram(tied, tok).save_pretrained(tmp_path)
    loaded = EngramForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.model.head.weight is loaded.model.embed.weight
    ids = _ids(tok, 1, 9)
    assert torch.equal(loaded(ids).logits, tied(ids))


@pytest.mark.parametrize("branches", [1, 4])
@torch.no_grad()
def test_greedy_generate_cached_equals_uncached_and_engram(wrapped, tok, branches):
    model, hf = wrapped[branches]
    prompts = _prompts(tok)
    ids, mask = left_pad(prompts, tok.pad_id)  # prompts of 6 and 11 tokens, left-padded
    new = {}
    for use_cache in (True, False):
        out = hf.generate(
            ids, attention_mask=mask.long(), max_new_tokens=8, do_sample=False, use_cache=use_cache
        )
        new[use_cache] = [_until_eos(row, tok.eos_id) for row in out[:, ids.shape[1] :].tolist()]
    ours = generate(model, prompts, SamplingConfig(max_new_tokens=8), tok.eos_id, tok.pad_id)
    assert new[True] == new[False] == ours.tokens


@torch.no_grad()
def test_beam_search_and_sampling_cached_equal_uncached(wrapped, tok):
    _, hf = wrapped[4]
    ids, mask = left_pad(_prompts(tok), tok.pad_id)
    beams, samples = {}, {}
    for use_cache in (True, False):
        # Beam search reorders the cache every step: K/V, N-gram history and conv windows.
        beams[use_cache] = hf.generate(
            ids, attention_mask=mask, max_new_tokens=6, num_beams=3, use_cache=use_cache
        )
        torch.manual_seed(0)
        samples[use_cache] = hf.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=True,
            top_k=20,
            use_cache=use_cache,
        )
    assert torch.equal(beams[True], beams[False])
    assert torch.equal(samples[True], samples[False])
    # A returned cache continues: 3 tokens, then 3 more, are the 6 tokens of one call.
    first = hf.generate(ids, attention_mask=mask, max_new_tokens=3, return_dict_in_generate=True)
    assert isinstance(first.cache, EngramCache)
    assert first.cache.get_seq_length() == ids.shape[1] + 2  # the last token is not fed yet
    grown = torch.cat([mask, torch.ones(2, 3, dtype=torch.bool)], dim=1)
    more = hf.generate(first.sequences, attention_mask=grown, max_new_tokens=3, cache=first.cache)
    assert torch.equal(more, hf.generate(ids, attention_mask=mask, max_new_tokens=6))


@torch.no_grad()
def test_cache_grows_and_takes_either_mask(wrapped, tok):
    """Chunks through `forward` with an empty EngramCache: it reallocates as tokens arrive, and
    the mask may cover the new tokens only or everything seen so far (as `generate` passes)."""
    model, hf = wrapped[4]
    a, b = _ids(tok, 1, 13, seed=1)[0].tolist(), _ids(tok, 1, 8, eos_at=3, seed=2)[0].tolist()
    ids, mask = left_pad([a, b], tok.pad_id)
    cache, logits = EngramCache(), []
    for start, end in ((0, 4), (4, 5), (5, 11), (11, 12), (12, 13)):
        full_mask = start % 2 == 0
        m = mask[:, :end] if full_mask else mask[:, start:end]
        out = hf(ids[:, start:end], attention_mask=m.long(), cache=cache)
        assert out.cache is cache
        logits.append(out.logits)
    logits = torch.cat(logits, dim=1)
    assert cache.decode.capacity == 16 and cache.get_seq_length() == 13  # 4 -> 8 -> 16
    ref_a, ref_b = model(torch.tensor([a])), model(torch.tensor([b]))
    assert (logits[0] - ref_a[0]).abs().max() < ATOL, _diff(logits[0], ref_a[0])
    assert (logits[1, 5:] - ref_b[0]).abs().max() < ATOL, _diff(logits[1, 5:], ref_b[0])
    with pytest.raises(ValueError, match="attention_mask has 3 columns"):
        hf(ids[:, :1], attention_mask=mask[:, :3], cache=cache)


@torch.no_grad()
def test_model_without_engram(tok, tmp_path):
    """The dense baseline (no Engram memory) travels and decodes the same way."""
    model = _model(tok, 1)
    plain = type(model)(model.config.with_(engram=None)).eval()
    hf = EngramForCausalLM.from_engram(plain, tok)
    assert hf.config.hash_spec is None and hf.config.vocab_map is None
    hf.save_pretrained(tmp_path)
    loaded = EngramForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = left_pad(_prompts(tok), tok.pad_id)
    assert torch.equal(loaded(ids).logits, plain(ids))
    cached, uncached = (
        loaded.generate(ids, attention_mask=mask, max_new_tokens=5, use_cache=use_cache)
        for use_cache in (True, False)
    )
    assert torch.equal(cached, uncached)


def test_unsupported_caches_and_inputs_are_refused(wrapped, tok):
    _, hf = wrapped[1]
    ids = _ids(tok, 1, 4)
    with pytest.raises(ValueError, match="EngramCache"):
        hf.generate(ids, max_new_tokens=2, cache=DynamicCache(config=hf.config))
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        hf.generate(ids, max_new_tokens=2, cache_implementation="static")
    with pytest.raises(ValueError, match="inputs_embeds"):
        hf(ids, inputs_embeds=torch.zeros(1, 4, 32))
    with pytest.raises(NotImplementedError, match="cropped"):
        EngramCache().crop(1)


def test_spec_and_tokenizer_mismatch_fail_at_load(wrapped, tok, tmp_path):
    model, hf = wrapped[1]
    hf.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    good = json.loads(path.read_text())
    lookup = unpack_vocab_map(good["vocab_map"])
    lookup[[3, 4]] = lookup[[4, 3]]  # another tokenizer's (or compression's) map
    path.write_text(json.dumps({**good, "vocab_map": pack_vocab_map(lookup)}))
    with pytest.raises(ValueError, match="vocab map is not the one the spec was built with"):
        EngramForCausalLM.from_pretrained(tmp_path)
    path.write_text(json.dumps({**good, "tokenizer_fingerprint": "0" * 64}))
    with pytest.raises(ValueError, match="tokenizer_fingerprint 000000000000 is not"):
        EngramForCausalLM.from_pretrained(tmp_path)
    config = {**good, "model_config": {**good["model_config"], "n_layers": 2}}
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not fit this EngramForCausalLM"):
        EngramForCausalLM.from_pretrained(tmp_path)  # block 2's weights are left over
    other = train_bpe(["a completely different corpus " * 50], vocab_size=300)
    with pytest.raises(ValueError, match="resolved for tokenizer"):
        EngramForCausalLM.from_engram(model, other)
    with pytest.raises(ValueError, match="does not match the config"):
        EngramForCausalLM(EngramHFConfig.from_engram(model, tok), lm=_model(tok, 4))


def test_vocab_map_packing():
    identity = torch.arange(129280).numpy()
    packed = pack_vocab_map(identity)
    assert len(packed["data"]) < 1000  # runs of +1 compress to almost nothing
    assert (unpack_vocab_map(packed) == identity).all()
    with pytest.raises(ValueError, match="corrupt"):
        unpack_vocab_map({**packed, "data": "not base64 zlib"})
    with pytest.raises(ValueError, match="header says"):
        unpack_vocab_map({**packed, "size": 7})


@pytest.mark.parametrize("placement", ["device", "disk"])
def test_from_run(tmp_path, monkeypatch, placement):
    """A run's tables, wherever it placed them, come back as weights that save and load."""
    from engram.config import TrainConfig
    from engram.inference.load import load_trained
    from engram.tables.plan import TablePlan
    from engram.train import train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        body = "\n".join(f"def g{i}_{j}(x):\n    return x * {j} + {i}" for j in range(30))
        (corpus / f"{i:02d}.txt").write_text(body)
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    config = TrainConfig(tokenizer="bpe:300", data=str(corpus), seq_len=16, batch_size=2)
    config = replace(config, tables=TablePlan(placement=placement, cache_rows=0))
    train(replace(config, steps=1, eval_tokens=32, out_dir=str(run), progress=False))
    hf = EngramForCausalLM.from_run(run).eval()
    model = load_trained(run, device="cpu").model
    ids = torch.randint(3, model.config.vocab_size, (1, 10))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, model(ids))
    hf.save_pretrained(tmp_path / "hf")  # the table is a weight again: it is saved
    with torch.no_grad():
        assert torch.equal(
            EngramForCausalLM.from_pretrained(tmp_path / "hf")(ids).logits, model(ids)
        )


def test_import_without_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "engram.hf.causal_lm")
    with pytest.raises(ImportError, match=r"pip install 'engram-lm\[hf\]'"):
        importlib.import_module("engram.hf.causal_lm")
