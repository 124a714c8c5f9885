"""Training with an Engram table larger than RAM: a sparse disk table behind a hot-row cache.

Trains the `demo` preset (tokenizer bpe:2048, the default corpus, TrainConfig's batch 16 x 128
tokens) with its Engram spec's `base_sizes` scaled so that the logical disk table (rows x record
width x 4 bytes; a record holds the row and RowAdam's m and v, so width = 3 x row_dim) is at
least `--table-gb` GB (10^9 bytes; default 32, more than this machine's RAM). The table is one
sparse memory-mapped file (`tables.placement=disk`) behind a hot-row cache of `--cache-rows`
records (`tables.cache_rows`), with batch n+1's rows prefetched while step n computes.

1. Trains `--steps` steps from scratch and checkpoints at the end (`train(config)`).
2. Resumes from that checkpoint with `steps + --resume-steps` and trains the extra steps
   (`train(config, resume=True)`). Right after the restore, before the first resumed step, it
   evaluates the restored model: the loss must equal the final loss of part 1 (every trained
   row came back from the checkpoint).

Measured for each part: steps/s and tokens/s of the training loop (the train summary), wall
time split into loop / validation / checkpoint save / restore / the rest (setup), resident
memory (peak VmHWM; RssAnon and RssFile sampled every second by a thread, because file-backed
pages of the mapping are resident but reclaimable while anonymous ones are not), system page
cache and dirty pages (/proc/meminfo, sampled), bytes the process wrote and read on storage
(/proc/self/io write_bytes / read_bytes / cancelled_write_bytes; dirtying a page of the
mapping is charged to the process that dirtied it) and the device's sectors written
(/proc/diskstats, system-wide), the table file's logical and allocated size (st_size,
st_blocks x 512), the checkpoint's allocated bytes, the cache's hits, misses, evictions and
write-backs (exact counts from the stores; per-interval hit rates from metrics.jsonl), and the
validation loss (`eval_tokens` validation tokens, the same for every run).

`--control` adds a small-table control: the same model with a `--control-gb` table (default
0.5) trained `--control-steps` (default 100) from scratch in host memory (no cache) and on disk
(the same cache), for the tokens/s ratio and the loss (the two placements run the same
arithmetic, so the losses must be equal). A 32 GB table cannot be trained in host placement
on a machine with less RAM, hence the small control.

Defaults: 32 GB, 200 steps + 20 resumed, cache 2^18 rows (48 MiB; a batch has at most
16 x 128 x 8 = 16,384 unique rows, two batches are pinned at once), files under
runs/bench-huge-table (deleted at the end), one torch thread. On a 2-core CPU, before
checkpoints were packed and files freed in the background, it took about 27 minutes with
`--control`, of which 4 trained: the rest was the kernel freeing the table files' ~10^6
scattered 4 KiB extents (on ext4 mounted with `discard`, one synchronous discard each).

The big files are deleted at the end unless `--keep`. Prints a summary; writes the JSON record
(default bench/results/huge_table.json); the last line of stdout is that record.

    OMP_NUM_THREADS=1 python bench/huge_table.py --control           # 32 GB, 200 + 20 steps
    python bench/huge_table.py --table-gb 1 --steps 10 --resume-steps 5 --result /tmp/h.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from system_probes import Phase, Sampler, allocated, cleanup, filesystem, gib, read_kv

from engram.assembly import evaluate
from engram.cli import train_config
from engram.config import TrainConfig
from engram.experiments.report import machine_info, write_json
from engram.model import model_preset
from engram.spec import derive_primes
from engram.tables.cache import CachedStore
from engram.tables.row_optim import make_row_optimizer
from engram.tables.stores import DiskStore, file_size
from engram.train import Run, train

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "huge_table.json"
GB = 10**9


# ---- the run's configuration -----------------------------------------------------------------
def sized_config(
    args: argparse.Namespace,
    table_gb: float,
    placement: str,
    cache_rows: int,
    folder: Path,
    steps: int,
) -> tuple[TrainConfig, dict[str, Any]]:
    """The `demo` TrainConfig with base sizes scaled to a >= table_gb GB table, and its sizes."""
    spec = model_preset(args.preset).engram.spec
    width = make_row_optimizer("adam").layout(1, spec.row_dim).width  # row + Adam's m and v
    heads = len(spec.layer_ids) * len(spec.orders) * spec.heads_per_order
    per_head = math.ceil(table_gb * GB / (heads * width * 4))
    base_sizes = (per_head,) * len(spec.orders)
    overrides = [
        f"preset={args.preset}",
        f"tokenizer={args.tokenizer}",
        f"data={args.data}",
        f"model.engram.spec.base_sizes={','.join(map(str, base_sizes))}",
        f"tables.placement={placement}",
        f"tables.cache_rows={cache_rows}",
        f"out_dir={folder / 'run'}",
        f"steps={steps}",
        f"eval_every={steps}",  # no validation inside the loop: one at the end of each part
        f"log_every={args.log_every}",
        f"seed={args.seed}",
        f"progress={args.progress}",
    ]
    config = train_config(None, overrides)
    primes = derive_primes(spec.layer_ids, spec.orders, spec.heads_per_order, base_sizes)
    rows = {f"layer{layer}": int(sum(p)) for layer, p in zip(spec.layer_ids, primes, strict=True)}
    layout = make_row_optimizer("adam").layout(max(rows.values()), spec.row_dim)
    logical = sum(r * width * 4 for r in rows.values())
    sizing = {
        "table_gb_requested": table_gb,
        "base_sizes": list(base_sizes),
        "rows": rows,
        "row_dim": spec.row_dim,
        "record_width": width,
        "record_bytes": width * 4,
        "heads_per_table": heads // len(spec.layer_ids),
        "logical_bytes": logical,
        "file_bytes": sum(
            file_size(replace(layout, num_rows=r)) for r in rows.values()
        ),  # header + touched map (1 byte a row) + records
        "placement": placement,
        "cache_rows": cache_rows,
        "cache_bytes": min(cache_rows, min(rows.values())) * width * 4 * len(rows),
        "overrides": overrides,
    }
    return config, sizing


class Probe:
    """Wraps a few `Run` methods (timing only; nothing changes what a run computes)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.saves: list[dict[str, Any]] = []
        self.restore: dict[str, Any] | None = None
        self.validations: list[dict[str, float]] = []
        self.cache: dict[str, dict[str, float]] = {}  # the top store's counters, summed
        self.backing: dict[str, dict[str, float]] = {}  # the slow tier's counters (never reset)
        self.final: dict[str, dict[str, Any]] = {}
        self.copies: list[dict[str, Any]] = []  # disk tables saved into / loaded from checkpoints
        self.flushes: list[float] = []  # DiskStore.flush: msync of the mapping + fsync

    def install(self) -> None:
        probe = self
        save_table, load_table, flush = DiskStore.save, DiskStore.load, DiskStore.flush

        def timed(op: str, method):  # DiskStore.save / load: the checkpoint file's bytes
            def run(store: DiskStore, path: Path) -> None:
                t0 = time.perf_counter()
                method(store, path)
                seconds = time.perf_counter() - t0
                size = os.stat(path).st_size
                probe.copies.append(
                    {"op": op, "file": str(path), "bytes": size, "seconds": seconds}
                )

            return run

        def timed_flush(store: DiskStore) -> None:
            t0 = time.perf_counter()
            flush(store)
            probe.flushes.append(time.perf_counter() - t0)

        DiskStore.save, DiskStore.load = timed("save", save_table), timed("load", load_table)
        DiskStore.flush = timed_flush
        save, resume, table_stats = Run.save, Run._resume, Run.table_stats
        validate_now, close = Run.validate_now, Run.close

        def timed_save(run: Run) -> Path:
            t0 = time.perf_counter()
            path = save(run)
            probe.saves.append(
                {"step": run.step, "seconds": time.perf_counter() - t0, "path": str(path)}
            )
            return path

        def timed_resume(run: Run, *args: Any) -> None:
            t0 = time.perf_counter()
            resume(run, *args)
            seconds = time.perf_counter() - t0
            probe.restore = {"seconds": seconds, "restored_step": run.step}
            if run.step > 0:  # the restored model, before any resumed step
                t1 = time.perf_counter()
                loss = evaluate(run.model, run.val_tokens, run.config, run.device)
                probe.restore["val_loss"] = loss
                probe.restore["eval_seconds"] = time.perf_counter() - t1

        def counted_table_stats(run: Run) -> dict[str, float]:
            probe.count(run)
            return table_stats(run)  # returns the counters since the last call, then resets

        def timed_validate(run: Run) -> float:
            t0 = time.perf_counter()
            loss = validate_now(run)
            probe.validations.append(
                {"step": run.step, "val_loss": loss, "seconds": time.perf_counter() - t0}
            )
            return loss

        def counted_close(run: Run) -> None:
            probe.count(run)
            for name, table in run.tables.tables.items():
                store = table.store
                disk = store.backing if isinstance(store, CachedStore) else store
                info: dict[str, Any] = {"kind": store.kind}
                if isinstance(store, CachedStore):
                    info["resident_rows"] = store.resident_rows
                    info["capacity"] = store.capacity
                if isinstance(disk, DiskStore):
                    info["touched_rows"] = disk.touched_rows
                    info["path"] = str(disk.path)
                probe.final[name] = info
            close(run)

        Run.save, Run._resume, Run.table_stats = timed_save, timed_resume, counted_table_stats
        Run.validate_now, Run.close = timed_validate, counted_close

    def count(self, run: Run) -> None:
        for name, table in run.tables.tables.items():
            top = self.cache.setdefault(name, {})
            for key, value in table.store.stats.as_dict().items():
                if key != "hit_rate":
                    top[key] = top.get(key, 0) + value
            if isinstance(table.store, CachedStore):
                self.backing[name] = table.store.backing.stats.as_dict()

    def tables(self) -> dict[str, Any]:
        out = {}
        for name, top in self.cache.items():
            lookups = top.get("hits", 0) + top.get("misses", 0)
            out[name] = {
                "store": top,
                "hit_rate": top["hits"] / lookups if lookups else None,
                "backing": self.backing.get(name),
                **self.final.get(name, {}),
            }
        return out


