"""Part 3 of `distributed.py`: the NCCL code path with one rank, checked against no sharding.

One process joins a one-rank group (`cpu:gloo,cuda:nccl` on a GPU: ids over gloo, rows and
gradients over NCCL) and reads one Engram table through the sharded lookup
(`ShardGroup(0, 1, group)`), and the same table unsharded, batch by batch, both with row-wise
Adagrad: outputs must be equal at every step and the rows and their state after the last. Both
arms are timed, interleaved. On a CPU with gloo the same function checks this code itself.
"""

from __future__ import annotations

import socket
import statistics
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engram.module import HashedMemory, lazy_tables
from engram.spec import HashSpec
from engram.tables.base import ALL
from engram.tables.lookup import global_ids
from engram.tables.placed import PlacedTables
from engram.tables.plan import TablePlan
from engram.tables.sharded import TRAFFIC, ShardGroup


def free_port() -> int:
    """A TCP port free on this host now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_rank_check(
    spec: HashSpec,
    rows: torch.Tensor,
    work: Path,
    device: torch.device,
    init_method: str,
    backend: str = "cpu:gloo,cuda:nccl",
    warm: int = 2,
    lr: float = 1e-3,
) -> dict[str, Any]:
    """A sharded table of one rank against the same table unsharded, on `device`, over the
    batches `rows` [steps, B, T, H] of `spec`'s one layer: equal outputs and rows after every
    step, and each one's step time past the first `warm` steps. (On the CPU with gloo it checks
    this code itself: tests/test_bench_scripts.py.)"""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    total, B, T, _ = rows.shape
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=120),
    )
    arms: dict[str, tuple[HashedMemory, PlacedTables]] = {}
    try:
        # The same row store and optimiser on both sides (a device table with Adam would stay
        # an nn.Embedding unsharded): only the lookup differs.
        plan = TablePlan(placement="device", optimizer="adagrad")
        for arm in ("unsharded", "sharded"):
            torch.manual_seed(0)
            with lazy_tables():
                memory = HashedMemory(spec, 0, 1.0)
            sharding = ShardGroup(0, 1, dist.group.WORLD) if arm == "sharded" else None
            tables = PlacedTables([memory], plan, work / arm, device, sharding=sharding)
            memory.to(device)  # its offsets; the table (meta until placed) is the store's now
            arms[arm] = (memory, tables)
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        equal_out, max_diff = True, 0.0
        TRAFFIC.reset()
        for step in range(total):
            batch = rows[step].to(device)
            outs = {}
            for arm in list(arms) if step % 2 == 0 else list(reversed(arms)):
                memory, tables = arms[arm]
                sync()
                t0 = time.perf_counter()
                out = memory.lookup(batch)
                out.square().mean().backward()
                tables.step(lr)
                sync()
                if step >= warm:
                    times[arm].append(time.perf_counter() - t0)
                outs[arm] = out.detach()
            equal_out &= torch.equal(outs["sharded"], outs["unsharded"])
            max_diff = max(max_diff, (outs["sharded"] - outs["unsharded"]).abs().max().item())
        offsets = torch.tensor(spec.layer_offsets(0), dtype=torch.int64)
        touched = torch.unique(global_ids(rows, offsets))
        stores = {arm: t.tables["layer0"].store for arm, (_, t) in arms.items()}
        after = {arm: s.read(touched.to(s.device), ALL).cpu() for arm, s in stores.items()}
        ms = {arm: statistics.median(t) * 1e3 for arm, t in times.items()}
        return {
            "config": {
                "backend": backend,
                "world": 1,
                "device": str(device),
                "rows": spec.layer_rows(0),
                "batch": B,
                "seq": T,
                "warmup_steps": warm,
                "steps": total - warm,
                "placement": "device",
                "optimizer": "row-wise adagrad",
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            },
            "outputs_equal": equal_out,
            "outputs_max_abs_diff": max_diff,
            "rows_and_state_equal_after": torch.equal(after["sharded"], after["unsharded"]),
            "rows_max_abs_diff_after": (after["sharded"] - after["unsharded"]).abs().max().item(),
            "touched_rows": int(touched.numel()),
            "exchanged_bytes": TRAFFIC.sent + TRAFFIC.received,  # one rank: nothing leaves it
            "step_ms_median": ms,
            "ratio_sharded_vs_unsharded_time": ms["sharded"] / ms["unsharded"],
        }
    finally:
        for _, tables in arms.values():
            tables.close()
        dist.destroy_process_group()
