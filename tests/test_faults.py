"""Real faults, injected into real processes: `engram train` SIGKILLed at random moments.

A run with a checkpoint every two steps is killed (SIGKILL: no handler runs, no buffer is
flushed) at a seeded random moment after it starts training, again and again, each time resumed
with `--resume`, until one attempt finishes. Kills land mid-step, mid-save, mid table write-back
and during prefetch. Whatever they interrupt, the finished run must hold the same weights, table
rows and validation loss, bit for bit, as a run never interrupted on this machine, and no
uncommitted checkpoint folder or `latest` file may be left behind.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from small_runs import BASE, table_rows

from engram.checkpoint import read_manifest, verify_files

STEPS = 16
KILLS = 3  # attempts killed before one is let finish
RUN = [*BASE, f"steps={STEPS}", "ckpt_every=2", "log_every=1", f"eval_every={STEPS}"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: the same sums in every attempt
PLACEMENTS = {
    "device": [],
    "host": ["tables.placement=host"],
    "disk+cache": ["tables.placement=disk", "tables.cache_rows=2048"],
}


def _command(corpus: Path, out: Path, placement: list[str], resume: bool) -> list[str]:
    args = [f"data={corpus}", f"out_dir={out}", *RUN, *placement]
    return [sys.executable, "-m", "engram", "train", *args, *(["--resume"] if resume else [])]


def _logged(out: Path) -> int:
    """Bytes of the run's metrics so far (attempts append to one file)."""
    metrics = out / "metrics.jsonl"
    return metrics.stat().st_size if metrics.exists() else 0


def _kill_at_random(cmd: list[str], out: Path, rng: random.Random) -> int | None:
    """Run `cmd`; SIGKILL it a random moment after this attempt logs its first training step
    (so kills land in the loop, not in start-up). Its exit status, or None when killed."""
    before = _logged(out)
    job = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while job.poll() is None and _logged(out) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.4))  # a step takes tens of ms: kills land all over
    if job.poll() is None:
        job.send_signal(signal.SIGKILL)
        job.wait()
        return None
    _, err = job.communicate()
    assert job.returncode == 0, err.decode()[-3000:]
    return 0


def _curve(out: Path) -> list[tuple]:
    """The run's logged training and validation curve, without the timings and cache counts
    (a resumed cache starts cold)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = ("step", "tokens", "loss", "lr", "grad_norm", "val_loss")
    return [tuple(r.get(key) for key in keys) for r in records]


def _final(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """(weights, every table's rows, last validation loss) of a finished run."""
    manifest = read_manifest(out)
    assert manifest["step"] == STEPS
    weights = load_file(str(Path(manifest["path"]) / "model.safetensors"))
    rows = table_rows(out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return weights, rows, [r["val_loss"] for r in records if "val_loss" in r][-1]


def _assert_same_run(out: Path, straight: Path) -> None:
    """Bit for bit: weights, every table row, the last validation loss."""
    weights, rows, val = _final(out)
    ref_weights, ref_rows, ref_val = _final(straight)
    assert val == ref_val
    assert weights.keys() == ref_weights.keys() and rows.keys() == ref_rows.keys()
    for name in ref_weights:
        assert torch.equal(weights[name], ref_weights[name]), name
    for name in ref_rows:
        assert torch.equal(rows[name], ref_rows[name]), name


@pytest.fixture(scope="module")
def corpus(stdlib_corpus) -> Path:
    return stdlib_corpus(80)


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_killed_at_random_and_resumed_trains_bit_for_bit(corpus, tmp_path, placement):
    straight = tmp_path / "straight"
    done = subprocess.run(_command(corpus, straight, PLACEMENTS[placement], False), env=ENV)
    assert done.returncode == 0
    rng = random.Random(f"kill-{placement}")
    out, kills = tmp_path / "killed", 0
    for attempt in range(4 * KILLS):
        if kills == KILLS:
            break
        status = _kill_at_random(
            _command(corpus, out, PLACEMENTS[placement], attempt > 0), out, rng
        )
        kills += status is None
        if status == 0:  # it finished before its kill
            break
    assert kills >= 1, "no attempt was interrupted"
    # Finish the run (resuming a finished run changes nothing).
    done = subprocess.run(_command(corpus, out, PLACEMENTS[placement], True), env=ENV)
    assert done.returncode == 0
    _assert_same_run(out, straight)
    # Each resume dropped what the killed attempt logged past its checkpoint: one clean curve.
    assert _curve(out) == _curve(straight)
    leftovers = [*(out / "checkpoints").glob(".tmp-*"), *(out / "checkpoints").glob(".latest-*")]
    assert not leftovers


# ---- a full disk -------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs: a file system that fills up for real (needs root; skipped without)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)])
    if made.returncode != 0:
        pytest.skip("this machine does not let tests mount a tmpfs")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def _fill(disk: Path, leave: int) -> Path:
    """A ballast file leaving about `leave` bytes free on `disk`."""
    ballast = disk / "ballast"
    stat = os.statvfs(disk)
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))
    return ballast