def metrics(run_dir: Path, first: int, last: int) -> dict[str, Any]:
    """Training-log records with first < step <= last from metrics.jsonl: hit rates, bytes."""
    path = run_dir / "metrics.jsonl"
    logs = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        rec = json.loads(line)
        if first < rec["step"] <= last and "loss" in rec:
            logs.append(rec)
    out: dict[str, Any] = {"intervals": len(logs)}
    for key in sorted({k for rec in logs for k in rec if k.startswith("layer")}):
        values = [rec[key] for rec in logs if key in rec]
        if key.endswith("hit_rate"):
            out[key] = {
                "first": values[0],
                "last": values[-1],
                "mean": sum(values) / len(values),
                "by_step": {rec["step"]: rec[key] for rec in logs if key in rec},
            }
        else:
            out[key] = sum(values)
    if logs:
        out["train_loss_last"] = logs[-1]["loss"]
    return out


def run_case(
    args: argparse.Namespace,
    sampler: Sampler,
    probe: Probe,
    label: str,
    table_gb: float,
    placement: str,
    cache_rows: int,
    steps: int,
    resume_steps: int,
) -> dict[str, Any]:
    """Train `steps` from scratch (then resume `resume_steps` more) and measure each part."""
    folder = args.out / label
    shutil.rmtree(folder, ignore_errors=True)
    config, sizing = sized_config(args, table_gb, placement, cache_rows, folder, steps)
    tokens_per_step = config.batch_size * config.seq_len
    heads = sizing["heads_per_table"]
    if cache_rows and cache_rows < 2 * tokens_per_step * heads:
        print(
            f"warning: cache_rows={cache_rows} may not hold two batches' unique rows "
            f"(up to {2 * tokens_per_step * heads:,})",
            file=sys.stderr,
        )
    print(
        f"[{label}] {placement} table: {sum(sizing['rows'].values()):,} rows x "
        f"{sizing['record_bytes']} B = {sizing['logical_bytes'] / GB:.2f} GB logical "
        f"({sizing['file_bytes'] / GB:.2f} GB file), cache {cache_rows:,} rows; "
        f"{steps} steps of {tokens_per_step} tokens"
        + (f", then resume +{resume_steps}" if resume_steps else ""),
        flush=True,
    )
    result: dict[str, Any] = {"sizing": sizing, "parts": {}}
    run_dir = Path(config.out_dir)
    parts = [("train", config, False, 0, steps)]
    if resume_steps:
        parts.append(("resume", replace(config, steps=steps + resume_steps), True, steps, None))
    for part, cfg, resume, first, _ in parts:
        probe.reset()
        with Phase(f"{label}:{part}", sampler, args.out) as phase:
            summary = train(cfg, resume=resume)
        loop = summary["tokens"] - first * tokens_per_step
        loop_s = loop / summary["tokens_per_s"] if summary["tokens_per_s"] else None
        save_s = sum(s["seconds"] for s in probe.saves)
        val_s = sum(v["seconds"] for v in probe.validations)
        restore = probe.restore or {}
        restore_s = restore.get("seconds", 0.0) + restore.get("eval_seconds", 0.0)
        rec: dict[str, Any] = {
            "steps": summary["steps"] - first,
            "final_step": summary["steps"],
            "tokens_per_s": summary["tokens_per_s"],
            "steps_per_s": summary["tokens_per_s"] / tokens_per_step,
            "val_loss": summary["val_loss"],
            "wall": {
                "total_s": phase.seconds,
                "loop_s": loop_s,
                "validation_s": val_s,
                "checkpoint_save_s": save_s,
                "restore_s": restore_s,
                "other_s": phase.seconds - (loop_s or 0) - val_s - save_s - restore_s,
            },
            **phase.result,
            "tables": probe.tables(),
            "table_transfers": probe.copies,
            "disk_flushes": {"calls": len(probe.flushes), "seconds": sum(probe.flushes)},
            "metrics": metrics(run_dir, first, summary["steps"]),
        }
        if probe.saves:
            ckpt = Path(probe.saves[-1]["path"])
            rec["checkpoint"] = {"path": str(ckpt), **allocated(ckpt)}
            rec["checkpoint"]["tables"] = (
                allocated(ckpt / "tables") if (ckpt / "tables").exists() else None
            )
        if placement == "disk":
            for name in sizing["rows"]:
                live = folder / "run" / "tables" / f"{name}.table"  # the run's default path
                if live.exists():
                    rec.setdefault("table_files", {})[name] = allocated(live)
        if resume:
            rec["restore"] = restore
            before = result["parts"]["train"]["val_loss"]
            rec["restore"]["val_loss_before_checkpoint"] = before
            rec["restore"]["loss_matches"] = (
                "val_loss" in restore and abs(restore["val_loss"] - before) <= 1e-6
            )
        result["parts"][part] = rec
        print_part(label, part, rec)
    if not args.keep:
        result["cleanup"] = cleanup(folder)
        c = result["cleanup"]
        print(
            f"[{label}] deleted {c['files']} files ({gib(c['allocated_bytes'])} allocated) in "
            f"{c['seconds']:.1f} s; slowest: {c['slowest']}",
            flush=True,
        )
    return result


