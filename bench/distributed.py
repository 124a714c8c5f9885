"""Distributed training with row-sharded tables (issue 13): traffic, throughput, NCCL, in one run.

Three parts, each comparing its arms side by side:

1. `bytes`: bytes exchanged per step against table size. Two ranks (gloo, spawned processes)
   share one Engram table (orders 2-3, 8 heads, row_dim 16) of about 1e5, 1e6, 1e7 and 1e8
   rows, each rank holding its contiguous half on disk behind a hot-row cache (sparse files:
   only the rows a step writes take blocks). The same real batches go through every size:
   Python stdlib source, DeepSeek tokenizer, hashed for each table, the global batch split over
   the ranks. One step is what the trainer does: pin the batch's rows (the owners learn the ids
   asked of them), forward, backward, the row optimiser's step, release; sizes are interleaved
   step by step. Per step, rank 0's `TRAFFIC` (bytes sent + received by every all_to_all of the
   row exchange) is recorded with the unique rows of the batch and those crossing ranks, and
   checked against the closed form below. The claim: bytes/step are flat in the table size,
   since they depend on the batch's rows crossing ranks, never on how many rows there are.
2. `throughput`: `engram train` of the tiny recipe on a folder of stdlib files, as 2 ranks x 1
   thread (torchrun, gloo, the backbone under FSDP2) against 1 process x 2 threads, the same
   global batch; as references 1 process x 1 thread, and 2 ranks with the backbone under DDP
   (what FSDP's per-block collectives cost). The arms are interleaved over repeats (the machine
   is shared); tokens/s is read from rank 0's JSON summary line, the median of each arm reported,
   with the share of the CPU other processes took during each run.
3. `cuda`: the NCCL code path with one rank: `init_process_group("cpu:gloo,cuda:nccl")` in this
   process, a table on the GPU read by the sharded lookup (ids over gloo, rows and gradients over
   NCCL) with a `ShardGroup(0, 1, group)` against the same table unsharded, both with row-wise
   Adagrad: outputs and rows after every step must be equal; both are timed. Skipped without
   CUDA ("skipped: no CUDA").

Bytes of one step at rank 0 of 2 (`a`: its unique rows owned by rank 1, `b`: rank 1's owned by
rank 0; ids int64, rows and gradients fp32 of r dims):
    pin: counts 2 x 8 + ids 8 (a + b);  lookup: counts 2 x 8 + ids 8 (a + b) + rows 4r (a + b)
    + row gradients 4r (a + b).

Progress goes to stderr; the last line of stdout is one JSON record (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed_check import free_port, one_rank_check

from engram.data.sources import read_texts, stdlib_files, stdlib_root
from engram.experiments.report import cpu_seconds, machine_info, other_cpu_share
from engram.hashing import NgramHasher
from engram.module import HashedMemory, lazy_tables
from engram.spec import HashSpec, SpecConfig, resolve
from engram.tables.lookup import global_ids
from engram.tables.placed import PlacedTables
from engram.tables.plan import TablePlan
from engram.tables.sharded import TRAFFIC, RowShards, ShardGroup
from engram.tokenizer import load_tokenizer
from engram.vocab import compress

ROOT = Path(__file__).resolve().parent.parent
ROW_DIM = 16
ID_BYTES = 8  # int64 ids and counts
LR = 1e-3
PARTS = ("bytes", "throughput", "cuda")
WARM = 2  # untimed steps of the cuda part


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- batches: stdlib source through the DeepSeek tokenizer -----------------------------------
def stdlib_tokens(tok, count: int) -> torch.Tensor:
    """The first `count` DeepSeek token ids of the stdlib's train files, in sorted file order."""
    ids: list[int] = []
    for text in read_texts(stdlib_files(split="train")):
        ids.extend(tok.encode(text))
        if len(ids) >= count:
            return torch.tensor(ids[:count], dtype=torch.int64)
    raise ValueError(f"the stdlib holds fewer than {count} tokens")


