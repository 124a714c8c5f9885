"""The transformers decoder families Engram is verified on, and the check that refuses the rest.

Engram attaches before the decoder layers at `model.model.layers`, adding to the residual stream
each layer receives as `hidden_states` (`engram.hf.attach`). Whether a family's layers have that
shape, and whether its cache lets Engram's decoding state follow the K/V exactly, is measured,
not assumed: `bench/hf_families.py` builds a small model of every causal-LM family of the pinned
transformers (5.24.0) and checks that Engram attaches, that cached decoding equals full forwards
(1e-4) and greedy `generate()` with and without the cache agree, and that `save_engram` then
`load_engram` gives identical logits. `VERIFIED` is the list it printed
(`bench/results/hf_families.json`; tests/test_hf_families.py checks both agree and reruns the
check on every verified family). The others fail a check (hybrid linear-attention caches,
multi-stream residuals such as hyper-connections, encoder-decoders) or could not be built at a
small size (multimodal models); they are refused by name.
"""

from __future__ import annotations

import copy
import inspect
import tempfile
from typing import Any

import torch
from torch import nn

VERIFIED = frozenset(
    {
        "afmoe",
        "apertus",
        "apertus1p5_text",
        "arcee",
        "aria_text",
        "beam",
        "bitnet",
        "cohere",
        "cohere2",
        "cohere2_moe",
        "diffllama",
        "doge",
        "ernie4_5",
        "ernie4_5_moe",
        "exaone",
        "exaone4",
        "exaone_moe",
        "falcon_h1",
        "flex_olmo",
        "flint",
        "gemma",
        "gemma2",
        "gemma3_text",
        "gemma4_unified_text",
        "glm",
        "glm4",
        "glm4_moe",
        "gpt_oss",
        "granite",
        "granite_swa",
        "granitemoe",
        "granitemoe_swa",
        "granitemoeshared",
        "helium",
        "hunyuan_v1_dense",
        "hunyuan_v1_moe",
        "hy_v3",
        "hyperclovax",
        "inkling_text",
        "internlm3",
        "iquestcoder",
        "jais2",
        "jetmoe",
        "kolibri1",
        "laguna",
        "lara_mini",
        "lfm2",
        "lfm3",
        "llama",
        "llama4_text",
        "mellum",
        "mimo_v2_flash",
        "minimax_m2",
        "minimax_m3_vl_text",
        "ministral",
        "ministral3",
        "mistral",
        "mixtral",
        "nanochat",
        "nemotron",
        "nemotron_h",
        "olmo",
        "olmo2",
        "olmo3",
        "olmo_hybrid",
        "olmoe",
        "persimmon",
        "phi",
        "phi3",
        "phimoe",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "sarvam_moe",
        "seed_oss",
        "smollm3",
        "solar_open",
        "stablelm",
        "starcoder2",
        "vaultgemma",
        "xglm",
        "zamba",
    }
)


def check_family(model: Any) -> None:
    """ValueError naming `model`'s class unless its family is one Engram is verified on."""
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in VERIFIED:
        raise ValueError(
            f"{type(model).__name__} (model_type {family!r}) is not a family Engram is "
            f"verified on ({len(VERIFIED)} are: see engram.hf.families.VERIFIED, docs/hf.md)"
        )


_MAX_PARAMS = 5_000_000  # larger than this, the small shape did not apply (multimodal)


def verify_family(family: str, tok: Any, spec: Any, ids: torch.Tensor) -> dict[str, Any]:
    """Check that Engram attaches to a small `family` model exactly (`bench/hf_families.py`
    says how): {"stage": "verified", measurements} or the stage that failed, with the error.
    `tok` and `spec`: a tokenizer and a spec of it with layer ids 0 and 2; `ids`: [1, 40]."""
    from engram.hf import attach  # imports this module
    from engram.hf.tiny import tiny_decoder

    try:
        model = tiny_decoder(family, tok).eval()
    except Exception as e:  # a config that rejects the shape: not a failure of ours
        return {"stage": "build", "error": f"{type(e).__name__}: {str(e)[:160]}"}
    params = sum(p.numel() for p in model.parameters())
    if params > _MAX_PARAMS:
        return {"stage": "build", "error": f"{params} parameters: the shape did not apply"}
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        return {"stage": "layers", "error": "no model.model.layers"}
    first = next(iter(inspect.signature(layers[0].forward).parameters))
    if first != "hidden_states":
        return {"stage": "layers", "error": f"its layers take {first!r} first"}
    base = copy.deepcopy(model)
    try:
        attach.add_engram(model, spec, tok, identity_init=False, verified_only=False)
        with torch.no_grad():
            full = model(ids).logits
            prefill = model(ids[:, :30], use_cache=True)
            step = model(ids[:, 30:], past_key_values=prefill.past_key_values, use_cache=True)
            err = (torch.cat([prefill.logits, step.logits], 1) - full).abs().max().item()
            greedy = [
                model.generate(ids[:, :20], max_new_tokens=8, do_sample=False, use_cache=c)
                for c in (True, False)
            ]
            with tempfile.TemporaryDirectory() as folder:
                attach.save_engram(model, folder)
                attach.load_engram(base, folder, tok, verified_only=False)
            reloaded = base.eval()(ids).logits
    except Exception as e:
        return {"stage": "engram", "error": f"{type(e).__name__}: {str(e)[:160]}"}
    same = torch.equal(greedy[0], greedy[1])
    out = {"params": params, "cached_max_abs_diff": err, "generate_same": same}
    out["reload_equal"] = torch.equal(reloaded, full)
    out["stage"] = "verified" if err <= 1e-4 and same and out["reload_equal"] else "engram"
    return out
