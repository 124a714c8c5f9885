"""`engram study gates`: how strongly each token gates its memory in, shown over the text.

The paper's case study: Engram's gate alpha = sigmoid(signed sqrt of RMSNorm(h) . RMSNorm(k) /
sqrt(d)) is high where the retrieved N-gram memory fits the context, and the paper's figure
colours the tokens of a sentence by it: multi-token entities and set phrases ("Alexander the
Great", "Bucephalus") light up. This study tokenizes any text with a trained run's tokenizer,
runs the model once, captures each Engram layer's input hidden state with a forward pre-hook (the
model code stays untouched) and computes alpha per token and branch with `Engram.gates`. It
writes a self-contained `gates.html` (one section per text, one row per Engram layer, values on
hover), `gates.png` (the same heat map), `report.json` and `report.md` (top and least gated).

Legend: T tokens, M hyper-connection branches, L Engram layers.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram.assembly import pick_device
from engram.config import TrainConfig
from engram.experiments.gates_view import GateText, gates_html, plot_gates
from engram.experiments.report import machine_info, markdown_table, parse_list, write_json
from engram.inference.load import load_trained
from engram.model import EngramLM, model_preset
from engram.tokenizer import Tokenizer
from engram.train import train

DEFAULT_TEXTS = (
    'def mean(values: list[float]) -> float:\n    """The arithmetic mean."""\n'
    "    if len(values) < 1:\n"
    '        raise ValueError("mean of an empty list")\n'
    "    return sum(values) / len(values)\n",
    "Only Alexander the Great could tame the horse Bucephalus.",
)

# `--quick` without `--ckpt`: a `tiny` model trained for a few steps, so the mode needs nothing.
QUICK_TRAIN = TrainConfig(
    model=model_preset("tiny"),
    tokenizer="bpe:1024",
    seq_len=64,
    batch_size=8,
    steps=30,
    eval_every=1000,
    eval_tokens=2048,
    log_every=10,
    progress=False,
)
TOP = 12  # tokens listed in report.md at each end of the gate scale


# ---- tokens and gates ----------------------------------------------------------------------------
def token_pieces(tok: Tokenizer, text: str) -> tuple[list[int], list[str]]:
    """The ids of `text` and one piece of it per token; the pieces concatenate to `text` exactly.

    Byte-level BPE offsets are character spans; the bytes of one character split over several
    tokens give those tokens the same span, so the character goes to the first of them and the
    others get an empty piece (their gates stay in the report, there is just nothing to colour).
    """
    enc = tok.backend.encode(text, add_special_tokens=False)
    starts, cursor = [], 0
    for i, (start, _) in enumerate(enc.offsets):
        cursor = 0 if i == 0 else max(cursor, min(start, len(text)))
        starts.append(cursor)
    ends = [*starts[1:], len(text)] if starts else []
    return list(enc.ids), [text[a:b] for a, b in zip(starts, ends, strict=True)]


@torch.no_grad()
def capture_gates(model: EngramLM, ids: list[int]) -> dict[int, np.ndarray]:
    """Gate activations {layer: [T, M]} of one token sequence, from one pass of the model.

    A forward pre-hook on every Engram module sees exactly the hidden state and rows the layer
    gets, and evaluates the gate on them. Sequences longer than `max_seq_len` run in windows with
    a fresh attention context each (as `evaluate` does); the rows are hashed over the whole text
    first, so the N-grams at a window start still see the previous window's tokens.
    """
    if not ids:
        raise ValueError("the text has no tokens")
    if model.spec is None:
        raise ValueError("this model has no Engram layers: there are no gates to show")
    device = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.int64, device=device)  # [1, T]
    rows = model.hash(x)
    captured: dict[int, list[torch.Tensor]] = {e.layer_id: [] for e in model.engram_layers}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden"]
        layer_rows = args[1] if len(args) > 1 else kwargs["rows"]
        captured[module.layer_id].append(module.gates(hidden, layer_rows)[0].float().cpu())

    handles = [e.register_forward_pre_hook(hook, with_kwargs=True) for e in model.engram_layers]
    was_training = model.training
    model.eval()
    try:
        # fp32 even on CUDA: bf16 would round the gates to about two decimal digits.
        window = model.config.max_seq_len
        for a in range(0, x.shape[1], window):
            model(x[:, a : a + window], rows={k: r[:, a : a + window] for k, r in rows.items()})
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {layer: torch.cat(parts).numpy() for layer, parts in captured.items()}  # [T, M]


def gate_texts(model: EngramLM, tok: Tokenizer, texts: list[str]) -> list[GateText]:
    """Tokens, pieces and gates of each text."""
    out = []
    for text in texts:
        ids, pieces = token_pieces(tok, text)
        out.append(GateText(text, ids, pieces, capture_gates(model, ids)))
    return out


def read_texts(paths: list[str], whole: bool) -> list[str]:
    """Texts of files: blank-line-separated paragraphs, or each file whole (`whole`)."""
    texts = []
    for path in paths:
        try:
            content = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--file {path}: {e}") from None
        if whole:
            texts.append(content)
            continue
        blocks, current = [], []
        for line in content.splitlines(keepends=True):
            if line.strip():
                current.append(line)
            elif current:
                blocks.append("".join(current))
                current = []
        texts += blocks + (["".join(current)] if current else [])
    return [t for t in texts if t.strip()]


# ---- the study -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GatesConfig:
    ckpt: str | None = None  # a run folder or checkpoint; None with `quick`: train one
    texts: tuple[str, ...] = DEFAULT_TEXTS
    out_dir: str = "runs/gates"
    quick: bool = False
    data: str = "default"  # only for the quick model's training
    colour_range: tuple[float, float] | None = None  # None: the smallest and largest gate shown
    device: str = "auto"

    def validate(self) -> None:
        if self.ckpt is None and not self.quick:
            raise ValueError("give --ckpt RUN (a trained run or checkpoint), or --quick")
        if not self.texts or not any(t.strip() for t in self.texts):
            raise ValueError("no text to show: every given text is empty")
        if self.colour_range is not None:
            lo, hi = self.colour_range
            if not 0.0 <= lo < hi <= 1.0:
                raise ValueError(f"--range {lo},{hi}: expected 0 <= low < high <= 1")


HELP = "each token's gate activation over any text (HTML and PNG heat map)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", help="a trained run folder or checkpoint")
    p.add_argument("--text", action="append", default=[], help="a text to show (repeatable)")
    p.add_argument(
        "--file", action="append", default=[], help="texts separated by blank lines (repeatable)"
    )
    p.add_argument("--whole", action="store_true", help="each --file is one text (for code)")
    p.add_argument("--quick", action="store_true", help="without --ckpt: train a tiny model")
    p.add_argument("--data", help="text source of the --quick model (default: stdlib)")
    p.add_argument("--range", help="colour scale low,high (default: the gates' own range)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="report folder (default runs/gates[-quick])")


def run_cli(args: argparse.Namespace) -> None:
    texts = list(args.text) + read_texts(args.file, args.whole)
    changes: dict[str, Any] = {"ckpt": args.ckpt, "quick": args.quick, "device": args.device}
    if texts:
        changes["texts"] = tuple(texts)
    if args.data:
        changes["data"] = args.data
    if args.range:
        changes["colour_range"] = parse_list(args.range, float, "range")
        if len(changes["colour_range"]) != 2:
            raise ValueError(f"--range {args.range!r}: expected two numbers, low,high")
    changes["out_dir"] = args.out or ("runs/gates" if args.ckpt else "runs/gates-quick")
    run_gates(replace(GatesConfig(), **changes))


def _load(cfg: GatesConfig) -> tuple[EngramLM, Tokenizer, str, dict[str, Any]]:
    """The model to study: the checkpoint, or (quick) a tiny one trained into the out folder."""
    ckpt = cfg.ckpt
    if ckpt is None:
        ckpt = str(Path(cfg.out_dir) / "model")
        train(replace(QUICK_TRAIN, data=cfg.data, out_dir=ckpt, device=cfg.device))
    trained = load_trained(ckpt, device=str(pick_device(cfg.device)))
    model, tok, manifest = trained.model, trained.tokenizer, trained.manifest
    return model, tok, ckpt, manifest


def run_gates(cfg: GatesConfig) -> dict[str, Any]:
    """Gates of every text; writes gates.html, gates.png, report.json and report.md."""
    cfg.validate()
    start = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tok, ckpt, manifest = _load(cfg)
    if model.spec is None:
        raise ValueError(f"the model of {ckpt} has no Engram layers: there are no gates to show")
    texts = gate_texts(model, tok, [t for t in cfg.texts if t.strip()])
    layers = [e.layer_id for e in model.engram_layers]
    lo, hi = cfg.colour_range or _value_range(texts)
    title = f"Engram gates of {ckpt} (step {manifest['step']})"
    (out / "gates.html").write_text(gates_html(texts, layers, lo, hi, title), encoding="utf-8")
    plot = plot_gates(texts, layers, lo, hi, out / "gates.png", title)
    report = {
        "texts": [t.to_json() for t in texts],
        "layers": layers,
        "summary": summarise(texts, layers),
        "colour_range": [lo, hi],
        "config": {
            "ckpt": ckpt,
            "step": manifest["step"],
            "quick": cfg.quick,
            "tokenizer": tok.name,
            "branches": model.config.hc_branches,
            "spec_digest": model.spec.digest,
            "model": manifest["config"]["model"],
        },
        "machine": machine_info(),
        "seconds": time.perf_counter() - start,
    }
    write_json(out / "report.json", report)
    (out / "report.md").write_text(_markdown(report, texts, plot is not None))
    print(_markdown(report, texts, plot is not None))
    print(f"Wrote {out / 'gates.html'}, {out / 'report.md'}, {out / 'report.json'}")
    return report


def _value_range(texts: list[GateText]) -> tuple[float, float]:
    values = np.concatenate([t.mean(layer) for t in texts for layer in t.gates])
    lo, hi = float(values.min()), float(values.max())
    return (lo, hi) if hi > lo else (max(0.0, lo - 0.01), min(1.0, hi + 0.01))


# ---- summary and markdown ------------------------------------------------------------------------
def summarise(texts: list[GateText], layers: list[int]) -> dict[str, Any]:
    """Per layer: mean gate, and the mean over word-initial vs word-continuing tokens.

    A continuing token is one whose piece starts with a letter or digit right after a piece that
    ends with one: the second and later tokens of a multi-token word, where the memory's N-gram
    is most informative (the paper's entities light up on their later tokens).
    """
    summary = {}
    for layer in layers:
        values = np.concatenate([t.mean(layer) for t in texts])
        cont = np.concatenate([t.continuing() for t in texts])
        summary[str(layer)] = {
            "mean": float(values.mean()),
            "min": float(values.min()),
            "max": float(values.max()),
            "continuing_tokens": int(cont.sum()),
            "mean_continuing": float(values[cont].mean()) if cont.any() else None,
            "mean_initial": float(values[~cont].mean()) if (~cont).any() else None,
        }
    return summary


def _md_token(piece: str) -> str:
    shown = repr(piece)[1:-1].replace("|", "\\|") or "(part of a character)"
    return f"`` {shown} ``" if "`" in shown else f"`{shown}`"


def _ranked(texts: list[GateText], layer: int, highest: bool) -> list[list[Any]]:
    entries = [(float(v), n, i) for n, t in enumerate(texts) for i, v in enumerate(t.mean(layer))]
    entries.sort(key=lambda e: -e[0] if highest else e[0])
    rows = []
    for value, n, i in entries[:TOP]:
        t = texts[n]
        context = "".join(t.pieces[max(0, i - 4) : i])
        rows.append([f"{value:.4f}", _md_token(t.pieces[i]), _md_token(context[-30:]), n + 1])
    return rows


def _markdown(report: dict, texts: list[GateText], plot: bool) -> str:
    c = report["config"]
    parts = [
        "# Gate activations per token (the paper's case-study figure)\n",
        f"Checkpoint `{c['ckpt']}` (step {c['step']}), tokenizer `{c['tokenizer']}`, "
        f"{c['branches']} branch(es) (the value shown is their mean); {len(texts)} text(s), "
        f"{sum(len(t.ids) for t in texts)} tokens; machine {report['machine']['processor']}, "
        f"commit {report['machine']['commit']}; {report['seconds']:.1f} s.\n",
        "Open `gates.html` in a browser: every token coloured by its gate, the value on hover.\n",
    ]
    for layer in report["layers"]:
        s = report["summary"][str(layer)]
        parts.append(f"## Engram layer {layer}\n")
        line = f"Mean gate {s['mean']:.4f} (range {s['min']:.4f} - {s['max']:.4f})"
        if s["mean_continuing"] is not None and s["mean_initial"] is not None:
            line += (
                f"; word-continuing tokens {s['mean_continuing']:.4f} "
                f"({s['continuing_tokens']} tokens) vs the others {s['mean_initial']:.4f}"
            )
        parts.append(line + ".\n")
        headers = ["gate", "token", "preceding text", "text"]
        parts.append("Most gated in:\n\n" + markdown_table(headers, _ranked(texts, layer, True)))
        parts.append(
            "\nLeast gated in:\n\n" + markdown_table(headers, _ranked(texts, layer, False)) + "\n"
        )
    if plot:
        parts.append("![gate heat map](gates.png)\n")
    return "\n".join(parts)


__all__ = [
    "DEFAULT_TEXTS",
    "GatesConfig",
    "capture_gates",
    "gate_texts",
    "read_texts",
    "run_gates",
    "summarise",
    "token_pieces",
]
