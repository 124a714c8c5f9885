"""Engram attached to Hugging Face decoders: exact cached generate, padding, training, save/load.

Models are tiny and randomly initialised from local configs (nothing is downloaded). The Engram
tables, value projections and convs get random weights so that a wrong N-gram, a pad inside a
window or a lost conv state changes the logits. Tolerance 1e-4 on fp32 logits, which reach
about 10 here (wide random init): cached and uncached paths sum in different orders (about 1e-5
observed); a structural error moves them by 1e-2 or more.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from engram.hf.attach import (
    add_engram,
    as_engram_tokenizer,
    engram_param_groups,
    engram_parameters,
    freeze_backbone,
    get_attachment,
    load_engram,
    save_engram,
)
from engram.spec import SpecConfig, resolve
from engram.tokenizer import train_bpe

ATOL = 1e-4
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


@pytest.fixture(scope="module")
def tok():
    text = "\n".join(f"def f{i}(x):\n    return x + {i}  # note {i % 7}" for i in range(300))
    return train_bpe([text], vocab_size=300)


def _spec(tok, layer_ids=(0, 2), seed=0):
    config = SpecConfig(
        tokenizer="test-bpe",
        layer_ids=layer_ids,
        orders=(2, 3),
        heads_per_order=2,
        base_sizes=(1009, 1013),
        row_dim=8,
        seed=seed,
    )
    return resolve(config, tokenizer=tok)


@pytest.fixture(scope="module")
def spec(tok):
    return _spec(tok)


def _base(tok, family="llama", seed=0):
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=tok.vocab_size,
        pad_token_id=tok.pad_id,
        eos_token_id=tok.eos_id,
        bos_token_id=None,
        initializer_range=0.2,  # larger than the default so the logits are far from ties
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return model_cls(config).eval()


def _attached(tok, spec, family="llama", seed=0):
    model = _base(tok, family, seed)
    add_engram(model, spec, tok)
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # a trained Engram is not the identity: make every path matter
        for e in engram_parameters(model):
            e.normal_(std=0.5 if e.ndim > 1 else 0.1)
    return model


def _prompts(tok):
    """A left-padded batch of two prompts of different lengths; the first holds an EOS.

    The pads are EOS ids, as many HF tokenizers pad: they must neither end a document nor be
    hashed as the spec's pad id. The EOS ends the 9-token prefill chunk of the stepwise test.
    """
    g = torch.Generator().manual_seed(0)
    a = torch.randint(3, tok.vocab_size, (13,), generator=g)
    a[8] = tok.eos_id
    b = torch.randint(3, tok.vocab_size, (7,), generator=g)
    ids = torch.full((2, 13), tok.eos_id)
    mask = torch.zeros(2, 13, dtype=torch.long)
    ids[0], ids[1, 6:] = a, b
    mask[0], mask[1, 6:] = 1, 1
    return ids, mask


def _diff(a, b):
    return (a - b).abs().max().item()


def test_attaching_starts_as_the_base_model(tok, spec):
    model = _base(tok)
    ids, mask = _prompts(tok)
    before = model(ids, attention_mask=mask).logits
    add_engram(model, spec, tok)  # identity_init: the value projection starts at zero
    assert torch.equal(model(ids, attention_mask=mask).logits, before)
    assert all(hasattr(model.model.layers[i], "engram") for i in (0, 2))
    assert not hasattr(model.model.layers[1], "engram")
    with torch.no_grad():
        model.model.layers[0].engram.value_proj.weight.normal_()  # no longer the identity
    assert not torch.equal(model(ids, attention_mask=mask).logits, before)
    get_attachment(model).remove(model)
    assert torch.equal(model(ids, attention_mask=mask).logits, before)
    assert not any(hasattr(layer, "engram") for layer in model.model.layers)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_generate_cached_equals_uncached(tok, spec, family):
    model = _attached(tok, spec, family)
    ids, mask = _prompts(tok)
    kw = dict(max_new_tokens=8, do_sample=False)
    cached = model.generate(ids, attention_mask=mask, **kw)
    uncached = model.generate(ids, attention_mask=mask, use_cache=False, **kw)
    assert torch.equal(cached, uncached), (cached[:, 13:], uncached[:, 13:])
    one = model.generate(ids[1:, 6:], **kw)  # the short prompt alone, unpadded
    assert torch.equal(one[0, 7:], cached[1, 13:])


@torch.no_grad()
def test_beam_search_reorders_the_engram_state(tok, spec):
    model = _attached(tok, spec)
    ids, mask = _prompts(tok)
    kw = dict(max_new_tokens=6, do_sample=False, num_beams=3, num_return_sequences=2)
    cached = model.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(cached, model.generate(ids, attention_mask=mask, use_cache=False, **kw))


@torch.no_grad()
def test_stepwise_logits_match_and_state_matters(tok, spec):
    """Chunked prefill + token steps == one full forward; a lost state breaks it."""
    model = _attached(tok, spec)
    ids, mask = _prompts(tok)
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    full = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    out = model(ids[:, :9], attention_mask=mask[:, :9], position_ids=positions[:, :9])
    cache, steps = out.cache, [out.logits]
    for t in range(9, 13):
        step = model(
            ids[:, t : t + 1],
            attention_mask=mask[:, : t + 1],
            position_ids=positions[:, t : t + 1],
            cache=cache,
        )
        assert step.cache is cache
        steps.append(step.logits)
    got = torch.cat(steps, dim=1)
    real = mask.bool()
    assert _diff(got[real], full[real]) < ATOL
    # Forget the N-gram history and conv windows (what a cache without Engram state would do).
    state = cache.engram_state
    state.hash_state.reset(torch.ones(2, dtype=torch.bool))
    for window in state.windows.values():
        window.zero_()
    nxt = torch.tensor([[7], [8]])
    wrong = model(nxt, attention_mask=torch.ones(2, 14, dtype=torch.long), cache=cache).logits
    right = model(torch.cat([ids, nxt], 1), attention_mask=torch.cat([mask, mask[:, :1]], 1))
    assert _diff(wrong[:, -1], right.logits[:, -1]) > 1e-3


@pytest.mark.parametrize("chunk", [13, 3])
@torch.no_grad()
def test_pads_anywhere_are_invisible(tok, spec, chunk):
    """Pads of an arbitrary id inside a row (split across chunks): each row's real tokens get
    the logits they get alone, so no pad entered an N-gram or a conv window."""
    model = _attached(tok, spec)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, tok.vocab_size, (2, 13), generator=g)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, 4:8] = 0
    ids[1, 4:8] = 17  # neither the spec's pad id nor EOS
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    cache, out = None, []
    for a in range(0, 13, chunk):
        step = model(
            ids[:, a : a + chunk],
            attention_mask=mask[:, : a + chunk],
            position_ids=positions[:, a : a + chunk],
            cache=cache,
        )
        cache = step.cache
        out.append(step.logits)
    got = torch.cat(out, dim=1)
    real = mask[1].bool()
    assert _diff(got[0], model(ids[:1]).logits[0]) < ATOL
    assert _diff(got[1, real], model(ids[1:, real]).logits[0]) < ATOL


@torch.no_grad()
def test_ngrams_and_conv_do_not_cross_an_eos(tok, spec):
    """Layer 0 sees token embeddings only, so its Engram output after an EOS is the one the
    next document gets alone (attention, unlike Engram, reads across the EOS)."""
    model = _attached(tok, spec)
    seen = []
    model.model.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    ids = torch.randint(3, tok.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    ids[0, 4] = tok.eos_id
    for x in (ids, ids[:, 5:]):
        model(x, use_cache=False)
        seen[-1] = seen[-1] - model.model.embed_tokens(x)  # what Engram added
    assert seen[0][0, 5:].abs().max() > 0.1
    assert _diff(seen[0][0, 5:], seen[1][0]) < ATOL


@torch.no_grad()
def test_crop_rolls_back_whole_forwards(tok, spec):
    model = _attached(tok, spec)
    ids = torch.randint(3, tok.vocab_size, (1, 10))
    cache = model(ids[:, :8]).cache
    first = model(ids[:, 8:9], cache=cache).logits
    model(ids[:, 9:10], cache=cache)
    cache.crop(-1)
    assert cache.get_seq_length() == 9
    assert _diff(model(ids[:, 9:10], cache=cache).logits, model(ids).logits[:, 9:]) < ATOL
    with pytest.raises(ValueError, match="whole forward"):
        cache.crop(-3)  # inside the 8-token prefill
    assert first.shape == (1, 1, tok.vocab_size)
    with pytest.raises(ValueError, match="changed outside"):
        cache.layers[0].crop(-1)  # the K/V alone: Engram notices on the next forward
        model(ids[:, :1], cache=cache)


def test_training_engram_alone_with_a_frozen_backbone(tok, spec):
    model = _base(tok)
    add_engram(model, spec, tok)
    model.train()
    trainable = freeze_backbone(model)
    assert {id(p) for p in trainable} == {id(p) for p in model.parameters() if p.requires_grad}
    backbone = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    engram = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(engram_param_groups(model, lr=1e-2))
    ids = torch.randint(3, tok.vocab_size, (4, 24), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss  # use_cache defaults on: the state must not leak grads
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in backbone.items())
    assert all(not torch.equal(params[n], p) for n, p in engram.items())
    groups = engram_param_groups(model, lr=1.0)
    assert groups[0]["lr"] == 5.0 and groups[0]["weight_decay"] == 0.0


def test_save_load_round_trip(tok, spec, tmp_path):
    model = _attached(tok, spec)
    ids, mask = _prompts(tok)
    save_engram(model, tmp_path)
    meta = json.loads((tmp_path / "engram.json").read_text())
    assert meta["layers"] == [0, 2] and meta["tokenizer_fingerprint"] == tok.fingerprint
    fresh = _base(tok)  # the same backbone weights (same seed), no Engram
    load_engram(fresh, tmp_path, tok)
    with torch.no_grad():
        assert torch.equal(
            fresh(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
        )


def test_mismatches_fail_clearly(tok, spec, tmp_path):
    save_engram(_attached(tok, spec), tmp_path)
    other_tok = train_bpe(["completely different text " * 50], vocab_size=300)
    with pytest.raises(ValueError, match="tokenizer"):
        load_engram(_base(tok), tmp_path, other_tok)
    other = _base(tok)
    add_engram(other, _spec(tok, seed=1), tok)
    with pytest.raises(ValueError, match="spec"):
        load_engram(other, tmp_path, tok)
    subset = _base(tok)
    add_engram(subset, spec, tok, layers=[2])
    with pytest.raises(ValueError, match="layers"):
        load_engram(subset, tmp_path, tok)
    with pytest.raises(ValueError, match="fingerprint"):
        add_engram(_base(tok), spec, other_tok)
    with pytest.raises(ValueError, match="already has Engram"):
        add_engram(subset, spec, tok)
    with pytest.raises(ValueError, match="distinct layers of the spec"):
        add_engram(_base(tok), spec, tok, layers=[1])
    with pytest.raises(ValueError, match="3 decoder layers"):
        add_engram(_base(tok), _spec(tok, layer_ids=(0, 5)), tok)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel \(model_type .gpt2.\) is not a family"):
        add_engram(gpt2, spec, tok)
    with pytest.raises(ValueError, match="input_ids"):
        model = _attached(tok, spec)
        model(inputs_embeds=torch.zeros(1, 3, 64))


def test_hf_tokenizer_objects_are_converted(tok, spec):
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok.backend, eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    converted = as_engram_tokenizer(hf)
    hf.padding_side = "left"
    batch = hf(["def f1", "return x + 12"], padding=True, return_tensors="pt")
    again = as_engram_tokenizer(hf)  # padding switched on in the backend: same fingerprint
    assert again.fingerprint == converted.fingerprint and again.eos_id == tok.eos_id
    hf_spec = resolve(spec.config, tokenizer=converted)
    model = _base(tok)
    add_engram(model, hf_spec, hf)
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)
