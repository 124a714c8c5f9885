"""`engram train` under torchrun (gloo on the CPU) against one process on the same global batch.

Each launch is the real command: `torchrun ... -m engram train ...`. N ranks see exactly the
batches one process sees, the backbone is data-parallel (FSDP2 or DDP), the tables are sharded
by rows over the ranks; so the loss of every step, the final weights and the validation loss
match one process up to float reduction order.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from small_runs import BASE, table_rows
from torch.distributed import TCPStore

from engram.checkpoint import read_manifest
from engram.cli import train_config
from engram.inference.load import load_trained
from engram.parallel import World, check_optimizer
from engram.train import _local_batch

STEPS = 30
# The tiny recipe's warm-up (50 steps): after a warm-up of 2 steps at lr 3e-3, float-order
# differences of 1e-7 grow past 1e-4 within 30 steps even between two runs of one process
# that differ only in how a sum is split (measured), which would test the chaos, not the code.
RUN = [*BASE, f"steps={STEPS}", "batch_size=6", "log_every=1", "eval_every=15"]
RUN += ["optim.warmup_steps=50"]
# Even so, MoE routing amplifies float order: a top-k choice that flips on a 1e-7 difference
# moves the loss by 1e-6..1e-5 at once. Measured over this run: two one-process runs whose
# gradients differ by 2e-13 (the MoE's sorted vs loop dispatch) drift up to 2.9e-5 apart; ranks,
# which start 1e-7 apart, reached 1.1e-4 at step 29. A real error (a lost row, a missing
# reduction, a wrong shard) shows at 1e-6 after one step (test_one_step_... below) and at 1e-2
# over a run, so the multi-step bar sits above the measured drift.
DRIFT = 3e-4
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engram_train(corpus: Path, out: Path, *args: str, ranks: int = 1, launch=()) -> list[str]:
    train = ["-m", "engram", "train", f"data={corpus}", f"out_dir={out}", *RUN, *args]
    if ranks == 1 and not launch:
        return [sys.executable, *train]
    launch = list(launch) or ["--standalone", f"--nproc-per-node={ranks}"]
    return [sys.executable, "-m", "torch.distributed.run", *launch, *train]


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    # The rank that failed first is the story; the others' tracebacks only say they lost it.
    first = [line for line in done.stderr.splitlines() if line.startswith("[rank0]")]
    assert done.returncode == 0, "\n".join(first[-40:]) + "\n...\n" + done.stderr[-3000:]
    return done


def _losses(out: Path) -> tuple[list[float], list[float], set[int]]:
    """(training loss per step, validation losses, world sizes) from a run's metrics."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if "loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    return train, val, {r["world_size"] for r in records}


def _close(a: list[float], b: list[float], rtol: float) -> None:
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        assert abs(x - y) <= rtol * abs(y), f"step {step}: {x} vs {y}"


@pytest.fixture(scope="module")
def corpus(stdlib_corpus) -> Path:
    return stdlib_corpus(30)


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    _run(_engram_train(corpus, out, "ckpt_every=10"))  # checkpoints at 20 and 30 are kept
    return out


