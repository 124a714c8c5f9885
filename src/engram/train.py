"""Training and evaluation of the Engram LM: one readable loop, exact resume, honest metrics.

`train(config)` builds (or loads) the tokenizer, the token shards, the hash spec and the model,
then runs warm-up + decay, gradient clipping, periodic validation on the same tokens for every
model, JSONL metrics, a progress bar (loss, tokens/s, ETA) and atomic checkpoints. With
`resume=True` it continues from the run's latest checkpoint exactly where it stopped: same
weights, optimiser moments, balancing biases, RNG and data position.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from engram.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
    set_rng_state,
)
from engram.config_io import to_dict
from engram.data import PackedLoader, build_shard, documents, eval_batches
from engram.hashing import NgramHasher
from engram.model import EngramLM, ModelConfig, model_preset
from engram.module import lazy_tables
from engram.optim import OptimConfig, Optimizers, lr_factor
from engram.spec import HashSpec, resolve
from engram.tables.placed import PlacedTables
from engram.tables.plan import TablePlan
from engram.tokenizer import Tokenizer, load_tokenizer, train_bpe
from engram.vocab import cache_dir, compress


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=lambda: model_preset("tiny"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    tables: TablePlan = field(default_factory=TablePlan)  # where each Engram table lives
    tokenizer: str = "bpe:2048"  # "bpe:N" trains a byte-level BPE on the train split
    data: str = "default"
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 100
    eval_every: int = 50
    eval_tokens: int = 32768  # validation tokens, the same for every model
    log_every: int = 10
    ckpt_every: int = 0  # 0: only at the end
    seed: int = 0
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16", "fp32"
    device: str = "auto"
    out_dir: str = "runs/train"
    progress: bool = True

    def validate(self) -> None:
        for name in ("seq_len", "batch_size", "steps", "eval_every", "log_every", "eval_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision={self.precision!r} must be auto, bf16 or fp32")
        if self.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"seq_len={self.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
            )
        self.model.validate()
        self.optim.validate()
        self.tables.validate()


# ---- building blocks -----------------------------------------------------------------------------
def get_tokenizer(name: str, data: str) -> Tokenizer:
    """`bpe:N` trains (once, cached by data fingerprint) a byte-level BPE; else `load_tokenizer`."""
    if not name.startswith("bpe:"):
        return load_tokenizer(name)
    from engram.data import source_fingerprint

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
    config: ModelConfig, tok: Tokenizer, tokenizer_path: str
) -> tuple[EngramLM, HashSpec | None]:
    """The model for `tok`, with its spec resolved against it (spec.tokenizer = tokenizer_path)."""
    config = config.with_(vocab_size=tok.vocab_size)
    if config.engram is None:
        return EngramLM(config), None
    spec_cfg = replace(config.engram.spec, tokenizer=tokenizer_path)
    if spec_cfg.pad_id is None or spec_cfg.pad_id >= tok.vocab_size:
        spec_cfg = replace(spec_cfg, pad_id=tok.pad_id if tok.pad_id is not None else tok.eos_id)
    config = config.with_(engram=replace(config.engram, spec=spec_cfg))
    vocab = compress(tok, enabled=spec_cfg.compress)
    spec = resolve(spec_cfg, tokenizer=tok, vocab=vocab)
    return EngramLM(config, spec, NgramHasher(spec, vocab)), spec


def _has_checkpoint(run_dir: Path) -> bool:
    try:
        find_checkpoint(run_dir)
    except ValueError:
        return False
    return True


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device, precision: str):
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def to_device(batch, device: torch.device):
    rows = (
        {k: v.to(device, non_blocking=True) for k, v in batch.rows.items()}
        if batch.rows is not None
        else None
    )
    return batch.ids.to(device), batch.targets.to(device), rows


@torch.no_grad()
def evaluate(
    model: EngramLM, tokens, config: TrainConfig, device: torch.device, engram_off: bool = False
) -> float:
    """Mean cross-entropy (nats/token) over the first `eval_tokens` validation tokens."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in eval_batches(
        tokens, config.seq_len, config.batch_size, model.hasher, max_tokens=config.eval_tokens
    ):
        ids, targets, rows = to_device(batch, device)
        with autocast_for(device, config.precision):
            logits = model(ids, rows=rows, engram_off=engram_off)
        loss = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), reduction="sum"
        )
        total += float(loss)
        count += targets.numel()
    model.train(was_training)
    return total / count


