"""The decoder families Engram is verified on: the list, its record, and each one rechecked.

`bench/hf_families.py` checks every causal-LM family of the pinned transformers; the suite
reruns the same check (`verify_family`: attach, exact cached decoding and generate, save and
load) on every verified family (about 15 s for 83), and checks that others are refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from engram.hf.attach import add_engram
from engram.hf.families import VERIFIED, verify_family
from engram.hf.tiny import tiny_decoder
from engram.spec import SpecConfig, resolve
from engram.tokenizer import train_bpe

RECORD = Path(__file__).parent.parent / "bench" / "results" / "hf_families.json"
FAMILIES = sorted(VERIFIED)
TEXT = "\n".join(f"def f{i}(x):\n    return x + {i}  # note {i % 7}" for i in range(300))


@pytest.fixture(scope="module")
def tok():
    return train_bpe([TEXT], vocab_size=300)


@pytest.fixture(scope="module")
def spec(tok):
    config = SpecConfig(
        tokenizer="test", layer_ids=(0, 2), orders=(2, 3), heads_per_order=2,
        base_sizes=(1009, 1013), row_dim=8,
    )  # fmt: skip
    return resolve(config, tokenizer=tok)


def test_the_verified_list_is_what_the_benchmark_measured():
    record = json.loads(RECORD.read_text())
    assert record["versions"]["transformers"] == transformers.__version__
    assert sorted(VERIFIED) == record["verified"]
    assert {"llama", "qwen3_moe", "mixtral", "gemma3_text"} <= VERIFIED  # MoE, Gemma 3


@pytest.mark.parametrize("family", FAMILIES)
def test_engram_on_a_verified_family_decodes_and_reloads_exactly(family, tok, spec):
    ids = torch.tensor([tok.encode(TEXT[:300])[:40]])
    result = verify_family(family, tok, spec, ids)
    assert result["stage"] == "verified", result
    assert result["cached_max_abs_diff"] <= 1e-4 and result["generate_same"]


@pytest.mark.parametrize("family", ["gpt2", "bamba", "deepseek_v4"])
def test_other_families_are_refused_by_name(family, tok, spec):
    """GPT-2's blocks are not at model.model.layers; Bamba's hybrid cache holds no K/V to
    follow; DeepSeek V4's residual is several streams (hyper-connections)."""
    model = tiny_decoder(family, tok)
    with pytest.raises(ValueError, match=f"{type(model).__name__} .model_type '{family}'"):
        add_engram(model, spec, tok)
