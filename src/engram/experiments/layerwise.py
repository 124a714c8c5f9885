"""Layer by layer through a trained pair: what the logit-lens and CKA studies share.

The paper's mechanism analysis compares an Engram model with its MoE baseline layer by
layer: how close each layer's early-exit prediction is to the final one (LogitLens), and which
baseline layer each Engram layer resembles (CKA). Both need the same pieces, kept here: loading
the two checkpoints (checked to read the same tokens), a self-contained tiny pair for `--quick`,
the residual stream after every block (captured by forward hooks, so the model code stays
untouched), the model's own readout of a stream, and the token positions analysed: every one, or
with `--tokens entity-final` also the last piece of each identifier and string literal (the
paper reads CKA on entity-final tokens; `token_kinds.entity_final_stream`).

The pair is two checkpoints (`--ckpt`, `--baseline`), or trained here (`--preset P`): P's MoE
baseline and the iso-parameter Engram arm the demo plans from it (rho = 0.8), per seed, with the
demo's budget, into `--models`; finished runs of identical configs are reused, so the two
studies share the pairs they train. With several seeds each study averages its per-layer results
over the pairs and reports every seed's as well.

Representations are numbered 0..n_layers: 0 is the stream entering block 0 (the embedding),
i >= 1 the stream after block i-1, i.e. after i blocks; so the last one is what the head reads.

Legend: B batch, T time, M residual branches, d width, V vocabulary.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram.assembly import get_tokenizer
from engram.config import TrainConfig
from engram.data import build_shard, eval_batches
from engram.experiments.arms import (
    STUDY_TRAIN,
    Study,
    add_baseline_argument,
    add_set_argument,
    arm_config,
    train_arm,
    train_runs,
)
from engram.experiments.demo import demo_arms  # the demo's own iso-parameter planning
from engram.experiments.report import parse_list
from engram.experiments.token_kinds import entity_final_stream, piece_texts
from engram.inference.load import Trained, load_trained
from engram.model import EngramLM, model_preset
from engram.model.accounting import count_params_from_config

# `--quick` without checkpoints: two tiny models (the `tiny` preset with and without Engram; M = 2
# branches, so the hyper-connection readout is exercised) trained for seconds on the same tokens.
QUICK_TRAIN: TrainConfig = replace(
    STUDY_TRAIN, steps=12, seq_len=64, batch_size=8, eval_tokens=4096, tokenizer="bpe:1024"
)
QUICK_TOKENS = 4096  # validation tokens analysed by `--quick`
FULL_RUN = "runs/demo-2seeds/seed-0"  # the documented full run: its `engram` and `moe` arms
# `--preset`: the demo's arms (the same template as its committed runs' 300 steps of 16 x 256
# tokens, evaluated once at the end) at the demo's Engram share.
PAIR_TRAIN: TrainConfig = STUDY_TRAIN
PAIR_RHO = 0.8
TOKEN_SELECTIONS = ("all", "entity-final")


def describe(trained: Trained, path: str | Path) -> dict[str, Any]:
    """What the report says about one model of the pair (`path`: as the user named it)."""
    c, manifest = trained.config.model, trained.manifest
    counts = count_params_from_config(c, trained.spec)
    return {
        "path": str(path),
        "step": manifest["step"],
        "tokens_trained": manifest.get("tokens_seen"),
        "n_layers": c.n_layers,
        "d_model": c.d_model,
        "hc_branches": c.hc_branches,
        "engram_layers": list(trained.spec.layer_ids) if trained.spec else [],
        "routed_experts": c.moe.num_routed if c.moe else 0,
        "p_tot": counts.p_tot,
        "p_act": counts.p_act,
        "table_params": counts.engram_tables,
    }


@dataclass(frozen=True)
class Pair:
    """Model A (Engram) and model B (the baseline), read on the same validation tokens."""

    engram: Trained
    baseline: Trained
    data: str
    seq_len: int
    batch_size: int
    paths: tuple[str, str] = ("", "")  # (engram, baseline) as the user named them
    seed: int | None = None  # the training seed, when the study trained the pair (`--preset`)

    def val_tokens(self) -> np.ndarray:
        return build_shard(self.data, "val", self.engram.tokenizer).tokens

    def describe(self, arm: str) -> dict[str, Any]:
        """The report's entry for `arm` ("engram" or "baseline")."""
        return describe(getattr(self, arm), self.paths[arm == "baseline"])


