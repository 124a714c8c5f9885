"""Training and evaluation of the Engram LM: one readable loop, exact resume, honest metrics.

`train(config)` builds (or loads) the tokenizer, the token shards, the hash spec and the model,
then runs warm-up + decay, gradient clipping, periodic validation on the same tokens for every
model, JSONL metrics, a progress bar (loss, tokens/s, ETA) and atomic checkpoints. With
`resume=True` it continues from the run's latest checkpoint exactly where it stopped: same
weights, optimiser moments, balancing biases, RNG and data position.

Launched by torchrun, the same code runs on every rank (`engram.parallel`): each rank trains on
its slice of every global batch (`batch_size` is the global batch), the backbone is made
data-parallel from the config's plan (`parallel.dense`), each table is sharded by rows over the
ranks, and rank 0 alone logs, shows progress and writes the run's files; checkpoints are
written by all ranks together and resume at any world size.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from engram.assembly import (
    autocast_for,
    build_model,
    evaluate,
    model_tokenizer,
    peak_flops,
    pick_device,
    place_tables,
    to_device,
)
from engram.checkpoint import (
    BASE,
    LATEST,
    base_entry,
    embedded_rows,
    load_checkpoint,
    load_optimizers,
    read_manifest,
    save_checkpoint,
    saved_weights,
    set_rng_state,
    verify_files,
)
from engram.config import TrainConfig, to_dict
from engram.data import Batch, PackedLoader, build_shard
from engram.data.sources import SPLITS
from engram.files import FolderLock, disk_full, fsync_dir, fsync_file, writable_dir
from engram.model.accounting import training_flops_per_token
from engram.module import lazy_tables
from engram.optim import Optimizers, lr_factor
from engram.parallel import (
    World,
    check_optimizer,
    close_world,
    init_world,
    mean_over_ranks,
    parallelize,
    sum_expert_loads,
    table_group,
)
from engram.tables.placed import table_name
from engram.tables.reshard import saved_entries
from engram.tables.sharded import TRAFFIC, ShardGroup


# ---- the run ------------------------------------------------------------------------------------
def _has_checkpoint(run_dir: Path) -> bool:
    # `latest` is the commit point (`engram.checkpoint.commit`): without it, a step folder is
    # one a crash left before its first commit, and the run starts afresh. With it, whatever it
    # names is resumed, or refused if it names nothing (`find_checkpoint`).
    return (run_dir / "checkpoints" / LATEST).exists()


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

    def __init__(self, config: TrainConfig, resume: bool = False, overwrite: bool = False) -> None:
        config.validate()
        self.config, self.dir = config, writable_dir(config.out_dir)
        self.world, self.device = init_world(pick_device(config.device), config.parallel)
        self.lock: FolderLock | None = None
        try:
            self._build(resume, overwrite)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            close_world(self.world)
            raise

    def _build(self, resume: bool, overwrite: bool) -> None:
        config, world = self.config, self.world
        local_batch = _local_batch(config, world)
        self.lock = FolderLock(self.dir) if world.main else None  # one run per folder
        if world.main:
            _claim(self.dir, resume, overwrite)
        torch.manual_seed(config.seed)
        manifest = self._build_model(resume)
        self.trainer = parallelize(self.model, world, config.parallel)  # what the step calls
        self.optim = Optimizers(self.model, config.optim)
        if config.compile:  # the same module, its forward compiled (graph breaks where Python is)
            self.trainer = _compiled(self.trainer, self.model)
        self._build_data(local_batch)
        self.step, self.tokens_seen, self.curve = 0, 0, []
        self.saved: tuple[int, Path] | None = None  # (step, folder) of the newest checkpoint
        self.last_batch = None  # the last batch trained on: the loader may have read ahead
        self.grad_norm, self.routing = 0.0, {}
        self.flops_per_token = training_flops_per_token(self.model.config, config.seq_len)
        self.peak_flops = peak_flops(self.device, config.peak_tflops)  # None: no MFU
        self.tensorboard = _tensorboard_writer(self.dir) if world.main else None
        if manifest is not None:
            self._resume(manifest)
            world.barrier()  # every rank has restored its rows: other worlds' files may go
            if world.main:
                self.tables.remove_stale()
        if world.main and resume:
            _trim_metrics(self.dir, self.step)
        if world.main:
            self._write_run_files()

    def _build_model(self, resume: bool) -> dict[str, Any] | None:
        """Tokenizer, model and placed tables, with the checkpoint's weights when resuming (as
        one process holds them, before a plan shards them); returns that checkpoint's manifest."""
        config, world = self.config, self.world
        with world.main_first():  # rank 0 trains (and caches) a BPE; the others read it
            tok = model_tokenizer(config)
        if world.main:
            tok.save(self.dir / "tokenizer.json")
        self.tokenizer = tok
        # The spec names the run's own tokenizer file relative to the run folder, so a run can
        # be moved or copied and still resume (its fingerprint is what identifies it).
        with lazy_tables():  # the plan decides where each table is allocated
            self.model, self.spec = build_model(config.model, tok, "tokenizer.json", config.base)
        manifest = self._compatible_checkpoint() if resume else None
        # A table the checkpoint saved from a row store (e.g. sharded by another world size)
        # stays in one.
        self.tables = place_tables(
            self.model,
            config,
            self.dir / "tables",
            self.device,
            sharding=self._sharding(),
            stores=saved_entries((manifest or {}).get("tables")),
        )
        self.model.to(self.device)
        # A pretrained backbone's frozen weights stay in its folder, not in every checkpoint.
        frozen = [name for name, p in self.model.named_parameters() if not p.requires_grad]
        self.base = None
        if config.base.path and frozen and world.main:
            self.base = base_entry(config.base.path, frozen)
        self.unembedded: dict[str, tuple[str, int]] = {}
        if manifest is not None:
            self.unembedded = self._embedded_in(manifest)
            elsewhere = {weight for weight, _ in self.unembedded.values()}
            load_checkpoint(manifest["path"], self.model, elsewhere=elsewhere, verify=False)
        return manifest

    def _build_data(self, local_batch: int) -> None:
        """The token shards and this rank's loader (`local_batch` windows of each global batch)."""
        config, world = self.config, self.world
        with world.main_first():  # rank 0 tokenizes (and caches) the shards
            shards = {split: build_shard(config.data, split, self.tokenizer) for split in SPLITS}
        self.train_tokens, self.val_tokens = shards["train"].tokens, shards["val"].tokens
        # What the run read, recorded with it: the source and its fingerprint (files, sizes,
        # versions), and each split's size.
        self.data = {"source": shards["train"].meta["source"]}
        self.data["fingerprint"] = shards["train"].meta["source_fingerprint"]
        for split, shard in shards.items():
            self.data[split] = {"documents": shard.n_docs, "tokens": shard.n_tokens}
        if len(self.val_tokens) < config.seq_len + 1:  # fail now, not at the first evaluation
            raise ValueError(
                f"the validation split of {config.data!r} has "
                f"{len(self.val_tokens)} tokens, fewer than one window of "
                f"seq_len+1={config.seq_len + 1}"
            )
        self.loader = PackedLoader(
            self.train_tokens,
            config.seq_len,
            local_batch,
            self.model.hasher,
            seed=config.seed,
            rank=world.rank,
            world=world.size,
        )

    def _sharding(self) -> ShardGroup | None:
        """With several ranks, every table is split by rows over them (1/world: each rank's loss
        is a mean over its slice, so the owner's summed row gradients average the ranks')."""
        world = self.world
        if not world.distributed:
            return None
        check_optimizer(self.config.parallel.dense, self.config.optim.backbone)
        group = table_group(world, self.device)
        return ShardGroup(world.rank, world.size, group, grad_scale=1.0 / world.size)

    @property
    def label(self) -> str:
        """How the progress bar names this run."""
        return Path(self.config.out_dir).name

    @property
    def resolved(self) -> dict[str, Any]:
        return to_dict(replace(self.config, model=self.model.config))

    def _write_run_files(self) -> None:
        (self.dir / "config.json").write_text(json.dumps(self.resolved, indent=2))
        (self.dir / "data.json").write_text(json.dumps(self.data, indent=2))
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
            "data": self.data,
            **({BASE: self.base} if self.base else {}),
        }

    def _compatible_checkpoint(self) -> dict[str, Any] | None:
        """The manifest of the checkpoint to resume from (None: nothing saved yet), checked
        against this run before any weight is touched."""
        if not _has_checkpoint(self.dir):
            return None  # nothing to resume: a fresh run
        manifest = read_manifest(self.dir)
        with self.world.main_first():  # every file of it, before any rank reads one
            if self.world.main:  # (one rank reads them all; the others wait for its verdict)
                verify_files(manifest)
        if manifest["tokenizer_fingerprint"] != self.tokenizer.fingerprint:
            raise ValueError("the checkpoint was trained with another tokenizer")
        if self.spec is not None and manifest["spec"] != self.spec.to_dict():
            raise ValueError("the checkpoint's hash spec differs from this run's")
        if manifest["config"]["model"] != to_dict(self.model.config):
            raise ValueError("the checkpoint's model config differs from this run's")
        return manifest

    def _embedded_in(self, manifest: dict[str, Any]) -> dict[str, tuple[str, int]]:
        """The tables the checkpoint holds inside its model (embeddings, trained by SparseAdam)
        that this run holds in row stores (e.g. shards): name -> (weight name, SparseAdam index,
        which counts the checkpoint's embedded tables in the model's order)."""
        weights, found, index = saved_weights(manifest["path"]), {}, 0
        module_names = {id(m): name for name, m in self.model.named_modules()}
        for memory in self.model.engram_layers:
            weight = f"{module_names[id(memory)]}.table.weight"
            if weight not in weights:
                continue
            name = table_name(memory.layer_id)
            if name in self.tables.tables:
                found[name] = (weight, index)
            index += 1
        return found

    def _resume(self, manifest: dict[str, Any]) -> None:
        """Everything but the weights (loaded before the plan was applied)."""
        optimizers = dict(self.optim.named)
        if self.unembedded and "tables" not in optimizers:  # SparseAdam's state goes to stores
            manifest = {**manifest, "optimizers": dict(manifest["optimizers"])}
            manifest["optimizers"].pop("tables", None)
        load_optimizers(manifest, optimizers)
        for name, (weight, index) in self.unembedded.items():
            self.tables.restore_rows(
                name, lambda lo, hi, w=weight, i=index: embedded_rows(manifest, w, i, lo, hi)
            )
        held = [name for name in self.tables.tables if name not in self.unembedded]
        if held:
            self.tables.restore(Path(manifest["path"]) / "tables", manifest["tables"], held)
        self.loader.load_state_dict(manifest["loader"])
        set_rng_state(manifest["rng"])
        self.step, self.tokens_seen = manifest["step"], manifest["tokens_seen"]
        self.curve = [tuple(p) for p in manifest["curve"]]
        self.saved = (self.step, Path(manifest["path"]))

    def save(self) -> Path:
        """Checkpoint the run now (a resumed run that had already finished has nothing new)."""
        if self.saved is not None and self.saved[0] == self.step:
            return self.saved[1]
        attachments = {"tables": self.tables.write} if self.tables else None
        path = save_checkpoint(
            self.dir / "checkpoints",
            self.step,
            self.model,
            self.optim.named,
            self._manifest(),
            attachments=attachments,
            distributed=self.world.distributed,
        )
        self.saved = (self.step, path)
        return path

    def table_stats(self) -> dict[str, float]:
        """Hit rates and bytes moved of the placed tables since the last call (for the log)."""
        out = {}
        for name, stats in self.tables.stats().items():
            keys = ("bytes_read", "bytes_written") + (("hit_rate",) if stats["misses"] else ())
            out.update({f"{name}_{key}": stats[key] for key in keys})
        self.tables.reset_stats()
        if self.world.distributed:  # rank 0's shards, and what its row exchange moved
            out.update(exchanged_sent=TRAFFIC.sent, exchanged_received=TRAFFIC.received)
            TRAFFIC.reset()
        return out

    def close(self) -> None:
        self.loader.close()
        self.tables.close()
        if self.lock is not None:
            self.lock.release()
        close_world(self.world)

    def train_step(self, batch: Batch) -> float:
        """One optimiser step on `batch`, whose rows the caller has pinned (`pin_ahead`)."""
        ids, targets, rows = to_device(batch, self.device)
        self.optim.set_lr(lr_factor(self.step, self.config.steps, self.config.optim))
        # Tables off the compute device start reading (and copying) this forward's rows now.
        self.tables.fetch(batch.rows)
        with autocast_for(self.device, self.config.precision):
            _, loss = self.trainer(ids, rows=rows, targets=targets)  # [B, T, V] logits, mean CE
        loss.backward()  # with several ranks: the backbone's gradients averaged over them
        sum_expert_loads(self.model, self.world)  # the global batch's expert loads, every rank
        self.grad_norm = self.optim.step()  # the backbone (clipped) and embedded tables
        self.tables.step(self.optim.table_lr)  # placed tables: only the rows this batch read
        self.routing = self.model.update_route_biases()  # worst layer's max/min expert load
        self.step += 1
        self.tokens_seen += ids.numel() * self.world.size
        self.last_batch = batch
        return float(loss.detach())

    def log(self, record: dict[str, Any]) -> None:
        if not self.world.main:
            return
        record = {**record, "world_size": self.world.size}
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def log_train(self, losses: list[float], tokens_per_s: float) -> float:
        """Log the mean training loss since the last log, with rate, norm, routing and tables.
        With several ranks: the mean over ranks (of equal slices), the global batch's loss."""
        loss = sum(mean_over_ranks(losses, self.world, self.device)) / len(losses)
        self.log(
            {
                "step": self.step,
                "tokens": self.tokens_seen,
                "loss": loss,
                "lr": self.optim.lr,
                "grad_norm": self.grad_norm,
                "tokens_per_s": tokens_per_s,
                **self.utilisation(tokens_per_s),
                **{f"moe_{k}": v for k, v in self.routing.items()},
                **self.table_stats(),
            }
        )
        return loss

    def utilisation(self, tokens_per_s: float) -> dict[str, float]:
        """Model FLOP/s at `tokens_per_s` (the global rate), and MFU (per device) where the
        device's peak is known (`engram.assembly.peak_flops`)."""
        flops = tokens_per_s * self.flops_per_token
        out = {"model_tflops_per_s": flops / 1e12}
        if self.peak_flops:
            out["mfu"] = flops / (self.peak_flops * self.world.size)
        return out

    def transform(self, batch: Batch) -> Batch:
        """The batch as trained on; a subclass may change it (e.g. the table controls' rows)."""
        return batch

    def evaluate_val(self) -> float:
        """Validation loss of the model now; a subclass may evaluate differently."""
        return evaluate(self.model, self.val_tokens, self.config, self.device, world=self.world)

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