@pytest.fixture(scope="module")
def one_step(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one-step") / "run"
    _run(_engram_train(corpus, out, "steps=1"))
    return out


PLANS = {
    "2-fsdp-device": (2, "parallel.dense=fsdp", "tables.placement=device"),
    "3-ddp-host": (3, "parallel.dense=ddp", "tables.placement=host"),
    "2-fsdp-disk-cache": (2, "tables.placement=disk", "tables.cache_rows=4096"),
}


@pytest.mark.parametrize("plan", PLANS)
def test_one_step_on_ranks_is_one_step_of_one_process(corpus, one_step, tmp_path, plan):
    ranks, *args = PLANS[plan]
    out = tmp_path / "run"
    _run(_engram_train(corpus, out, "steps=1", *args, ranks=ranks))
    mine, ref = _weights(out), _weights(one_step)
    # A shard is always a row store; one process may keep a device table in the model.
    assert {k for k in ref.keys() - mine.keys() if not k.endswith(".table.weight")} == set()
    for name in mine:
        torch.testing.assert_close(mine[name], ref[name], rtol=0, atol=1e-6, msg=name)
    # The tables, read back as one model (the shards joined), row for row.
    mine, ref = (table_rows(o) for o in (out, one_step))
    assert mine.keys() == ref.keys() and mine
    for name in ref:
        torch.testing.assert_close(mine[name], ref[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("plan", ["2-fsdp-device", "3-ddp-host"])
def test_ranks_train_like_one_process(corpus, one_process, tmp_path, plan):
    ranks, *args = PLANS[plan]
    out = tmp_path / "run"
    done = _run(_engram_train(corpus, out, *args, ranks=ranks))
    summaries = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # rank 0 alone reports
    train, val, worlds = _losses(out)
    ref_train, ref_val, _ = _losses(one_process)
    assert worlds == {ranks} and len(train) == STEPS
    _close(train, ref_train, DRIFT)
    _close(val, ref_val, DRIFT)


def _weights(out: Path) -> dict:
    return load_file(str(Path(read_manifest(out)["path"]) / "model.safetensors"))


def test_two_nodes_on_localhost_match_two_local_ranks(corpus, tmp_path):
    """`--nnodes 2`, one process each, meeting by a c10d rendezvous on 127.0.0.1.

    The rendezvous store lives in this process, as a standalone store would on a cluster. Left
    to the nodes, the first one's agent hosts it and takes it down when it exits, and the other
    agent, still polling it, fails with a RendezvousConnectionError (seen once in a full run).
    """
    port = _free_port()
    store = TCPStore("127.0.0.1", port, is_master=True, multi_tenant=True)
    outs = {name: tmp_path / name for name in ("nodes", "local")}
    common = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d"]
    common += [f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=engram-test"]
    common += ["--rdzv-conf=is_host=false"]  # both agents are the store's clients
    nodes = [
        subprocess.Popen(
            _engram_train(corpus, outs["nodes"], "steps=6", launch=common),
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=240)
        assert node.returncode == 0, err[-4000:]
    del store  # only now: both nodes are done with it
    _run(_engram_train(corpus, outs["local"], "steps=6", ranks=2))
    nodes_train, nodes_val, worlds = _losses(outs["nodes"])
    local_train, local_val, _ = _losses(outs["local"])
    assert worlds == {2}
    _close(nodes_train, local_train, 1e-6)
    _close(nodes_val, local_val, 1e-6)


def _worker_pids(launcher: subprocess.Popen) -> list[int]:
    """The ranks torchrun started (its child processes), from /proc."""
    out = subprocess.run(
        ["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True
    ).stdout.split()
    return [int(pid) for pid in out]


def test_a_killed_rank_ends_the_job_and_resume_at_another_world_size_continues(
    corpus, one_process, tmp_path
):
    out = tmp_path / "run"
    job = subprocess.Popen(
        _engram_train(corpus, out, "ckpt_every=10", ranks=2),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    while not (out / "checkpoints" / "step-0000010" / "manifest.json").exists():
        assert job.poll() is None and time.monotonic() < deadline, "no checkpoint at step 10"
        time.sleep(0.05)
    workers = _worker_pids(job)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)  # one rank dies mid-run
    _, err = job.communicate(timeout=120)
    assert job.returncode != 0  # torchrun tore the job down
    step = read_manifest(out)["step"]
    assert 10 <= step < STEPS
    _run(_engram_train(corpus, out, "--resume"))  # one process picks it up
    train, val, worlds = _losses(out)
    ref_train, ref_val, _ = _losses(one_process)
    assert worlds == {1, 2}
    _close(val[-1:], ref_val[-1:], 1e-4)
    # The resumed process kept the shards' table in a row store (its plan would embed it):
    # the run still loads as one model, its table an embedding again.
    assert all(m.table is not None for m in load_trained(out, device="cpu").model.engram_layers)


def test_the_global_batch_must_split_evenly_over_the_ranks(tmp_path):
    config = train_config(None, [f"out_dir={tmp_path}", "batch_size=6"])
    assert _local_batch(config, World(rank=1, size=3)) == 2
    with pytest.raises(ValueError, match=r"batch_size=6 .* divisible by the 4 ranks"):
        _local_batch(config, World(rank=0, size=4))


def test_a_sharded_backbone_cannot_use_muon():
    with pytest.raises(ValueError, match=r"parallel\.dense=ddp"):
        check_optimizer("fsdp", "muon")
    check_optimizer("ddp", "muon")


def _rewind(run: Path, copy: Path, step: int) -> Path:
    """A copy of `run` whose latest checkpoint is the one of `step` (later ones deleted)."""
    shutil.copytree(run, copy)
    for ckpt in (copy / "checkpoints").glob("step-*"):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    (copy / "checkpoints" / "latest").write_text(f"step-{step:07d}\n")
    return copy


def test_resume_at_other_world_sizes_continues_the_same_training(corpus, one_process, tmp_path):
    """One process (its table an embedding) -> 3 ranks (shards) -> 2 ranks (other shards)."""
    _, ref_val, _ = _losses(one_process)
    three = _rewind(one_process, tmp_path / "three", 20)
    _run(_engram_train(corpus, three, "ckpt_every=5", "--resume", ranks=3))
    assert _losses(three)[2] == {1, 3}
    _close(_losses(three)[1][-1:], ref_val[-1:], 1e-4)
    two = _rewind(three, tmp_path / "two", 25)
    _run(_engram_train(corpus, two, "--resume", ranks=2))
    _close(_losses(two)[1][-1:], ref_val[-1:], 1e-4)


def test_resuming_with_another_spec_is_refused_on_every_rank(corpus, one_process, tmp_path):
    run = _rewind(one_process, tmp_path / "run", 20)
    cmd = _engram_train(corpus, run, "model.engram.spec.seed=5", "--resume", ranks=2)
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    refusals = [line for line in done.stderr.splitlines() if "engram train: error:" in line]
    assert len(refusals) == 2 and all("hash spec differs" in line for line in refusals)
    assert read_manifest(run)["step"] == 20  # nothing written