def load_pair(
    ckpt: str | Path, baseline: str | Path, data: str | None = None, device: str = "auto"
) -> Pair:
    """Both checkpoints; ValueError unless they share a tokenizer (the same tokens feed both)."""
    a, b = (load_trained(path, device=device) for path in (ckpt, baseline))
    if a.tokenizer.fingerprint != b.tokenizer.fingerprint:
        raise ValueError(
            f"--ckpt {ckpt} and --baseline-ckpt {baseline} were trained with different tokenizers: "
            "a layer-by-layer comparison needs the same tokens in both models"
        )
    # Windows no longer than either model's context; A's batch shape, as A was evaluated.
    seq_len = min(a.config.seq_len, a.config.model.max_seq_len, b.config.model.max_seq_len)
    paths = (str(ckpt), str(baseline))
    return Pair(a, b, data or a.config.data, seq_len, a.config.batch_size, paths)


def train_quick_pair(out: Path, data: str) -> tuple[Path, Path]:
    """Train (or reuse, if finished with the same config) the tiny pair under `out`/models."""
    get_tokenizer(QUICK_TRAIN.tokenizer, data)
    base = model_preset("tiny")
    paths = (out / "models" / "engram", out / "models" / "baseline")
    template = replace(QUICK_TRAIN, data=data)
    for path, model in zip(paths, (base, base.with_(engram=None)), strict=True):
        train_arm(arm_config(template, model, seed=0, out=path))
    return paths


def train_preset_pairs(
    preset: str,
    seeds: tuple[int, ...],
    template: TrainConfig,
    models: Path,
    overrides: tuple[str, ...] = (),
    baseline: str = "",
) -> list[tuple[int, Path, Path]]:
    """Per seed: (seed, Engram run, MoE run) of `preset`'s demo arms under `models`/seed-N,
    trained or, where finished with the same config, reused. `overrides`: `--set` for both;
    `baseline`: a granularity study's report, whose MoE replaces the preset's."""
    study = Study(
        train=template, seeds=seeds, preset=preset, overrides=overrides, baseline=baseline
    )
    arms, _ = demo_arms(study.base_model(), PAIR_RHO)  # an unknown preset fails here, first
    get_tokenizer(template.tokenizer, template.data)  # built once, before the arms' clocks
    train_runs(
        study, {"moe": arms["moe"], "engram": arms["engram"]}, lambda s: models / f"seed-{s}"
    )
    return [(s, models / f"seed-{s}" / "engram", models / f"seed-{s}" / "moe") for s in seeds]


def add_pair_arguments(p: argparse.ArgumentParser, study: str, full_tokens: int) -> None:
    """The options both studies take."""
    p.add_argument("--ckpt", help=f"the Engram run (e.g. {FULL_RUN}/engram)")
    p.add_argument("--baseline-ckpt", help=f"the baseline run (e.g. {FULL_RUN}/moe)")
    p.add_argument(
        "--max-tokens",
        type=int,
        help=f"validation tokens analysed (default {full_tokens:,}; --quick {QUICK_TOKENS:,})",
    )
    p.add_argument(
        "--tokens",
        choices=TOKEN_SELECTIONS,
        default="all",
        help="positions analysed: all (default), or entity-final (the last piece of each "
        "identifier and string literal, as the paper) reported beside all",
    )
    p.add_argument(
        "--data",
        help="text source (default: the Engram checkpoint's; with --preset, also what the pair "
        "trains on, default the stdlib corpus)",
    )
    p.add_argument("--out", help=f"report folder (default runs/{study}[-quick])")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--quick",
        action="store_true",
        help="few tokens; without --ckpt, first trains two tiny models into OUT/models",
    )
    p.add_argument(
        "--preset",
        help="train the pair instead (no --ckpt): the preset's MoE baseline and its "
        f"iso-parameter Engram arm (rho {PAIR_RHO}, as engram demo), e.g. demo-deep",
    )
    p.add_argument("--seeds", help="with --preset: a pair per seed, e.g. 0,1 (default 0)")
    p.add_argument(
        "--steps", type=int, help=f"with --preset: steps per arm (default {PAIR_TRAIN.steps})"
    )
    p.add_argument(
        "--models",
        help="with --preset: where the pairs are trained or reused (default "
        "runs/pairs/PRESET; --quick OUT/models)",
    )
    add_baseline_argument(p)  # with --preset: the strongest MoE, as the other studies take it
    add_set_argument(p)