# ---- reporting -----------------------------------------------------------------------------------
def print_part(label: str, part: str, r: dict[str, Any]) -> None:
    w, io, s = r["wall"], r["io"], r["sampled"]
    print(
        f"[{label}:{part}] {r['steps']} steps (to {r['final_step']}): "
        f"{r['steps_per_s']:.3f} steps/s, {r['tokens_per_s']:,.0f} tokens/s, "
        f"val loss {r['val_loss']:.4f}"
    )
    print(
        f"  wall {w['total_s']:.1f} s = loop {w['loop_s'] or 0:.1f} + validation "
        f"{w['validation_s']:.1f} + checkpoint save {w['checkpoint_save_s']:.1f} + restore "
        f"{w['restore_s']:.1f} + other {w['other_s']:.1f}"
    )
    print(
        f"  peak RSS {gib(r['peak_rss_bytes'])} (sampled max: anon "
        f"{gib(s.get('max_RssAnon'))}, file {gib(s.get('max_RssFile'))}); system page cache max "
        f"{gib(s.get('max_sys_Cached'))}, dirty max {gib(s.get('max_sys_Dirty'))}, "
        f"MemAvailable min {gib(s.get('min_sys_MemAvailable'))}"
    )
    dev = r["device_bytes_written_all_processes"]
    print(
        f"  process wrote {gib(io['write_bytes'])} to storage (read {gib(io['read_bytes'])}, "
        f"cancelled {gib(io['cancelled_write_bytes'])}); device wrote {gib(dev)} (all processes)"
    )
    for name, t in r["tables"].items():
        st = t["store"]
        hr = "n/a" if t["hit_rate"] is None else f"{t['hit_rate']:.3f}"
        line = (
            f"  {name}: cache hit rate {hr} ({st.get('hits', 0):,.0f} hits, "
            f"{st.get('misses', 0):,.0f} misses, {st.get('evictions', 0):,.0f} evictions, "
            f"{st.get('writebacks', 0):,.0f} write-backs)"
        )
        if "touched_rows" in t:
            line += f", {t['touched_rows']:,} rows ever written"
        print(line)
    for name, f in r.get("table_files", {}).items():
        print(
            f"  {name}.table: {f['logical_bytes'] / GB:.2f} GB logical, "
            f"{gib(f['allocated_bytes'])} allocated"
        )
    for c in r["table_transfers"]:
        print(
            f"  table {c['op']} {Path(c['file']).parent.name}/{Path(c['file']).name}: "
            f"{gib(c['bytes'])} file in {c['seconds']:.1f} s"
        )
    if r["disk_flushes"]["calls"]:
        f = r["disk_flushes"]
        print(f"  disk table flushes (msync + fsync): {f['calls']} in {f['seconds']:.1f} s")
    if "checkpoint" in r:
        c = r["checkpoint"]
        print(f"  checkpoint {Path(c['path']).name}: {gib(c['allocated_bytes'])} allocated")
    if "restore" in r:
        rs = r["restore"]
        print(
            f"  restored step {rs['restored_step']} in {rs['seconds']:.1f} s; val loss right "
            f"after restore {rs.get('val_loss', float('nan')):.6f} vs "
            f"{rs['val_loss_before_checkpoint']:.6f} at the checkpoint "
            f"({'match' if rs['loss_matches'] else 'MISMATCH'})"
        )
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table-gb", type=float, default=32.0, help="logical table size, 10^9 B")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--resume-steps", type=int, default=20)
    ap.add_argument("--cache-rows", type=int, default=1 << 18)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-huge-table"))
    ap.add_argument("--result", type=Path, default=OUT, help="where the JSON record goes")
    ap.add_argument("--control", action="store_true", help="add the small host vs disk control")
    ap.add_argument("--control-gb", type=float, default=0.5)
    ap.add_argument("--control-steps", type=int, default=100)
    ap.add_argument("--keep", action="store_true", help="keep the run folders and table files")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--tokenizer", default="bpe:2048")
    ap.add_argument("--data", default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--progress", action="store_true", help="show the training progress bar")
    args = ap.parse_args(argv)
    if args.table_gb <= 0 or args.steps < 1 or args.resume_steps < 0 or args.cache_rows < 1:
        ap.error("--table-gb must be > 0, --steps >= 1, --resume-steps >= 0, --cache-rows >= 1")
    torch.set_num_threads(args.threads)
    # The code this process runs is the checkout at its start: record it now, not at the end.
    machine = machine_info()
    dirty = machine["commit_dirty"]
    args.out.mkdir(parents=True, exist_ok=True)
    meminfo = read_kv("/proc/meminfo")
    free0 = shutil.disk_usage(args.out).free
    print(
        f"RAM {gib(meminfo.get('MemTotal'))}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}; {gib(free0)} free under {args.out}",
        flush=True,
    )

    sampler = Sampler(args.out)
    sampler.start()
    probe = Probe()
    probe.install()
    t_start = time.perf_counter()
    results: dict[str, Any] = {}
    try:
        results["huge"] = run_case(
            args, sampler, probe, "huge", args.table_gb, "disk", args.cache_rows,
            args.steps, args.resume_steps,
        )  # fmt: skip
        if args.control:
            control = {}
            for placement in ("host", "disk"):
                control[placement] = run_case(
                    args, sampler, probe, f"control-{placement}", args.control_gb, placement,
                    args.cache_rows if placement == "disk" else 0, args.control_steps, 0,
                )  # fmt: skip
            host, disk = (control[p]["parts"]["train"] for p in ("host", "disk"))
            control["disk_over_host_tokens_per_s"] = disk["tokens_per_s"] / host["tokens_per_s"]
            control["val_loss_difference"] = disk["val_loss"] - host["val_loss"]
            results["control"] = control
            print(
                f"[control] {args.control_gb} GB table, {args.control_steps} steps: disk/host "
                f"tokens/s {control['disk_over_host_tokens_per_s']:.3f} "
                f"({disk['tokens_per_s']:,.0f} vs {host['tokens_per_s']:,.0f}); val loss "
                f"disk - host = {control['val_loss_difference']:.2e}"
            )
    finally:
        sampler.stop()
    results["seconds_total"] = time.perf_counter() - t_start
    results["disk_free"] = {
        "start_bytes": free0,
        "min_bytes": min(p.get("min_disk_free", free0) for p in sampler.peaks.values()),
        "end_bytes": shutil.disk_usage(args.out).free,
    }
    results["memory_series"] = sampler.series
    print(
        f"\ntotal {results['seconds_total']:.0f} s; disk free {gib(free0)} at start, "
        f"{gib(results['disk_free']['min_bytes'])} at the lowest"
    )

    record = {
        "benchmark": "huge_table",
        "machine": {
            **{k: machine[k] for k in ("platform", "processor", "cpu_count", "torch_threads")},
            "ram_bytes": meminfo.get("MemTotal"),
            "filesystem": filesystem(args.out),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "versions": {
            "python": machine["python"],
            "torch": machine["torch"],
            "numpy": np.__version__,
        },
        "commit": machine["commit"],
        "commit_dirty": dirty,
        "config": {
            "preset": args.preset,
            "tokenizer": args.tokenizer,
            "data": args.data,
            "seed": args.seed,
            "table_gb": args.table_gb,
            "gb_unit_bytes": GB,
            "steps": args.steps,
            "resume_steps": args.resume_steps,
            "cache_rows": args.cache_rows,
            "control": args.control,
            "control_gb": args.control_gb,
            "control_steps": args.control_steps,
            "out": str(args.out),
            "command": " ".join(["python", sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
        },
        "results": results,
    }
    args.result.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.result, record)
    print(f"wrote {args.result}")
    print(json.dumps(record))


if __name__ == "__main__":
    sys.exit(main())