def table_spec(tok, vocab, rows: int) -> HashSpec:
    """One Engram layer's spec (orders 2-3, 4 heads each, row_dim 16) of about `rows` rows."""
    base = max(2, rows // 8)
    config = SpecConfig(
        tokenizer="deepseek",
        layer_ids=(0,),
        orders=(2, 3),
        heads_per_order=4,
        base_sizes=(base, base),
        row_dim=ROW_DIM,
    )
    return resolve(config, tokenizer=tok, vocab=vocab)


def rank_slices(rows: torch.Tensor, world: int) -> list[torch.Tensor]:
    """A global batch [B, T, H] split over `world` ranks by sequences, as the loader splits it."""
    return list(rows.chunk(world, dim=0))


# ---- part 1: bytes exchanged against table size ------------------------------------------------
def expected_bytes(spec: HashSpec, rows: torch.Tensor, world: int) -> dict[str, int]:
    """Unique rows of one global batch [B, T, H] and rank 0's bytes by the closed form."""
    offsets = torch.tensor(spec.layer_offsets(0), dtype=torch.int64)
    shards = RowShards(spec.layer_rows(0), world)
    asks = [torch.unique(global_ids(r, offsets)) for r in rank_slices(rows, world)]
    mine = asks[0]
    out = int((shards.owner(mine) != 0).sum())  # rank 0's rows it asks of others (a)
    into = sum(int((shards.owner(ids) == 0).sum()) for ids in asks[1:])  # asked of rank 0 (b)
    crossing = out + into
    counts = 2 * ID_BYTES * (world - 1)
    row = 4 * spec.row_dim
    return {
        "unique_rows_global": int(torch.unique(torch.cat(asks)).numel()),
        "unique_rows_rank0": int(mine.numel()),
        "rows_crossing_rank0": crossing,
        "pin_bytes": counts + ID_BYTES * crossing,
        "lookup_bytes": counts + (ID_BYTES + 2 * row) * crossing,
    }


def _bytes_worker(rank: int, world: int, port: int, folder: Path, tables: list, cfg: dict) -> None:
    torch.set_num_threads(1)  # one core per rank
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=300),
    )
    placed = {}
    try:
        plan = TablePlan(placement="disk", cache_rows=cfg["cache_rows"])
        for spec, _ in tables:
            torch.manual_seed(0)  # every rank draws the same table seed: one table, sharded
            with lazy_tables():
                memory = HashedMemory(spec, 0, 1.0)
            sharding = ShardGroup(rank, world, grad_scale=1 / world)
            where = folder / f"rows{spec.layer_rows(0)}"
            placed[spec.layer_rows(0)] = (
                memory,
                PlacedTables([memory], plan, where, sharding=sharding),
            )
        steps = len(tables[0][1])
        record = {n: {"pin": [], "lookup": [], "step_s": []} for n in placed}
        for step in range(steps):
            order = list(zip(placed, tables, strict=True))
            if step % 2:
                order.reverse()
            for n, (_, batches) in order:
                memory, tables_n = placed[n]
                if step == cfg["warmup"]:
                    tables_n.reset_stats()  # the cache's hit rate over the timed steps
                rows = rank_slices(batches[step], world)[rank]
                dist.barrier()  # both ranks start the step together (a barrier is not counted)
                t0 = time.perf_counter()
                TRAFFIC.reset()
                pins = tables_n.pin({0: rows})  # the owners learn the rows asked of them
                pin_bytes = TRAFFIC.sent + TRAFFIC.received
                memory.lookup(rows).square().mean().backward()
                tables_n.step(LR)
                tables_n.release(pins)
                elapsed = time.perf_counter() - t0
                record[n]["pin"].append(pin_bytes)
                record[n]["lookup"].append(TRAFFIC.sent + TRAFFIC.received - pin_bytes)
                record[n]["step_s"].append(elapsed)
        for n, (_, tables_n) in placed.items():
            record[n]["cache_hit_rate"] = tables_n.stats()["layer0"]["hit_rate"]
            tables_n.flush()
            # This rank's shard file: the blocks the rows written so far take (pages, not rows).
            shard = folder / f"rows{n}" / f"{tables_n.file_name('layer0')}.table"
            record[n]["allocated_bytes"] = shard.stat().st_blocks * 512
        every: list = [None] * world
        dist.all_gather_object(every, {n: r["allocated_bytes"] for n, r in record.items()})
        if rank == 0:
            for n in record:
                record[n]["allocated_bytes"] = sum(e[n] for e in every)
            (folder / "rank0.json").write_text(json.dumps({str(n): r for n, r in record.items()}))
        dist.barrier()  # no rank tears its connections down while another still uses them
        (folder / f"done{rank}").touch()
    finally:
        for _, tables_n in placed.values():
            tables_n.close()
        dist.destroy_process_group()


