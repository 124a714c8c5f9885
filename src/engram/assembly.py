"""Assembly: the tokenizer, hash spec and model a config describes, where they run, their score.

The one place that turns configs into objects. The trainer, loading a trained run, the Hugging
Face export and the studies all build through here, so a model is assembled the same way
wherever it is used:

    config.tokenizer, config.data --get_tokenizer--> Tokenizer   (a BPE is trained once, cached)
    ModelConfig, Tokenizer        --build_model-->   EngramLM, HashSpec
                                                     (the spec resolved against the tokenizer; the
                                                      model owns its hasher and Engram layers)

    model, TablePlan              --place_tables-->  PlacedTables (where each table lives, how
                                                     its rows train), applied after building
                                                     under `lazy_tables()`, so that no table is
                                                     allocated before the plan decides

Model code never names a device (it follows its parameters and inputs); `pick_device`,
`autocast_for` and `to_device` are for the code that decides placement. `evaluate` scores a
model the same way for the trainer's validation, `engram eval` and the studies: window i of the
validation tokens is tokens[i*T : i*T+T+1], a fresh context at each, so every model is scored on
the same next-token predictions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engram.config import BaseConfig, TrainConfig
from engram.data import documents, eval_batches, source_fingerprint
from engram.hashing import NgramHasher
from engram.model import EngramLM, ModelConfig
from engram.parallel import World, sum_over_ranks
from engram.spec import HashSpec, resolve
from engram.tables.placed import PlacedTables
from engram.tables.plan import TablePlan
from engram.tables.sharded import ShardGroup
from engram.tokenizer import Tokenizer, load_tokenizer, train_bpe
from engram.vocab import cache_dir, compress


def get_tokenizer(name: str, data: str) -> Tokenizer:
    """`bpe:N` trains (once, cached by data fingerprint) a byte-level BPE; else `load_tokenizer`."""
    if not name.startswith("bpe:"):
        return load_tokenizer(name)
    try:
        size = int(name[4:])
    except ValueError:
        raise ValueError(f"tokenizer {name!r}: expected bpe:VOCAB_SIZE, e.g. bpe:8192") from None
    key = hashlib.sha256(f"{data}:{source_fingerprint(data)}:{size}".encode()).hexdigest()[:24]
    path = cache_dir() / "tokenizers" / f"bpe-{key}.json"
    if path.is_file():
        return load_tokenizer(path)
    tok = train_bpe(documents(data, "train"), vocab_size=size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tok.save(tmp)
    tmp.replace(path)
    return load_tokenizer(path)


def build_model(
    config: ModelConfig, tok: Tokenizer, tokenizer_path: str, base: BaseConfig | None = None
) -> tuple[EngramLM, HashSpec | None]:
    """The model for `tok`, with its spec resolved against it (spec.tokenizer = tokenizer_path):
    our own LM, or with `base.path` the pretrained Hugging Face decoder there with Engram
    attached (`engram.hf.backbone`; `config` then contributes only its Engram settings)."""
    hf = base is not None and bool(base.path)
    if hf:
        from engram.hf.backbone import base_model_config  # transformers: an optional extra

        config = base_model_config(base, config, tok.vocab_size)
    config = config.with_(vocab_size=tok.vocab_size)
    spec, hasher = None, None
    if config.engram is not None:
        spec_cfg = replace(config.engram.spec, tokenizer=tokenizer_path)
        if spec_cfg.pad_id is None or spec_cfg.pad_id >= tok.vocab_size:
            spec_cfg = replace(
                spec_cfg, pad_id=tok.pad_id if tok.pad_id is not None else tok.eos_id
            )
        config = config.with_(engram=replace(config.engram, spec=spec_cfg))
        vocab = compress(tok, enabled=spec_cfg.compress)
        spec = resolve(spec_cfg, tokenizer=tok, vocab=vocab)
        hasher = NgramHasher(spec, vocab)
    if hf:
        from engram.hf.backbone import HFEngramLM

        return HFEngramLM.build(base, config, spec, hasher, tok), spec
    return EngramLM(config, spec, hasher), spec


def model_tokenizer(config: TrainConfig) -> Tokenizer:
    """The run's tokenizer: a pretrained backbone's own, else `get_tokenizer`."""
    if config.base.path:
        folder = Path(config.base.path)
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"base.path={config.base.path!r} is not a model folder (no config.json)"
            )
        if not (folder / "tokenizer.json").is_file():
            raise ValueError(f"base.path={config.base.path!r} holds no tokenizer.json")
        return load_tokenizer(folder)
    return get_tokenizer(config.tokenizer, config.data)


def place_tables(
    model: EngramLM,
    config: TrainConfig,
    folder: str | Path,
    device: torch.device,
    plan: TablePlan | None = None,
    read_only: bool = False,
    sharding: ShardGroup | None = None,
    stores: Collection[str] = (),
) -> PlacedTables:
    """Apply a run's table plan (default `config.tables`) to `model`, built under `lazy_tables()`:
    embedded tables are allocated in the model, the others in row stores with row optimisers
    (betas from `config.optim`); disk tables live in `folder`, made anew (a resumed run restores
    a checkpoint's rows into them); `read_only`: `folder` is a checkpoint's, served in place;
    `sharding`: this rank keeps only its range of every table's rows (`engram.tables.sharded`);
    `stores`: tables kept in row stores even where the plan embeds them."""
    return PlacedTables(
        model.engram_layers,
        config.tables if plan is None else plan,
        folder,
        device,
        betas=(config.optim.beta1, config.optim.beta2),
        read_only=read_only,
        sharding=sharding,
        stores=stores,
    )


# ---- where it runs ---------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    """`auto` (CUDA when present, else the CPU) or a torch device name this machine has.

    A name is user input: one torch cannot parse, or a device this build or machine lacks, is a
    ValueError here rather than an AssertionError or RuntimeError deep inside the first `.to()`.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"unknown device {name!r}: expected auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but this torch build has no CUDA device")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r} asked for, but there are {count} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} asked for, but MPS is not available here")
    return device