def _tensorboard_writer(run_dir: Path):
    """A TensorBoard writer when `tensorboard` is installed (an optional extra), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


# ---- the loop ------------------------------------------------------------------------------------
class Run:
    """Everything one training run holds; `train()` drives it."""

    def __init__(self, config: TrainConfig, resume: bool = False) -> None:
        config.validate()
        self.config, self.dir = config, Path(config.out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.device = pick_device(config.device)
        torch.manual_seed(config.seed)
        tok = get_tokenizer(config.tokenizer, config.data)
        tok.save(self.dir / "tokenizer.json")
        self.tokenizer = tok
        # The spec names the run's own tokenizer file relative to the run folder, so a run can
        # be moved or copied and still resume (its fingerprint is what identifies it).
        with lazy_tables():  # the plan decides where each table is allocated
            self.model, self.spec = build_model(config.model, tok, "tokenizer.json")
        self.tables = PlacedTables(
            self.model,
            config.tables,
            self.dir / "tables",
            self.device,
            betas=(config.optim.beta1, config.optim.beta2),
            # A live disk table is reused only to be overwritten by a checkpoint's: without one
            # (a run that died before its first save), the table starts fresh.
            fresh=not (resume and _has_checkpoint(self.dir)),
        )
        self.model.to(self.device)
        # On an accelerator, host and disk tables copy a forward's rows while earlier layers run.
        self.tables.fetch_ahead(self.model, training=True)
        self.optim = Optimizers(self.model, config.optim, self.tables)
        self.train_tokens = build_shard(config.data, "train", tok).tokens
        self.val_tokens = build_shard(config.data, "val", tok).tokens
        if len(self.val_tokens) < config.seq_len + 1:  # fail now, not at the first evaluation
            raise ValueError(
                f"the validation split of {config.data!r} has "
                f"{len(self.val_tokens)} tokens, fewer than one window of "
                f"seq_len+1={config.seq_len + 1}"
            )
        self.loader = PackedLoader(
            self.train_tokens,
            config.seq_len,
            config.batch_size,
            self.model.hasher,
            seed=config.seed,
        )
        self.step, self.tokens_seen, self.curve = 0, 0, []
        self.last_batch = None  # the last batch trained on: the loader may have read ahead
        self.grad_norm, self.routing = 0.0, {}
        self.tensorboard = _tensorboard_writer(self.dir)
        if resume:
            self._resume()
        self._write_run_files()

    @property
    def label(self) -> str:
        """How the progress bar names this run."""
        return Path(self.config.out_dir).name

    @property
    def resolved(self) -> dict[str, Any]:
        return to_dict(replace(self.config, model=self.model.config))

    def _write_run_files(self) -> None:
        (self.dir / "config.json").write_text(json.dumps(self.resolved, indent=2))
        if self.spec is not None:
            (self.dir / "spec.json").write_text(self.spec.to_json(indent=2))

    def _manifest(self) -> dict[str, Any]:
        return {
            "config": self.resolved,
            "spec": self.spec.to_dict() if self.spec else None,
            "tokenizer_fingerprint": self.tokenizer.fingerprint,
            "loader": self.loader.state_dict(after=self.last_batch),
            "tokens_seen": self.tokens_seen,
            "curve": self.curve,
        }

    def _resume(self) -> None:
        if not _has_checkpoint(self.dir):
            return  # nothing to resume: a fresh run
        manifest = read_manifest(self.dir)  # check compatibility before touching any weights
        if manifest["tokenizer_fingerprint"] != self.tokenizer.fingerprint:
            raise ValueError("the checkpoint was trained with another tokenizer")
        if self.spec is not None and manifest["spec"] != self.spec.to_dict():
            raise ValueError("the checkpoint's hash spec differs from this run's")
        if manifest["config"]["model"] != to_dict(self.model.config):
            raise ValueError("the checkpoint's model config differs from this run's")
        load_checkpoint(manifest["path"], self.model, self.optim.named)
        if self.tables:
            self.tables.restore(Path(manifest["path"]) / "tables", manifest["tables"])
        self.loader.load_state_dict(manifest["loader"])
        set_rng_state(manifest["rng"])
        self.step, self.tokens_seen = manifest["step"], manifest["tokens_seen"]
        self.curve = [tuple(p) for p in manifest["curve"]]

    def save(self) -> Path:
        attachments = {"tables": self.tables.write} if self.tables else None
        return save_checkpoint(
            self.dir / "checkpoints",
            self.step,
            self.model,
            self.optim.named,
            self._manifest(),
            attachments=attachments,
        )

    def table_stats(self) -> dict[str, float]:
        """Hit rates and bytes moved of the placed tables since the last call (for the log)."""
        out = {}
        for name, stats in self.tables.stats().items():
            keys = ("bytes_read", "bytes_written") + (("hit_rate",) if stats["misses"] else ())
            out.update({f"{name}_{key}": stats[key] for key in keys})
        self.tables.reset_stats()
        return out

    def close(self) -> None:
        self.loader.close()
        self.tables.close()

    def train_step(self, batch) -> float:
        ids, targets, rows = to_device(batch, self.device)
        self.optim.set_lr(lr_factor(self.step, self.config.steps, self.config.optim))
        with autocast_for(self.device, self.config.precision):
            _, loss = self.model(ids, rows=rows, targets=targets)
        loss.backward()
        self.grad_norm = self.optim.step()
        self.routing = self.model.update_route_biases()  # worst layer's max/min expert load
        self.step += 1
        self.tokens_seen += ids.numel()
        self.last_batch = batch
        return float(loss.detach())

    def log(self, record: dict[str, Any]) -> None:
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def transform(self, batch):
        """The batch as trained on; a subclass may change it (e.g. the table controls' rows)."""
        return batch

    def evaluate_val(self) -> float:
        """Validation loss of the model now; a subclass may evaluate differently."""
        return evaluate(self.model, self.val_tokens, self.config, self.device)

    def validate_now(self) -> float:
        val = self.evaluate_val()
        self.curve.append((self.tokens_seen, val))
        self.log(
            {
                "step": self.step,
                "tokens": self.tokens_seen,
                "val_loss": val,
                "val_ppl": math.exp(val),
            }
        )
        return val


def train(config: TrainConfig, resume: bool = False, run: Run | None = None) -> dict[str, Any]:
    """Train to `config.steps`; returns a summary (tokens, val loss, tokens/s, curve).

    `run`: a prepared `Run` (e.g. a subclass that transforms batches) instead of
    `Run(config, resume)`; `config` must be its config.
    """
    run = Run(config, resume=resume) if run is None else run
    c = config
    bar = tqdm(
        total=c.steps,
        initial=run.step,
        disable=not c.progress,
        file=sys.stderr,
        desc=run.label,
        dynamic_ncols=True,
        mininterval=2.0,  # keeps logs of non-interactive runs short
    )
    start, start_tokens, losses = time.perf_counter(), run.tokens_seen, []
    # Cached tables pin batch n+1's rows in the background while step n computes.
    it = run.tables.prefetched(run.loader)
    try:
        while run.step < c.steps:
            batch, pins = next(it)
            losses.append(run.train_step(run.transform(batch)))
            run.tables.release(pins)
            tps = (run.tokens_seen - start_tokens) / max(1e-9, time.perf_counter() - start)
            if run.step % c.log_every == 0 or run.step == c.steps:
                loss = sum(losses) / len(losses)
                run.log(
                    {
                        "step": run.step,
                        "tokens": run.tokens_seen,
                        "loss": loss,
                        "lr": run.optim.lr,
                        "grad_norm": run.grad_norm,
                        "tokens_per_s": tps,
                        **{f"moe_{k}": v for k, v in run.routing.items()},
                        **run.table_stats(),
                    }
                )
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
                losses = []
            if run.step % c.eval_every == 0 and run.step < c.steps:
                bar.set_postfix(val=f"{run.validate_now():.3f}", tok_s=f"{tps:,.0f}")
            if c.ckpt_every and run.step % c.ckpt_every == 0 and run.step < c.steps:
                run.save()
            bar.update(1)
        elapsed = time.perf_counter() - start
        val = (
            run.validate_now()
            if not run.curve or run.curve[-1][0] != run.tokens_seen
            else run.curve[-1][1]
        )
        run.save()
    finally:
        bar.close()
        it.close()
        run.close()
    tokens = run.tokens_seen - start_tokens
    return {
        "out_dir": str(run.dir),
        "steps": run.step,
        "tokens": run.tokens_seen,
        "val_loss": val,
        "val_ppl": math.exp(val),
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        # The thread count changes float reduction order, hence the last bits of every loss.
        "torch_threads": torch.get_num_threads(),
        "curve": [list(p) for p in run.curve],
    }


def load_trained(
    path: str | Path, device: str = "auto"
) -> tuple[EngramLM, Tokenizer, TrainConfig, dict[str, Any]]:
    """A trained model from a run folder or checkpoint, checked against its manifest.

    Tables the run held outside the model (its `tables` plan) are placed the same way and
    restored from the checkpoint; disk tables are the checkpoint's own files, mapped read-only
    (nothing is copied, and the run's files are never written).
    """
    from engram.config_io import from_dict

    manifest = read_manifest(path)
    ckpt = Path(manifest["path"])
    tok_path = ckpt.parent.parent / "tokenizer.json"
    if not tok_path.is_file():
        raise ValueError(f"no tokenizer.json in the run folder {ckpt.parent.parent}")
    tok = load_tokenizer(tok_path)
    if tok.fingerprint != manifest["tokenizer_fingerprint"]:
        raise ValueError(f"{tok_path} is not the tokenizer this checkpoint was trained with")
    config = from_dict(TrainConfig, manifest["config"])
    spec_tokenizer = (manifest["spec"] or {}).get("tokenizer", str(tok_path))
    # Seeded as the run was, so that each table's init (which untouched rows of a placed table
    # read as) is the run's; the caller's RNG is left as it was.
    with torch.random.fork_rng(devices=[]), lazy_tables():
        torch.manual_seed(config.seed)
        model, spec = build_model(config.model, tok, spec_tokenizer)
    if spec is not None and spec.to_dict() != manifest["spec"]:
        raise ValueError("the checkpoint's hash spec does not match what its config derives")
    target = pick_device(device)
    tables = _placed_for_inference(model, config, target, ckpt / "tables")
    load_checkpoint(ckpt, model)
    if tables:
        if "tables" not in manifest:
            raise ValueError(f"checkpoint {ckpt} has no tables/ for its placed Engram tables")
        tables.restore(ckpt / "tables", manifest["tables"])
    model.to(target).eval()
    return model, tok, config, manifest


def _placed_for_inference(
    model: EngramLM, config: TrainConfig, device, folder: Path
) -> PlacedTables:
    """The run's table plan; disk tables are the checkpoint's own files (`folder`), mapped
    read-only, and stay open as long as the model lives."""
    plan, betas = config.tables, (config.optim.beta1, config.optim.beta2)
    if plan.all_embedded:
        return PlacedTables(model, plan, ".", device, betas)
    plan = replace(plan, path="", layers=tuple(replace(e, path="") for e in plan.layers))
    tables = PlacedTables(model, plan, folder, device, betas, read_only=True)
    tables.fetch_ahead(model)  # a forward's rows are read before its layers run
    model.placed_tables = tables  # keeps the stores open as long as the model lives
    weakref.finalize(model, tables.close)
    return tables