def test_a_full_disk_stops_training_with_one_line_and_the_last_checkpoint_resumes(
    corpus, tmp_path, small_disk
):
    placement = PLACEMENTS["host"]  # a table saved into every checkpoint
    straight = tmp_path / "straight"
    assert subprocess.run(_command(corpus, straight, placement, False), env=ENV).returncode == 0
    ckpt = Path(read_manifest(straight)["path"])
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    out = small_disk / "run"
    # Room for the run's own files and two checkpoints (checkpoints are kept two at a time),
    # not for a third: the save at step 6 meets a full disk.
    ballast = _fill(small_disk, int(2.6 * size) + 256 * 1024)
    done = subprocess.run(_command(corpus, out, placement, False), env=ENV, capture_output=True)
    err = done.stderr.decode().strip().splitlines()
    assert done.returncode == 2, done.stderr.decode()[-3000:]
    assert "no space left on the device" in err[-1] and "Traceback" not in done.stderr.decode()
    last = read_manifest(out)  # the last complete checkpoint: intact, every file verified
    verify_files(last)
    assert 2 <= last["step"] < STEPS and f"step-{last['step']:07d}" in err[-1]
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the half-written one is gone
    ballast.unlink()  # the user frees space and resumes
    done = subprocess.run(_command(corpus, out, placement, True), env=ENV, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    _assert_same_run(out, straight)


def test_a_live_disk_table_that_fills_its_disk_stops_with_one_line_and_resumes(
    corpus, tmp_path, small_disk
):
    """The live table's rows get their blocks as they are first written: on a full disk that
    was a SIGBUS (no message, exit status -7); now the run stops with one line, and resumes
    from its last checkpoint once there is space."""
    big = ["tables.placement=disk", "model.engram.spec.base_sizes=50000,50000"]  # ~19 MB rows
    straight = tmp_path / "straight"
    done = subprocess.run(_command(corpus, straight, big, False), env=ENV, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    out, live = tmp_path / "run", [*big, f"tables.path={small_disk}"]  # out_dir has room
    ballast = _fill(small_disk, 4 * 2**20)  # room for a few steps' new rows, not sixteen
    done = subprocess.run(_command(corpus, out, live, False), env=ENV, capture_output=True)
    err = done.stderr.decode().strip().splitlines()
    assert done.returncode == 2, done.stderr.decode()[-3000:]
    assert "Traceback" not in done.stderr.decode()
    assert "no space left on the device" in err[-1] and "layer1.table" in err[-1], err[-1]
    last = read_manifest(out)
    assert 2 <= last["step"] < STEPS and f"step-{last['step']:07d}" in err[-1], err[-1]
    ballast.unlink()
    done = subprocess.run(_command(corpus, out, live, True), env=ENV, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    _assert_same_run(out, straight)
