"""`engram demo`: an end-to-end tour of the core, in about two minutes on a 2-core CPU.

1. The DeepSeek tokenizer's compression (the paper reports a 23.43% reduction).
2. The `demo-v1` hash spec and the rows it addresses for the paper's example sentence.
3. A small, honest experiment: a next-token model that sees only the current token (a bigram model)
   against the same model plus one Engram layer (which also sees 2- and 3-grams through its
   tables), trained on the same Python standard-library text with the same seed and steps.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engram.data import read_texts, stdlib_files
from engram.hashing import NgramHasher
from engram.module import Engram, EngramConfig
from engram.spec import SpecConfig, resolve
from engram.tokenizer import load_tokenizer, train_bpe
from engram.vocab import compress

EXAMPLE = "Only Alexander the Great could tame the horse Bucephalus."


class TinyLM(nn.Module):
    """Embedding -> (optional Engram) -> RMSNorm -> LM head: the smallest model memory can help."""

    def __init__(self, vocab_size: int, d: int, engram: Engram | None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d)
        self.engram = engram
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab_size, bias=False)

    def forward(self, ids: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        h = self.embed(ids)  # [B, T, d]
        if self.engram is not None:
            h = h + self.engram(h, rows)
        return self.head(self.norm(h))  # [B, T, V]


@dataclass
class Arm:
    name: str
    params: int
    val_loss: float
    seconds: float


def _batches(tokens: torch.Tensor, batch: int, seq: int, steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, tokens.numel() - seq - 1, (batch,), generator=gen)
        chunk = torch.stack([tokens[s : s + seq + 1] for s in starts.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


def _evaluate(model: TinyLM, hasher: NgramHasher, tokens: torch.Tensor, seq: int) -> float:
    n = (tokens.numel() - 1) // seq
    x = tokens[: n * seq].view(n, seq)
    y = tokens[1 : n * seq + 1].view(n, seq)
    total = 0.0
    with torch.no_grad():  # in chunks of 16 sequences: [16*seq, V] logits stay small
        for xs, ys in zip(x.split(16), y.split(16), strict=True):
            rows = hasher(xs)[hasher.spec.layer_ids[0]] if model.engram is not None else None
            logits = model(xs, rows)
            total += nn.functional.cross_entropy(
                logits.flatten(0, 1), ys.flatten(), reduction="sum"
            ).item()
    return total / y.numel()


def _train_arm(
    name: str,
    model: TinyLM,
    hasher: NgramHasher,
    train: torch.Tensor,
    val: torch.Tensor,
    steps: int,
    seed: int,
) -> Arm:
    groups = [{"params": [p for n, p in model.named_parameters() if "table" not in n]}]
    if model.engram is not None:  # the paper: tables get 5x the learning rate, no weight decay
        groups.append({"params": [model.engram.table.weight], "lr": 5e-3 * 5, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=5e-3, weight_decay=0.01)
    start = time.perf_counter()
    for step, (x, y) in enumerate(_batches(train, 16, 128, steps, seed)):
        rows = hasher(x)[hasher.spec.layer_ids[0]] if model.engram is not None else None
        loss = nn.functional.cross_entropy(model(x, rows).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  [{name}] step {step:4d}/{steps}  loss {loss.item():.3f}", flush=True)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    return Arm(name, params, _evaluate(model, hasher, val, 128), seconds)


def _tour_compression() -> dict:
    tok = load_tokenizer("deepseek")
    vocab = compress(tok)
    spec = resolve("demo-v1", tokenizer=tok, vocab=vocab)
    print(
        f"1. Tokenizer compression: {tok.vocab_size:,} DeepSeek ids -> {vocab.size:,} canonical "
        f"ids ({vocab.reduction:.2%} fewer; the paper reports 23.43%)"
    )
    ids = torch.tensor([tok.encode(EXAMPLE)])
    rows = NgramHasher(spec, vocab)(ids)
    layer = spec.layer_ids[0]
    print(
        f"2. Spec demo-v1: layers {list(spec.layer_ids)}, orders {list(spec.orders)}, "
        f"{spec.heads_total} heads of {spec.row_dim} dims, layer {layer} table "
        f"{spec.layer_rows(layer):,} rows; primes {list(spec.layer_primes(layer)[:3])}..."
    )
    for t, tid in enumerate(ids[0, :4].tolist()):
        print(f"   {tok.decode([tid])!r:>12} -> rows {rows[layer][0, t, :4].tolist()}...")
    return {
        "vocab_size": tok.vocab_size,
        "compressed_vocab_size": vocab.size,
        "reduction": vocab.reduction,
        "spec_digest": spec.digest,
    }


def run_demo(
    steps: int = 300, out_dir: str | Path = "runs/demo-core", seed: int = 0, files: int = 300
) -> dict:
    """Run the tour and the small experiment; write `summary.json` to `out_dir`."""
    torch.manual_seed(seed)
    summary = {"compression": _tour_compression()}

    print("3. Bigram model vs bigram model + Engram on Python stdlib source")
    files = stdlib_files("train", max_files=files)
    tok = train_bpe(read_texts(files), vocab_size=2048)
    train = torch.tensor([i for text in read_texts(files) for i in tok.encode(text)])
    val = torch.tensor(
        [i for text in read_texts(stdlib_files("val", max_files=8)) for i in tok.encode(text)]
    )[:32768]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out / "tokenizer.json")  # the spec names a file anyone can load again
    config = SpecConfig(
        tokenizer=str(out / "tokenizer.json"),
        layer_ids=(0,),
        orders=(2, 3),
        heads_per_order=4,
        base_sizes=(20011, 20011),
        row_dim=16,
    )
    spec = resolve(config, tokenizer=tok)
    hasher = NgramHasher(spec, compress(tok))
    d = 128
    arms = []
    for name, with_engram in (("bigram", False), ("bigram+engram", True)):
        torch.manual_seed(seed)
        engram = Engram(spec, 0, EngramConfig(hidden_size=d)) if with_engram else None
        arms.append(
            _train_arm(name, TinyLM(tok.vocab_size, d, engram), hasher, train, val, steps, seed)
        )

    print(f"\n   {'model':<15}{'params':>10}{'val loss':>10}{'val ppl':>10}{'seconds':>9}")
    for a in arms:
        print(
            f"   {a.name:<15}{a.params:>10,}{a.val_loss:>10.3f}{math.exp(a.val_loss):>10.1f}"
            f"{a.seconds:>9.1f}"
        )
    (out / "spec.json").write_text(spec.to_json(indent=2))
    summary["experiment"] = {
        "train_tokens": train.numel(),
        "val_tokens": val.numel(),
        "steps": steps,
        "arms": [a.__dict__ for a in arms],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nWrote {out / 'summary.json'}")
    return summary