# Dense bf16 peaks from the vendors' datasheets (no sparsity), matched in order against the CUDA
# device's name: the denominators of MFU. Others: set TrainConfig.peak_tflops.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10", 125e12),
)


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """The device's peak FLOP/s for MFU: `override_tflops` if set, a known CUDA device's dense
    bf16 peak, else None (a CPU has no agreed peak: MFU is not reported)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def autocast_for(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast for `precision` bf16, or auto on CUDA; otherwise fp32 (no autocast)."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def to_device(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(ids, targets, rows) of a loader batch on `device`; rows None when the loader hashed none."""
    rows = (
        {k: v.to(device, non_blocking=True) for k, v in batch.rows.items()}
        if batch.rows is not None
        else None
    )
    return batch.ids.to(device), batch.targets.to(device), rows


# ---- how it scores -----------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: EngramLM,
    tokens,
    config: TrainConfig,
    device: torch.device,
    engram_off: bool = False,
    world: World | None = None,
) -> float:
    """Mean cross-entropy (nats/token) over the first `eval_tokens` validation tokens.

    With several ranks (`world`), every rank scores its slice of each batch and the sums are
    added up: the same windows as one process, and every rank runs the same number of forwards
    (a rank whose slice of the last, short batch is empty scores one ignored row), as the
    collectives of a sharded model and its tables need.
    """
    world = world or World()
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in eval_batches(
        tokens, config.seq_len, config.batch_size, model.hasher, max_tokens=config.eval_tokens
    ):
        ids, targets, rows = to_device(_rank_rows(batch, world), device)
        with autocast_for(device, config.precision):
            logits = model(ids, rows=rows, engram_off=engram_off)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
        total += float(loss)
        count += int((targets != IGNORE).sum())
    model.train(was_training)
    total, count = sum_over_ranks([total, count], world, device)
    return total / count


IGNORE = -100  # cross_entropy's ignore_index


def _rank_rows(batch: Any, world: World) -> Any:
    """This rank's contiguous rows of `batch` (all of them in one process)."""
    if not world.distributed:
        return batch
    n = batch.ids.shape[0]
    lo, hi = world.rank * n // world.size, (world.rank + 1) * n // world.size
    if hi == lo:  # nothing left for this rank: one row, scored by no one
        part = replace(batch, ids=batch.ids[:1], targets=torch.full_like(batch.targets[:1], IGNORE))
        return replace(part, rows=_slice_rows(batch.rows, 0, 1))
    return replace(
        batch,
        ids=batch.ids[lo:hi],
        targets=batch.targets[lo:hi],
        rows=_slice_rows(batch.rows, lo, hi),
    )


def _slice_rows(rows: dict | None, lo: int, hi: int) -> dict | None:
    return None if rows is None else {k: v[lo:hi] for k, v in rows.items()}
