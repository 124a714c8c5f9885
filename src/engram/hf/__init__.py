"""Hugging Face transformers integration (the `hf` extra: pip install engram-lm[hf]).

- `EngramForCausalLM` / `EngramHFConfig`: our LM as a `PreTrainedModel`,
  with `save_pretrained` / `from_pretrained` and exact cached `generate()`.
- `add_engram(model, spec, tokenizer, layers=...)`: Engram memory attached to an existing decoder
  of a verified family (`engram.hf.families`), with its N-gram history and conv windows in the
  model's cache; `save_engram` / `load_engram` keep the added parameters apart from the base
  weights. `engram.hf.backbone`: such a model trained through `engram train` (`base.path`).
"""

from engram.hf.attach import (
    EngramAttachment,
    add_engram,
    as_engram_tokenizer,
    engram_param_groups,
    engram_parameters,
    freeze_backbone,
    get_attachment,
    load_engram,
    save_engram,
)
from engram.hf.causal_lm import EngramCache, EngramForCausalLM, EngramHFConfig

__all__ = [
    "EngramAttachment",
    "EngramCache",
    "EngramForCausalLM",
    "EngramHFConfig",
    "add_engram",
    "as_engram_tokenizer",
    "engram_param_groups",
    "engram_parameters",
    "freeze_backbone",
    "get_attachment",
    "load_engram",
    "save_engram",
]
