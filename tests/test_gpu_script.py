"""bench/gpu.sh, the one call a lent GPU runs, works before a GPU sees it: its `--cpu-smoke`
mode runs every step at tiny sizes on this CPU and writes every record the GPU run writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
RECORDS = ("cuda_tests", "gpu_train", "gpu_decode")


def _smoke(tmp_path: Path, *flags: str, **env: str) -> Path:
    """Run `bash bench/gpu.sh --cpu-smoke FLAGS`; the folder its records went to."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    done = subprocess.run(
        ["bash", "bench/gpu.sh", "--cpu-smoke", *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_cpu_smoke_writes_every_record(tmp_path):
    out = _smoke(tmp_path)
    log = (out / "gpu.log").read_text()
    assert "mode cpu" in log and "== failed" not in log
    for name in RECORDS:
        record = json.loads((out / f"{name}.json").read_text())
        assert record["benchmark"] == name
        assert {"machine", "commit", "config", "results"} <= set(record)
    tests = json.loads((out / "cuda_tests.json").read_text())
    assert tests["pytest_exit"] == 0 and tests["results"]["failed"] == 0
    # Without a GPU the CUDA-only tests skip; the ones checking the refusal of cuda run.
    assert any("test_cuda_matches_cpu" in name for name in tests["skipped"])
    train = json.loads((out / "gpu_train.json").read_text())["results"]
    assert train["with"]["tokens_per_s"] > 0 and train["without"]["mfu"] is None  # a CPU
    decode = json.loads((out / "gpu_decode.json").read_text())
    assert decode["config"]["batch"] == 1 and decode["results"]["ratio"] > 0
    assert decode["results"]["ratio_compiled"] > 0  # the AOT-compiled arm ran
    # Each benchmark's last line of output is its record.
    last = [line for line in log.splitlines() if line.startswith('{"benchmark": "gpu_decode"')]
    assert json.loads(last[-1]) == decode


def test_cpu_smoke_of_the_captured_part(tmp_path):
    """`--captured`, the second call: the captured decoder's CUDA tests (skipped here) and the
    decode benchmark with both models' whole steps captured, checked against eager logits."""
    # A fresh machine's cache: it compiles.
    out = _smoke(tmp_path, "--captured", ENGRAM_CACHE_DIR=str(tmp_path / "cache"))
    assert "part captured" in (out / "gpu.log").read_text()
    tests = json.loads((out / "cuda_tests.json").read_text())
    assert tests["pytest_exit"] == 0 and tests["results"]["failed"] == 0
    assert any("cuda-graph" in name for name in tests["skipped"])
    decode = json.loads((out / "gpu_decode_captured.json").read_text())
    assert decode["config"]["captured"] and not decode["config"]["cuda_graph"]  # a CPU
    results = decode["results"]
    assert results["ratio_captured"] > 0 and results["captured_with"]["tokens_per_s"] > 0
    assert max(results["captured_max_logit_error"].values()) < 1e-4


def test_a_wrong_argument_is_refused():
    done = subprocess.run(
        ["bash", "bench/gpu.sh", "--gpu"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "usage: bash bench/gpu.sh [--cpu-smoke] [--captured]" in done.stderr
