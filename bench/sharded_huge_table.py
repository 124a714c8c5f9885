"""Moonshot: 4 ranks train a row-sharded table of >= 64 GB on one 2-core, 24 GiB machine.

Every rank holds a quarter of every Engram table's rows in a sparse disk file behind a hot-row
cache (`tables.placement=disk tables.cache_rows=...`), so the table is more than twice the RAM
and no rank ever holds more than its cache and the rows in flight. Three launches of the real
command (`torchrun --standalone --nproc-per-node N -m engram train ...`), the same config:

    A  4 ranks, `--steps` steps uninterrupted (one checkpoint at the end)
    B  4 ranks, a checkpoint every `--steps / 2`: once the half-way checkpoint is committed, one
       rank is killed (SIGKILL), and torchrun tears the job down
    C  `--resume` of B at 2 ranks: each new rank reads its (twice as large) range from the four
       old shards, and trains to the end

and the claim is |val(C) - val(A)| <= 1e-4 x val(A): the interruption, the kill and the change of
world size leave the training as it was, up to float reduction order. `--controls` adds two
launches that tell the two apart: B resumed at its own world size (reduction order unchanged: it
must reproduce A), and an uninterrupted run at the resumed world size (reduction order alone).

Measured per launch: wall time, tokens/s (rank 0's summary), each rank's peak resident memory
(VmHWM, and RssAnon / RssFile sampled every second from /proc: file-backed pages of the mapped
shards are reclaimable, anonymous ones are not), the shards' logical and allocated bytes, the
checkpoint's bytes, and the row exchange's bytes per step (rank 0's metrics). The model is the
`tiny` preset with its Engram spec's base sizes scaled to the table size; data the default corpus.

    OMP_NUM_THREADS=1 python bench/sharded_huge_table.py                 # 64 GB, 200 steps
    python bench/sharded_huge_table.py --table-gb 1 --steps 20 --out /tmp/s.json   # a smoke run

The last line of output is one JSON record (also written to `--out`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from system_probes import read_kv

from engram.experiments.report import machine_info, write_json
from engram.model import model_preset
from engram.spec import derive_primes
from engram.tables.row_optim import make_row_optimizer

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "sharded_huge_table.json"
GB = 10**9


def config_args(args: argparse.Namespace, out_dir: Path) -> tuple[list[str], dict[str, Any]]:
    """`key=value` arguments of the run, with base sizes for a >= table_gb GB table; sizes."""
    spec = model_preset(args.preset).engram.spec
    width = make_row_optimizer("adam").layout(1, spec.row_dim).width  # row + Adam's m and v
    heads = len(spec.layer_ids) * len(spec.orders) * spec.heads_per_order
    per_head = math.ceil(args.table_gb * GB / (heads * width * 4))
    base_sizes = (per_head,) * len(spec.orders)
    primes = derive_primes(spec.layer_ids, spec.orders, spec.heads_per_order, base_sizes)
    rows = sum(sum(p) for p in primes)
    overrides = [
        f"preset={args.preset}",
        f"tokenizer={args.tokenizer}",
        f"model.engram.spec.base_sizes={','.join(map(str, base_sizes))}",
        "tables.placement=disk",
        f"tables.cache_rows={args.cache_rows}",
        f"seq_len={args.seq_len}",
        f"batch_size={args.batch_size}",
        f"steps={args.steps}",
        f"eval_every={args.steps}",
        f"eval_tokens={args.eval_tokens}",
        "log_every=10",
        f"out_dir={out_dir}",
        "progress=false",
    ]
    sizing = {"rows": rows, "record_bytes": width * 4, "logical_bytes": rows * width * 4}
    return overrides, {**sizing, "base_sizes": list(base_sizes)}


# ---- one launch, watched ------------------------------------------------------------------------
def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


class Watch(threading.Thread):
    """Peak memory of each rank (the launcher's children), sampled every second."""

    KEYS = ("VmHWM", "RssAnon", "RssFile")

    def __init__(self, launcher: subprocess.Popen) -> None:
        super().__init__(daemon=True)
        self.launcher, self.peaks = launcher, {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(1.0):
            for pid in children(self.launcher.pid):
                status = read_kv(f"/proc/{pid}/status")
                peak = self.peaks.setdefault(pid, {})
                for key in self.KEYS:
                    peak[key] = max(peak.get(key, 0), status.get(key, 0))

    def stop(self) -> dict[str, int]:
        self._halt.set()
        self.join()
        ranks = list(self.peaks.values())
        return {f"max_rank_{k}": max((r.get(k, 0) for r in ranks), default=0) for k in self.KEYS}


def launch(
    ranks: int,
    overrides: list[str],
    log: Path,
    kill_when: Callable[[], bool] | None = None,
    *extra: str,
) -> dict[str, Any]:
    """One torchrun launch; with `kill_when`, SIGKILL one rank as soon as it returns True."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={ranks}", "-m", "engram", "train", *overrides, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    with open(log, "w") as err:
        job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        watch = Watch(job)
        watch.start()
        killed = None
        if kill_when is not None:
            while not kill_when() and job.poll() is None:
                time.sleep(0.2)
            workers = children(job.pid)
            if job.poll() is None and workers:
                killed = workers[-1]
                os.kill(killed, signal.SIGKILL)
        stdout, _ = job.communicate()
        memory = watch.stop()
    seconds = time.perf_counter() - start
    summary = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    if kill_when is None and (job.returncode != 0 or not summary):
        raise SystemExit(f"launch failed (exit {job.returncode}); see {log}")
    out = {"ranks": ranks, "seconds": seconds, "returncode": job.returncode, **memory}
    if killed is not None:
        out["killed_pid"] = killed
    if summary:
        out["summary"] = summary[-1]
    return out


def disk_usage(folder: Path) -> dict[str, int]:
    files = [p for p in folder.rglob("*.table") if p.is_file()]
    return {
        "files": len(files),
        "logical_bytes": sum(p.stat().st_size for p in files),
        "allocated_bytes": sum(p.stat().st_blocks * 512 for p in files),
    }


def exchanged(run: Path) -> dict[str, float]:
    """Rank 0's row-exchange bytes per step (its metrics log them every `log_every` steps)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [{"step": 0}] + [r for r in records if "exchanged_sent" in r]
    if len(steps) < 2:
        return {}
    per = [
        (b["exchanged_sent"] + b["exchanged_received"]) / (b["step"] - a["step"])
        for a, b in itertools.pairwise(steps)
    ]
    return {"bytes_per_step_mean": sum(per) / len(per), "bytes_per_step_max": max(per)}


def _live_tables(folder: str, names: list[str]) -> list[str]:
    """What a copy of a run leaves out: its live shard files (a resume rebuilds them from the
    checkpoint), which are sparse and would be copied whole."""
    return ["tables"] if "checkpoints" in names else []


def controls(args: argparse.Namespace, b_args: list[str]) -> dict[str, Any]:
    """Two controls that separate a resharding error from float reduction order:
    `c_same`, B resumed at its own world size (must reproduce A to the last bits), and
    `a_resume_ranks`, an uninterrupted run at the resumed world size (how far reduction order
    alone moves the final loss from A)."""
    same = [a.replace(str(args.folder / "b"), str(args.folder / "b-same")) for a in b_args]
    print(f"control: --resume at {args.ranks} ranks", flush=True)
    out = {"c_same": launch(args.ranks, same, args.folder / "c-same.log", None, "--resume")}
    a2_args, _ = config_args(args, args.folder / "a2")
    print(f"control: {args.resume_ranks} ranks uninterrupted", flush=True)
    out["a_resume_ranks"] = launch(args.resume_ranks, a2_args, args.folder / "a2.log")
    return out


# ---- the launches ------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table-gb", type=float, default=64.0, help="all tables, all ranks (1e9 B)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--resume-ranks", type=int, default=2)
    ap.add_argument("--cache-rows", type=int, default=1 << 16)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--tokenizer", default="bpe:512")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8, help="the global batch")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--folder", type=Path, default=ROOT / "runs" / "bench-sharded-huge-table")
    ap.add_argument("--keep", action="store_true", help="keep the runs' files")
    ap.add_argument(
        "--controls",
        action="store_true",
        help="B resumed at its own world size, and an uninterrupted run at the resumed one",
    )
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.folder.exists():
        shutil.rmtree(args.folder)
    args.folder.mkdir(parents=True)
    half = args.steps // 2
    record: dict[str, Any] = {"bench": "sharded_huge_table", "machine": machine_info()}
    try:
        a_args, sizing = config_args(args, args.folder / "a")
        record["sizing"] = sizing
        print(f"table: {sizing['logical_bytes'] / GB:.1f} GB, {sizing['rows']:,} rows", flush=True)
        print(f"A: {args.ranks} ranks, {args.steps} steps", flush=True)
        record["a"] = launch(args.ranks, a_args, args.folder / "a.log")
        record["a"]["exchange"] = exchanged(args.folder / "a")
        record["a"]["disk"] = disk_usage(args.folder / "a")
        b_args, _ = config_args(args, args.folder / "b")
        b_args.append(f"ckpt_every={half}")
        latest = args.folder / "b" / "checkpoints" / "latest"

        def committed() -> bool:  # `latest` names the half-way checkpoint: it is complete
            return latest.exists() and latest.read_text().strip() == f"step-{half:07d}"

        print(f"B: {args.ranks} ranks, one killed after the checkpoint at {half}", flush=True)
        record["b"] = launch(args.ranks, b_args, args.folder / "b.log", committed)
        record["b"]["disk"] = disk_usage(args.folder / "b")
        if args.controls:  # B as it was killed, for a resume at the same world size
            shutil.copytree(args.folder / "b", args.folder / "b-same", ignore=_live_tables)
        print(f"C: --resume at {args.resume_ranks} ranks", flush=True)
        record["c"] = launch(args.resume_ranks, b_args, args.folder / "c.log", None, "--resume")
        record["c"]["disk"] = disk_usage(args.folder / "b")
        ckpt = args.folder / "b" / "checkpoints" / f"step-{args.steps:07d}"
        record["checkpoint_bytes"] = sum(p.stat().st_blocks * 512 for p in ckpt.rglob("*"))
        if args.controls:
            record |= controls(args, b_args)
    finally:
        if not args.keep:
            shutil.rmtree(args.folder, ignore_errors=True)
    va = record["a"]["summary"]["val_loss"]
    for arm in ("c", "c_same", "a_resume_ranks"):
        if arm in record:
            val = record[arm]["summary"]["val_loss"]
            record[f"val_loss_{arm}"] = val
            record[f"relative_difference_{arm}"] = abs(val - va) / va
    record["val_loss_a"] = va
    record["relative_difference"] = record["relative_difference_c"]
    record["within_1e-4"] = record["relative_difference"] <= 1e-4
    record["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    mem = read_kv("/proc/meminfo").get("MemTotal", 0)
    record["machine_ram_bytes"] = mem
    record["table_over_ram"] = sizing["logical_bytes"] / mem if mem else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, record)
    print(
        f"val A {va:.6f}  C {record['val_loss_c']:.6f}  "
        f"rel {record['relative_difference']:.2e}; "
        f"peak rank RSS A {record['a']['max_rank_VmHWM'] / 2**20:.0f} MiB",
        file=sys.stderr,
    )
    print(json.dumps(record))


if __name__ == "__main__":
    main()