def train(
    config: TrainConfig, resume: bool = False, run: Run | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Train to `config.steps`; returns a summary (tokens, val loss, tokens/s, curve).

    `resume`: continue the run in `config.out_dir` from its latest checkpoint. A folder that
    already holds a run is otherwise refused, unless `overwrite` (which deletes that run's
    metrics, checkpoints and tables first). `run`: a prepared `Run` (e.g. a subclass that
    transforms batches) instead of `Run(config, resume, overwrite)`; `config` must be its config.
    """
    run = Run(config, resume=resume, overwrite=overwrite) if run is None else run
    c = config
    bar = _progress(run)
    start, start_tokens, losses = time.perf_counter(), run.tokens_seen, []
    batches, ahead = iter(run.loader), None
    try:
        if run.step < c.steps:
            ahead = run.tables.pin_ahead(next(batches))
        while run.step < c.steps:
            batch, pins = ahead.result()  # this step's batch, its rows resident in every cache
            ahead = None
            if run.step + 1 < c.steps:  # pin the next batch's rows while this one computes
                ahead = run.tables.pin_ahead(next(batches))
            losses.append(run.train_step(run.transform(batch)))
            run.tables.release(pins)
            tps = (run.tokens_seen - start_tokens) / max(1e-9, time.perf_counter() - start)
            losses = _log_eval_save(run, bar, losses, tps)
        elapsed = time.perf_counter() - start
        done = run.curve and run.curve[-1][0] == run.tokens_seen
        val = run.curve[-1][1] if done else run.validate_now()
        run.save()
        run.world.barrier()  # no rank tears its connections down while another still uses them
    except OSError as e:
        if disk_full(e):  # e.g. a live disk table's new rows (a checkpoint says so itself)
            raise _no_space(run, e) from e
        raise
    finally:
        if ahead is not None and ahead.exception() is None:  # pinned, never trained: release
            run.tables.release(ahead.result()[1])
        bar.close()
        run.close()
    tps = (run.tokens_seen - start_tokens) / elapsed if elapsed > 0 else 0.0
    return {
        "out_dir": str(run.dir),
        "steps": run.step,
        "tokens": run.tokens_seen,
        "val_loss": val,
        "val_ppl": math.exp(val),
        "tokens_per_s": tps,
        **run.utilisation(tps),
        # The thread count changes float reduction order, hence the last bits of every loss.
        "torch_threads": torch.get_num_threads(),
        "world_size": run.world.size,
        "rank": run.world.rank,
        "curve": [list(p) for p in run.curve],
    }


def _log_eval_save(run: Run, bar: tqdm, losses: list[float], tps: float) -> list[float]:
    """What falls due after a step: the training log, a validation, a checkpoint. Returns the
    losses not yet logged."""
    c = run.config
    if run.step % c.log_every == 0 or run.step == c.steps:
        bar.set_postfix(loss=f"{run.log_train(losses, tps):.3f}", tok_s=f"{tps:,.0f}")
        losses = []
    if run.step % c.eval_every == 0 and run.step < c.steps:
        bar.set_postfix(val=f"{run.validate_now():.3f}", tok_s=f"{tps:,.0f}")
    if c.ckpt_every and run.step % c.ckpt_every == 0 and run.step < c.steps:
        run.save()
    bar.update(1)
    return losses


def _progress(run: Run) -> tqdm:
    return tqdm(
        total=run.config.steps,
        initial=run.step,
        disable=not (run.config.progress and run.world.main),
        file=sys.stderr,
        desc=run.label,
        dynamic_ncols=True,
        mininterval=2.0,  # keeps logs of non-interactive runs short
    )


def _no_space(run: Run, e: OSError) -> ValueError:
    where = f" ({e.filename})" if e.filename else ""
    last = "no checkpoint was written yet"
    if run.saved:
        last = f"the last complete checkpoint ({run.saved[1].name}) is intact"
    return ValueError(
        f"no space left on the device{where} while training step {run.step + 1}; {last}: free "
        "space, then resume (--resume)"
    )


def _compiled(trainer: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """`torch.compile(trainer)`; refused (ValueError) for tables that are embeddings with
    sparse gradients, which the compiler cannot take."""
    if any(m.table is not None and m.table.sparse for m in model.engram_layers):
        raise ValueError(
            "compile=true cannot take tables kept as embeddings with sparse gradients: place "
            "them in row stores (tables.placement=host or disk), or set optim.sparse_tables=false"
        )
    return torch.compile(trainer)


def _local_batch(config: TrainConfig, world: World) -> int:
    """Each rank's share of the global batch."""
    if config.batch_size % world.size:
        raise ValueError(
            f"batch_size={config.batch_size} (the global batch) must be divisible by the "
            f"{world.size} ranks"
        )
    return config.batch_size // world.size


RUN_FILES = ("metrics.jsonl", "checkpoints", "tables", "tensorboard")


def _trim_metrics(run_dir: Path, step: int) -> None:
    """Drop, on resume, the metrics of steps after the one resumed from (the run that died
    wrote them; they are about to be written again) and a line a kill cut short, so the file
    reads as one uninterrupted run. Replaced atomically: a crash here leaves the old file."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        at = record.get("step") if isinstance(record, dict) else None
        if isinstance(at, int) and at <= step:
            kept.append(line + "\n")
    tmp = path.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(kept))
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(run_dir)


def _claim(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to train a new run into a folder holding another (their metrics would mix)."""
    if resume:
        return
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if found and not overwrite:
        raise ValueError(
            f"{run_dir} already holds a run ({', '.join(found)}): resume it (--resume), "
            "choose another out_dir, or pass --overwrite to replace it"
        )
    for name in found:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
