"""Add Engram to a Hugging Face Llama and fine-tune the memory alone, against a fair control.

    python recipes/hf_add_engram.py --steps 250

1. Train a byte-level BPE and tokenise the default corpus (the Python standard library) into
   train and validation shards (both cached under ~/.cache/engram after the first run).
2. Build a small `LlamaForCausalLM` from a local config (nothing is downloaded) and train the
   whole model for `--base-steps` steps: this stands in for a pretrained checkpoint.
3. From that checkpoint, three arms of `--steps` steps each on the same batches:
   - control: keep training every backbone parameter, no Engram;
   - engram: `add_engram` at decoder layer 1 (the paper's placement), backbone frozen, only
     the Engram parameters trained (tables at 5x the rate, as in the paper);
   - engram + backbone: the same Engram, trained together with the backbone.
4. Report validation loss before and after for both arms, check that cached and uncached
   greedy generation agree, save the Engram alone and load it back into the checkpoint.

See docs/hf.md for a measured run and how to read it.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from engram.assembly import get_tokenizer
from engram.data import PackedLoader, build_shard, eval_batches
from engram.hf.attach import (
    add_engram,
    engram_param_groups,
    engram_parameters,
    freeze_backbone,
    load_engram,
    save_engram,
)
from engram.spec import HashSpec, SpecConfig, resolve
from engram.tokenizer import Tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=250, help="steps of each fine-tuning arm")
    p.add_argument("--base-steps", type=int, default=500, help="steps of the base model")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size")
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_llama(vocab_size: int, tok: Tokenizer, seq_len: int, seed: int) -> LlamaForCausalLM:
    """A 4-layer, 128-wide Llama (about 0.9M parameters with a 2,048-id vocabulary)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seq_len,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def lm_loss(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits  # [B, T, V]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def train(
    model: nn.Module, params: Iterable, loader: PackedLoader, steps: int, lr: float, first: int = 0
) -> float:
    """AdamW over `params` (tensors, or groups with their own rates) on batches first,
    first+1, ... with a 30-step linear warm-up; returns seconds per step."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 30))
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        batch = loader.batch_at(0, first + step)
        loss = lm_loss(model, batch.ids, batch.targets)
        loss.backward()
        opt.step()
        warmup.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.4f}", flush=True)
    return (time.perf_counter() - start) / max(1, steps)


@torch.no_grad()
def evaluate(model: nn.Module, val_tokens: np.ndarray, args: argparse.Namespace) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in eval_batches(val_tokens, args.seq_len, args.batch_size, None, args.eval_tokens):
        total += lm_loss(model, batch.ids, batch.targets).item() * batch.targets.numel()
        count += batch.targets.numel()
    return total / count


def engram_spec(tok: Tokenizer, tokenizer_path: str) -> HashSpec:
    """Orders 2-3, 4 heads each of 16 dims, ~30k rows per head: 3.9M table parameters."""
    config = SpecConfig(
        tokenizer=tokenizer_path,
        layer_ids=(1,),
        orders=(2, 3),
        heads_per_order=4,
        base_sizes=(30011, 30011),
        row_dim=16,
    )
    return resolve(config, tokenizer=tok)


def check_generation_and_saving(
    model: LlamaForCausalLM, base: LlamaForCausalLM, tok: Tokenizer
) -> str:
    """Cached == uncached greedy generation; the saved Engram reloads into the base exactly."""
    prompts = [tok.encode("def __init__(self"), tok.encode("import os\nimport")]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_id] * (width - len(p)) + p for p in prompts])  # left padding
    pads = torch.tensor([width - len(p) for p in prompts])
    mask = (torch.arange(width)[None, :] >= pads[:, None]).long()
    kw = dict(attention_mask=mask, max_new_tokens=24, do_sample=False)
    model.eval()
    cached = model.generate(ids, **kw)
    assert torch.equal(cached, model.generate(ids, use_cache=False, **kw)), "cache mismatch"
    with tempfile.TemporaryDirectory() as folder:
        save_engram(model, folder)
        reloaded = copy.deepcopy(base)
        load_engram(reloaded, folder, tok)
        with torch.no_grad():
            same = torch.equal(reloaded.eval()(ids).logits, model(ids).logits)
        assert same, "reloaded Engram differs"
    return tok.decode(cached[0, width - len(prompts[0]) :].tolist())


def fine_tune_arms(
    base: LlamaForCausalLM,
    spec: HashSpec,
    tok: Tokenizer,
    loader: PackedLoader,
    val_tokens: np.ndarray,
    args: argparse.Namespace,
) -> tuple[dict, LlamaForCausalLM]:
    """The three arms from the same checkpoint, on the same batches; the Engram-only model."""
    results, first = {}, args.base_steps
    control = copy.deepcopy(base)  # the backbone keeps training, no Engram
    print("control: backbone fine-tuning, no Engram")
    s = train(control, control.parameters(), loader, args.steps, args.lr, first)
    results.update(val_control=evaluate(control, val_tokens, args), control_s_per_step=s)

    alone = copy.deepcopy(base)  # Engram alone on the frozen backbone
    add_engram(alone, spec, tok)
    freeze_backbone(alone)
    n = sum(p.numel() for p in engram_parameters(alone))
    print(f"engram: {n:,} trainable parameters, backbone frozen")
    groups = engram_param_groups(alone, args.lr)  # tables at 5x the rate, no weight decay
    s = train(alone, groups, loader, args.steps, args.lr, first)
    results.update(val_engram=evaluate(alone, val_tokens, args), engram_s_per_step=s)

    joint = copy.deepcopy(base)  # Engram and the backbone together
    add_engram(joint, spec, tok)
    print("engram + backbone: both trained")
    engram_ids = {id(p) for p in engram_parameters(joint)}
    backbone = [p for p in joint.parameters() if id(p) not in engram_ids]
    groups = [{"params": backbone}, *engram_param_groups(joint, args.lr)]
    s = train(joint, groups, loader, args.steps, args.lr, first)
    results.update(val_joint=evaluate(joint, val_tokens, args), joint_s_per_step=s)
    results["engram_params"] = n
    return results, alone


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    tokenizer_name = f"bpe:{args.vocab}"
    tok = get_tokenizer(tokenizer_name, "default")
    train_tokens = build_shard("default", "train", tok).tokens
    val_tokens = build_shard("default", "val", tok).tokens
    loader = PackedLoader(train_tokens, args.seq_len, args.batch_size, seed=args.seed, prefetch=0)
    print(f"data ready in {time.perf_counter() - start:.0f} s: {len(train_tokens):,} train tokens")

    base = build_llama(tok.vocab_size, tok, args.seq_len, args.seed)
    print(f"base model: {sum(p.numel() for p in base.parameters()):,} parameters")
    train(base, base.parameters(), loader, args.base_steps, args.lr)
    results = {"val_before": evaluate(base, val_tokens, args)}

    spec = engram_spec(tok, tokenizer_name)
    arms, model = fine_tune_arms(base, spec, tok, loader, val_tokens, args)
    results.update(arms)
    results["sample"] = check_generation_and_saving(model, base, tok)
    results["seconds"] = time.perf_counter() - start
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
