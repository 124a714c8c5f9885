"""Which transformers decoder families Engram attaches to exactly: every causal LM, checked.

For each model_type in the pinned transformers' causal-LM mapping, one process builds a small
randomly initialised model from one shape (`engram.hf.tiny.SHAPE`) and checks, in order:
1. it builds (some configs reject the shape, or are multimodal and far larger than it);
2. its decoder layers sit at `model.model.layers` and take `hidden_states` first;
3. `add_engram` attaches at layers 0 and 2 (random Engram weights, so that errors show);
4. cached decoding is exact: a prefill of 30 tokens then 10 more against one full forward
   (max |logit difference| <= 1e-4), and greedy `generate()` of 8 tokens with and without the
   cache gives the same tokens;
5. `save_engram` then `load_engram` into a fresh copy of the base model gives identical logits.
A family passing all five is *verified*: `engram.hf.families.VERIFIED` lists them, and the
attachment refuses every other family by name. The last line of output is one JSON record
(also written to --out).
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import warnings
from pathlib import Path

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

from engram.experiments.report import machine_info, write_json
from engram.hf.families import verify_family
from engram.spec import SpecConfig, resolve
from engram.tokenizer import train_bpe

TEXT = "\n".join(f"def f{i}(x):\n    return x + {i}  # note {i % 7}" for i in range(300))


class Timeout(Exception):
    pass


def _alarm(*_: object) -> None:
    raise Timeout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="", help="comma-separated model_types (all)")
    parser.add_argument("--out", default="bench/results/hf_families.json")
    args = parser.parse_args()
    # A family whose config ignores the shape can try to allocate gigabytes: an error instead.
    resource.setrlimit(resource.RLIMIT_AS, (10 << 30, 10 << 30))
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    signal.signal(signal.SIGALRM, _alarm)
    tok = train_bpe([TEXT], vocab_size=300)
    spec_config = SpecConfig(
        tokenizer="bench", layer_ids=(0, 2), orders=(2, 3), heads_per_order=2,
        base_sizes=(1009, 1013), row_dim=8,
    )  # fmt: skip
    spec = resolve(spec_config, tokenizer=tok)
    ids = torch.tensor([tok.encode(TEXT[:300])[:40]])
    families = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    families = args.families.split(",") if args.families else families
    results = {}
    for family in families:
        signal.alarm(120)
        try:
            results[family] = verify_family(family, tok, spec, ids)
        except Timeout:
            results[family] = {"stage": "timeout"}
        finally:
            signal.alarm(0)
        print(family, json.dumps(results[family]), flush=True)
    verified = sorted(f for f, r in results.items() if r["stage"] == "verified")
    record = {"bench": "hf_families", "machine": machine_info()}
    record["versions"] = {"transformers": transformers.__version__}
    record["config"] = {"families": args.families or "all"}
    record["verified"] = verified
    record["counts"] = {s: sum(r["stage"] == s for r in results.values()) for s in
                        ("verified", "engram", "layers", "build", "timeout")}  # fmt: skip
    record["results"] = results
    write_json(Path(args.out), record)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