def _check_pair_flags(args: argparse.Namespace) -> None:
    if (args.ckpt is None) != (args.baseline_ckpt is None):
        raise ValueError("give both --ckpt (the Engram run) and --baseline-ckpt, or neither")
    keys = ("seeds", "steps", "models", "set", "baseline")
    trains = [f"--{k}" for k in keys if getattr(args, k)]
    if args.preset is None and trains:
        raise ValueError(f"{', '.join(trains)}: only for a pair trained here; give --preset too")
    if args.preset is not None and args.ckpt is not None:
        raise ValueError("give --preset (train the pair) or --ckpt and --baseline-ckpt, not both")


def _preset_pairs(args: argparse.Namespace, out: Path) -> list[Pair]:
    seeds = parse_list(args.seeds, int, "seeds") if args.seeds else (0,)
    if not seeds:
        raise ValueError(f"--seeds {args.seeds!r} names no seed")
    template = QUICK_TRAIN if args.quick else PAIR_TRAIN
    template = replace(template, data=args.data or template.data)
    if args.steps is not None:
        template = replace(template, steps=args.steps)
    models = Path(args.models or (out / "models" if args.quick else default_models(args)))
    trained = train_preset_pairs(
        args.preset, seeds, template, models, tuple(args.set), args.baseline or ""
    )
    return [
        replace(load_pair(engram, moe, args.data, args.device), seed=seed)
        for seed, engram, moe in trained
    ]


def default_models(args: argparse.Namespace) -> str:
    """runs/pairs/PRESET, or runs/pairs/PRESET-REPORT with a granularity report's MoE (its
    folder's name), so that the two baselines' pairs never overwrite each other."""
    if not args.baseline:
        return f"runs/pairs/{args.preset}"
    report = Path(args.baseline)
    return (
        f"runs/pairs/{args.preset}-{(report if report.suffix != '.json' else report.parent).name}"
    )


def pairs_from_args(args: argparse.Namespace, out: Path) -> list[Pair]:
    """The pair the CLI names, the quick pair trained into `out` (only with --quick), or the
    preset's pairs, one per seed (`--preset`)."""
    _check_pair_flags(args)
    if args.preset is not None:
        return _preset_pairs(args, out)
    if args.ckpt is None:
        if not args.quick:
            raise ValueError(
                f"give --ckpt and --baseline-ckpt (e.g. --ckpt {FULL_RUN}/engram "
                f"--baseline-ckpt {FULL_RUN}/moe), --preset to train a pair, or --quick to "
                "train a tiny pair"
            )
        ckpt, baseline = train_quick_pair(out, args.data or "default")
        return [load_pair(ckpt, baseline, args.data, args.device)]
    return [load_pair(args.ckpt, args.baseline_ckpt, args.data, args.device)]


def max_tokens_from_args(args: argparse.Namespace, full_tokens: int) -> int:
    tokens = args.max_tokens
    if tokens is None:
        tokens = QUICK_TOKENS if args.quick else full_tokens
    if tokens < 2:
        raise ValueError(f"--max-tokens {tokens} must be >= 2")
    return tokens


