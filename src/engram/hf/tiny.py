"""Small randomly initialised decoders of any supported family, saved as `save_pretrained` does.

For the tests, the README's first run and smoke runs of recipes: a model someone "pretrained",
built here in a second from one set of shape settings that every supported family accepts
(`AutoConfig.for_model(model_type, **shape)`), so that `engram train` with `base.path` can be
tried, and tested, on a real `from_pretrained` of a local folder with nothing downloaded.

    python -m engram.hf.tiny runs/hf-base --family llama --tokenizer bpe:2048
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

from engram.tokenizer import Tokenizer

# One shape for every family: keys a family does not know are ignored by its config class.
SHAPE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    # MoE families: four experts, two per token, under each family's own name for it
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "tie_word_embeddings": False,
}


def tiny_decoder(family: str, tokenizer: Tokenizer, seed: int = 0, **shape: Any) -> PreTrainedModel:
    """A small `family` (a transformers model_type, e.g. "llama", "qwen3_moe", "gemma3_text")
    decoder for `tokenizer`'s ids, randomly initialised from `seed`; `shape` overrides `SHAPE`."""
    ids = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id, "bos_token_id": None}
    ids["vocab_size"] = tokenizer.vocab_size
    config = AutoConfig.for_model(family, **{**SHAPE, **shape, **ids})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def save_tiny_decoder(
    folder: str | Path, family: str, tokenizer: Tokenizer, seed: int = 0, **shape: Any
) -> Path:
    """`tiny_decoder` saved into `folder` with its tokenizer: a folder `from_pretrained` reads."""
    folder = Path(folder)
    hf_logging.disable_progress_bar()
    tiny_decoder(family, tokenizer, seed, **shape).save_pretrained(folder)
    tokenizer.save(folder / "tokenizer.json")
    return folder


def main(argv: list[str] | None = None) -> None:
    from engram.assembly import get_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the folder to write (config, weights, tokenizer)")
    parser.add_argument("--family", default="llama", help="a transformers model_type")
    parser.add_argument("--tokenizer", default="bpe:2048", help="as engram train's tokenizer=")
    parser.add_argument("--data", default="default", help="the corpus a bpe:N tokenizer learns")
    parser.add_argument("--hidden-size", type=int, default=SHAPE["hidden_size"])
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tok = get_tokenizer(args.tokenizer, args.data)
    shape = {"hidden_size": args.hidden_size, "num_hidden_layers": args.layers}
    shape |= {"intermediate_size": 2 * args.hidden_size, "head_dim": args.hidden_size // 4}
    folder = save_tiny_decoder(args.out, args.family, tok, args.seed, **shape)
    print(f"saved a {args.family} decoder, {args.layers} x {args.hidden_size}, to {folder}")


if __name__ == "__main__":
    main()