def bytes_part(args: argparse.Namespace, tok, vocab, work: Path) -> dict:
    world = 2
    warm, steps = args.warmup, args.steps
    B, T = args.batch, args.seq
    ids = stdlib_tokens(tok, (warm + steps) * B * T).view(warm + steps, B, T)
    tables, expected = [], {}
    for target in args.rows:
        spec = table_spec(tok, vocab, target)
        n = spec.layer_rows(0)
        rows = NgramHasher(spec, vocab)(ids.view(-1, T))[0].view(warm + steps, B, T, -1)
        tables.append((spec, rows))
        expected[n] = [expected_bytes(spec, rows[s], world) for s in range(warm + steps)]
        log(f"bytes: table of {n:,} rows hashed")
    folder = work / "bytes"
    folder.mkdir(parents=True)
    cfg = {"cache_rows": args.cache_rows, "warmup": warm}
    log(f"bytes: 2 ranks, {warm} + {steps} steps of {B} x {T} tokens at each size, interleaved")
    load = cpu_seconds()
    start = time.perf_counter()
    try:
        mp.spawn(_bytes_worker, args=(world, free_port(), folder, tables, cfg), nprocs=world)
    except mp.ProcessExitedException:
        # Seen in the tests under load: a rank aborting in gloo's teardown after every rank
        # finished; only a rank that did not get that far is a failure.
        if len(list(folder.glob("done*"))) != world:
            raise
    measured = json.loads((folder / "rank0.json").read_text())
    out = {}
    for spec, _ in tables:
        n = spec.layer_rows(0)
        got, want = measured[str(n)], expected[n]
        timed = range(warm, warm + steps)
        total = [got["pin"][s] + got["lookup"][s] for s in timed]
        crossing = [want[s]["rows_crossing_rank0"] for s in timed]
        out[str(n)] = {
            "bytes_per_step": statistics.mean(total),
            "pin_bytes_per_step": statistics.mean(got["pin"][s] for s in timed),
            "lookup_bytes_per_step": statistics.mean(got["lookup"][s] for s in timed),
            "bytes_per_crossing_row": sum(total) / sum(crossing),
            "unique_rows_global_per_step": statistics.mean(
                want[s]["unique_rows_global"] for s in timed
            ),
            "unique_rows_rank0_per_step": statistics.mean(
                want[s]["unique_rows_rank0"] for s in timed
            ),
            "rows_crossing_rank0_per_step": statistics.mean(crossing),
            "bytes_match_closed_form": all(
                got["pin"][s] == want[s]["pin_bytes"]
                and got["lookup"][s] == want[s]["lookup_bytes"]
                for s in range(warm + steps)
            ),
            "step_s_median": statistics.median(got["step_s"][s] for s in timed),
            "cache_hit_rate_rank0": got["cache_hit_rate"],
            "disk_allocated_bytes": got["allocated_bytes"],
        }
    sizes = sorted(out, key=int)
    first, last = out[sizes[0]], out[sizes[-1]]
    return {
        "config": {
            "world": world,
            "backend": "gloo",
            "threads_per_rank": 1,
            "rows_target": args.rows,
            "batch_global": B,
            "seq": T,
            "warmup_steps": warm,
            "steps": steps,
            "row_dim": ROW_DIM,
            "heads": 8,
            "orders": [2, 3],
            "placement": "disk",
            "cache_rows_per_rank": args.cache_rows,
            "optimizer": "row-wise adam",
            "tokens": "stdlib train files, DeepSeek tokenizer",
        },
        "by_rows": out,
        "ratio_bytes_largest_smallest": last["bytes_per_step"] / first["bytes_per_step"],
        "ratio_bytes_per_crossing_row_largest_smallest": (
            last["bytes_per_crossing_row"] / first["bytes_per_crossing_row"]
        ),
        "ratio_step_s_largest_smallest": last["step_s_median"] / first["step_s_median"],
        "seconds": time.perf_counter() - start,
        "other_cpu_share": other_cpu_share(load),
    }