def batches(pair: Pair, max_tokens: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(ids [B, T], targets [B, T]) over the first `max_tokens` validation tokens, in order.

    The windows of `evaluate` (fresh context at each window start). Each model hashes its own
    rows inside `forward`, exactly as `make_batch` would: the hasher sees one window at a time.
    """
    tokens = pair.val_tokens()
    if len(tokens) < pair.seq_len + 1:
        raise ValueError(
            f"the validation split of {pair.data!r} has {len(tokens)} tokens, fewer than one "
            f"window of {pair.seq_len + 1}"
        )
    for batch in eval_batches(tokens, pair.seq_len, pair.batch_size, None, max_tokens):
        yield batch.ids, batch.targets


def selections_of(tokens: str) -> tuple[str, ...]:
    """The selections a study measures for `--tokens`: always every position, then the one asked."""
    if tokens not in TOKEN_SELECTIONS:
        raise ValueError(f"--tokens {tokens!r} must be one of {list(TOKEN_SELECTIONS)}")
    return ("all",) if tokens == "all" else ("all", tokens)


def selection_masks(pair: Pair, max_tokens: int, selections: tuple[str, ...]) -> dict[str, Any]:
    """Per selection, whether each of the first `max_tokens` validation tokens is analysed [N]."""
    tokens = pair.val_tokens()
    n = min(max_tokens, len(tokens))
    masks = {}
    for name in selections:
        if name == "all":
            masks[name] = np.ones(n, dtype=bool)
            continue
        tok = pair.engram.tokenizer
        # Lexed to the end of the document the analysed tokens stop in: an entity running past
        # token n does not end at n - 1.
        later = np.flatnonzero(tokens[n:] == tok.eos_id) if tok.eos_id is not None else []
        stop = n + int(later[0]) if len(later) else len(tokens)
        masks[name] = entity_final_stream(tokens[:stop], piece_texts(tok), tok.eos_id)[:n]
    return masks


def selected_batches(
    pair: Pair, max_tokens: int, selections: tuple[str, ...]
) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
    """`batches`, each with a bool mask [B, T] per selection over its input positions."""
    masks = selection_masks(pair, max_tokens, selections)
    tokens, offset = pair.val_tokens(), 0
    for ids, targets in batches(pair, max_tokens):
        n = ids.numel()
        # The windows tile the stream in order (`eval_batches`): row-major ids are these tokens.
        assert np.array_equal(ids.flatten().numpy(), tokens[offset : offset + n])
        yield (
            ids,
            targets,
            {k: torch.from_numpy(m[offset : offset + n]).view(ids.shape) for k, m in masks.items()},
        )
        offset += n


def mean_over_pairs(results: list[Any]) -> Any:
    """The element-wise mean of equally shaped results (dicts, lists, numbers) of several pairs;
    values equal in all (layer indices, token counts) and non-numbers are kept as they are."""
    first = results[0]
    if isinstance(first, dict):
        return {key: mean_over_pairs([r[key] for r in results]) for key in first}
    if isinstance(first, list):
        return [mean_over_pairs(list(v)) for v in zip(*results, strict=True)]
    numeric = isinstance(first, int | float) and not isinstance(first, bool)
    if not numeric or all(r == first for r in results):
        return first
    return sum(results) / len(results)


@contextmanager
def streams_of(model: EngramLM) -> Iterator[list[torch.Tensor]]:
    """While open, each forward fills the list with its n_layers + 1 streams [B, T, M, d].

    Stream 0 is what enters block 0 (the embedding, copied into every branch, plus whatever the
    model adds before the blocks), so it is taken by a pre-hook rather than from `model.embed`.
    """
    captured: list[torch.Tensor] = []

    def branches(stream: torch.Tensor | tuple) -> torch.Tensor:
        # A Hugging Face decoder layer's stream: [B, T, d] (some return a tuple), one branch.
        stream = stream[0] if isinstance(stream, tuple) else stream
        return stream.unsqueeze(-2) if stream.ndim == 3 else stream

    def on_first(_module, args) -> None:
        captured.clear()  # a new forward pass
        captured.append(branches(args[0]))

    def on_block(_module, _args, output: torch.Tensor) -> None:
        captured.append(branches(output))

    # Prepended: stream 0 is what reaches block 0 before anything attached to it (an Engram).
    handles = [model.blocks[0].register_forward_pre_hook(on_first, prepend=True)]
    handles += [block.register_forward_hook(on_block) for block in model.blocks]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def forward_with_streams(
    model: EngramLM, ids: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The model's logits [B, T, V] and its n_layers + 1 residual streams (no autocast)."""
    device = next(model.parameters()).device
    with streams_of(model) as streams:
        logits = model(ids.to(device))
    if len(streams) != model.config.n_layers + 1:
        raise RuntimeError(
            f"captured {len(streams)} streams for {model.config.n_layers} blocks: the model's "
            "forward no longer runs every block once"
        )
    return logits, list(streams)


def combined(stream: torch.Tensor) -> torch.Tensor:
    """The single stream [..., d] the model's head reads from branches [..., M, d].

    The mean over branches, as `EngramLM.readout`; `test_logit_lens` checks that the readout of
    the last stream reproduces the model's logits, so a change there shows.
    """
    return stream.mean(dim=-2)


def readout(model: EngramLM, stream: torch.Tensor) -> torch.Tensor:
    """Early-exit logits [..., V] of a stream [..., M, d]: final norm and head, as the model."""
    return model.readout(stream)


__all__ = [
    "FULL_RUN",
    "PAIR_RHO",
    "PAIR_TRAIN",
    "QUICK_TOKENS",
    "QUICK_TRAIN",
    "TOKEN_SELECTIONS",
    "Pair",
    "add_pair_arguments",
    "batches",
    "combined",
    "describe",
    "forward_with_streams",
    "load_pair",
    "max_tokens_from_args",
    "mean_over_pairs",
    "pairs_from_args",
    "readout",
    "selected_batches",
    "selection_masks",
    "selections_of",
    "streams_of",
    "train_preset_pairs",
    "train_quick_pair",
]