# ---- part 2: 2 ranks x 1 thread against 1 process x 2 threads ---------------------------------
ARMS = {  # name: (ranks, threads per rank, overrides)
    "2 ranks x 1 thread": (2, 1, []),  # the backbone under FSDP2, the default
    "1 process x 2 threads": (1, 2, []),
    "1 process x 1 thread": (1, 1, []),  # references: one core's worth of work,
    "2 ranks x 1 thread, DDP": (2, 1, ["parallel.dense=ddp"]),  # the backbone replicated
}
REFERENCES = ("1 process x 1 thread", "2 ranks x 1 thread, DDP")


def data_folder(folder: Path, files: int) -> Path:
    """A folder of the first `files` stdlib source files (copies, laid out as in the stdlib)."""
    root = stdlib_root()
    for path in stdlib_files(max_files=files):
        target = folder / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return folder


def train_command(ranks: int, overrides: list[str]) -> list[str]:
    launch = [sys.executable]
    if ranks > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    recipe = str(ROOT / "recipes/tiny.toml")
    return [*launch, "-m", "engram", "train", "--recipe", recipe, *overrides]


def train_once(ranks: int, threads: int, overrides: list[str], env: dict) -> dict:
    """One `engram train` run; rank 0's JSON summary, plus the exchanged bytes it logged."""
    env = {**env, "OMP_NUM_THREADS": str(threads)}
    load = cpu_seconds()
    done = subprocess.run(
        train_command(ranks, overrides), env=env, cwd=ROOT, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"engram train ({ranks} ranks) exited {done.returncode}:\n{done.stderr[-3000:]}"
        )
    summary = None
    for line in reversed(done.stdout.splitlines()):
        try:
            summary = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(summary, dict) and "tokens_per_s" in summary:
            break
    if summary is None or "tokens_per_s" not in summary:
        raise RuntimeError(f"no JSON summary in engram train's output:\n{done.stdout[-2000:]}")
    summary["other_cpu_share"] = other_cpu_share(load)  # two threads suffer most from it
    sent = received = logged = 0
    out_dir = Path(summary["out_dir"])
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "exchanged_sent" in rec:
            sent, received = sent + rec["exchanged_sent"], received + rec["exchanged_received"]
            logged = rec["step"]
    if logged:
        summary["exchanged_bytes_per_step"] = (sent + received) / logged
    shutil.rmtree(out_dir, ignore_errors=True)
    return summary


def throughput_part(args: argparse.Namespace, work: Path) -> dict:
    data = data_folder(work / "data", args.files)
    env = {**os.environ, "ENGRAM_CACHE_DIR": str(work / "cache")}  # token caches stay in `work`
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p
    )
    base = [
        f"data={data}",
        f"steps={args.train_steps}",
        f"eval_every={args.train_steps}",  # no evaluation inside the timed loop
        f"eval_tokens={args.eval_tokens}",
        "progress=false",
        "device=cpu",
    ]
    # The first run also trains the tokenizer and caches the tokens: before its timed loop.
    arms = {a: v for a, v in ARMS.items() if args.reference or a not in REFERENCES}
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    load = cpu_seconds()
    start = time.perf_counter()
    for repeat in range(args.repeats):
        order = list(arms) if repeat % 2 == 0 else list(reversed(arms))
        for arm in order:
            ranks, threads, extra = arms[arm]
            out = f"out_dir={work / 'runs' / f'{list(arms).index(arm)}-{repeat}'}"
            summary = train_once(ranks, threads, [*base, out, *extra], env)
            runs[arm].append(summary)
            log(
                f"throughput: repeat {repeat}, {arm}: {summary['tokens_per_s']:,.0f} tokens/s, "
                f"other processes took {summary['other_cpu_share']} of the CPU"
            )
    tps = {arm: statistics.median(s["tokens_per_s"] for s in r) for arm, r in runs.items()}
    two = "2 ranks x 1 thread"
    return {
        "config": {
            "recipe": "recipes/tiny.toml",
            "data": f"{args.files} stdlib files (copies)",
            "steps": args.train_steps,
            "eval_tokens": args.eval_tokens,
            "repeats": args.repeats,
            "arms": {
                arm: {"ranks": r, "threads_per_rank": t, "overrides": o}
                for arm, (r, t, o) in arms.items()
            },
            "launch": "torchrun --standalone (gloo) for 2 ranks; OMP_NUM_THREADS per arm",
        },
        "tokens_per_s_median": tps,
        "tokens_per_s_all": {arm: [s["tokens_per_s"] for s in r] for arm, r in runs.items()},
        "other_cpu_share_all": {arm: [s["other_cpu_share"] for s in r] for arm, r in runs.items()},
        "val_loss": {arm: [s["val_loss"] for s in r] for arm, r in runs.items()},
        "torch_threads": {arm: r[0]["torch_threads"] for arm, r in runs.items()},
        "world_size": {arm: r[0]["world_size"] for arm, r in runs.items()},
        "exchanged_bytes_per_step": statistics.mean(
            s["exchanged_bytes_per_step"] for s in runs[two]
        ),
        "ratio_2x1_vs_1x2": tps[two] / tps["1 process x 2 threads"],
        "ratio_2x1_vs_1x1": tps[two] / tps[REFERENCES[0]] if REFERENCES[0] in tps else None,
        "ratio_2x1_ddp_vs_1x1": tps[REFERENCES[1]] / tps[REFERENCES[0]] if args.reference else None,
        "seconds": time.perf_counter() - start,
        "other_cpu_share": other_cpu_share(load),
    }


# ---- part 3: the NCCL path, one rank -----------------------------------------------------------
def cuda_part(args: argparse.Namespace, tok, vocab, work: Path) -> dict:
    if not torch.cuda.is_available():
        return {"status": "skipped: no CUDA"}
    if not dist.is_available() or not dist.is_nccl_available():
        return {"status": "skipped: torch has no NCCL"}
    device = torch.device("cuda", torch.cuda.current_device())
    try:
        torch.cuda.set_device(device)
        B, T, steps = args.cuda_batch, args.cuda_seq, args.cuda_steps
        ids = stdlib_tokens(tok, (WARM + steps) * B * T).view(WARM + steps, B, T)
        spec = table_spec(tok, vocab, args.cuda_rows)
        rows = NgramHasher(spec, vocab)(ids.view(-1, T))[0].view(WARM + steps, B, T, -1)
        log(f"cuda: table of {spec.layer_rows(0):,} rows, {WARM} + {steps} steps of {B} x {T}")
        init = f"tcp://127.0.0.1:{free_port()}"
        return {"status": "ran", **one_rank_check(spec, rows, work, device, init, warm=WARM, lr=LR)}
    except Exception as e:  # a report, not a crash: the other parts' numbers still count
        traceback.print_exc(file=sys.stderr)
        return {"status": f"failed: {type(e).__name__}: {e}"}


# ---- the run -----------------------------------------------------------------------------------
QUICK = {
    "rows": [int(1e5), int(1e6)],
    "steps": 3,
    "warmup": 1,
    "batch": 4,
    "seq": 256,
    "train_steps": 10,
    "repeats": 1,
    "files": 30,
    "reference": False,
    "eval_tokens": 1024,
    "cuda_rows": int(1e6),
    "cuda_steps": 5,
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"which of {','.join(PARTS)}")
    p.add_argument("--cuda", action="store_true", help="only the CUDA part (--parts cuda)")
    p.add_argument("--quick", action="store_true", help="small sizes, few steps: a smoke run")
    p.add_argument("--rows", default="1e5,1e6,1e7,1e8", help="approximate table rows (bytes)")
    p.add_argument("--steps", type=int, default=12, help="timed steps per size (bytes)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per size first (bytes)")
    p.add_argument("--batch", type=int, default=16, help="global batch, sequences (bytes)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (bytes)")
    p.add_argument("--cache-rows", type=int, default=1 << 17, help="hot rows per rank (bytes)")
    p.add_argument("--train-steps", type=int, default=60, help="engram train steps (throughput)")
    p.add_argument("--repeats", type=int, default=5, help="runs of each arm (throughput)")
    p.add_argument("--files", type=int, default=300, help="stdlib files to train on (throughput)")
    p.add_argument("--eval-tokens", type=int, default=4096, help="(throughput)")
    p.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="leave out the reference arms: 1 process x 1 thread, 2 ranks under DDP (throughput)",
    )
    p.add_argument("--cuda-rows", type=float, default=1e7, help="table rows (cuda)")
    p.add_argument("--cuda-batch", type=int, default=16)
    p.add_argument("--cuda-seq", type=int, default=2048)
    p.add_argument("--cuda-steps", type=int, default=20)
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--out", type=Path, default=Path("bench/results/distributed.json"))
    args = p.parse_args(argv)
    parts = ["cuda"] if args.cuda else [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"--parts: unknown {unknown}; choose from {','.join(PARTS)}")
    args.rows = [int(float(r)) for r in args.rows.split(",")]
    args.cuda_rows = int(args.cuda_rows)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)

    tok = load_tokenizer("deepseek")
    vocab = compress(tok)
    work = Path(tempfile.mkdtemp(prefix="engram-bench-dist-")) if args.work is None else args.work
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: dict = {}
    try:
        if "bytes" in parts:
            results["bytes"] = bytes_part(args, tok, vocab, work)
        if "throughput" in parts:
            results["throughput"] = throughput_part(args, work)
        if "cuda" in parts:
            results["cuda"] = cuda_part(args, tok, vocab, work / "cuda")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    if "bytes" in results:
        r = results["bytes"]
        print(f"Bytes exchanged per step by rank 0 of 2 (gloo), {args.batch} x {args.seq} tokens:")
        print(
            "            rows    bytes/step  bytes/crossing row  unique rows  crossing   step s"
            "  cache hits"
        )
        for n, v in sorted(r["by_rows"].items(), key=lambda kv: int(kv[0])):
            print(
                f"  {int(n):>14,}  {v['bytes_per_step']:>12,.0f}"
                f"  {v['bytes_per_crossing_row']:>18.2f}"
                f"  {v['unique_rows_global_per_step']:>11,.0f}"
                f"  {v['rows_crossing_rank0_per_step']:>8,.0f}  {v['step_s_median']:>7.4f}"
                f"  {v['cache_hit_rate_rank0']:>10.3f}"
            )
        matched = all(v["bytes_match_closed_form"] for v in r["by_rows"].values())
        print(
            f"  ratio largest/smallest: bytes {r['ratio_bytes_largest_smallest']:.3f}, "
            f"per crossing row {r['ratio_bytes_per_crossing_row_largest_smallest']:.3f}, "
            f"step time {r['ratio_step_s_largest_smallest']:.3f}; closed form matched: {matched}"
        )
    if "throughput" in results:
        r = results["throughput"]
        print(f"engram train, tiny recipe, {args.train_steps} steps, median of {args.repeats}:")
        for arm, tps in r["tokens_per_s_median"].items():
            print(f"  {arm:<24} {tps:>10,.0f} tokens/s")
        print(f"  ratio 2 ranks x 1 thread / 1 process x 2 threads: {r['ratio_2x1_vs_1x2']:.3f}")
        if r["ratio_2x1_vs_1x1"] is not None:
            print(f"  ratio 2 ranks x 1 thread / 1 process x 1 thread: {r['ratio_2x1_vs_1x1']:.3f}")
            ddp = r["ratio_2x1_ddp_vs_1x1"]
            print(f"  ratio 2 ranks x 1 thread, DDP / 1 process x 1 thread: {ddp:.3f}")
    if "cuda" in results:
        r = results["cuda"]
        if r["status"] == "ran":
            print(
                f"CUDA, one rank (cpu:gloo,cuda:nccl): outputs equal {r['outputs_equal']}, rows "
                f"equal {r['rows_and_state_equal_after']}, step ms {r['step_ms_median']}"
            )
        else:
            print(f"CUDA: {r['status']}")
    record = {
        "benchmark": "distributed",
        "machine": machine_info(),
        "config": {"parts": parts, "quick": args.quick},
        "results": results,
        "seconds": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
    sys.exit(0)
