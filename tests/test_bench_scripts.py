"""Benchmarks whose long runs cannot be in the suite, run here at tiny sizes so that a change to
the code they wrap breaks a test rather than the next long run (`bench/huge_table.py` once
failed on its first resume after `Run._resume` took an argument)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from engram.hashing import NgramHasher
from engram.spec import SpecConfig, resolve

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "bench"))  # as a benchmark run as a script finds its siblings

from distributed_check import free_port, one_rank_check  # noqa: E402


def test_huge_table_trains_resumes_and_controls_at_a_tiny_size(tmp_path):
    result = tmp_path / "huge_table.json"
    args = ["--preset", "tiny", "--tokenizer", "bpe:512", "--table-gb", "0.005", "--steps", "2"]
    args += ["--resume-steps", "1", "--cache-rows", "20000", "--out", str(tmp_path / "runs")]
    args += ["--control", "--control-gb", "0.002", "--control-steps", "1"]
    done = subprocess.run(
        [sys.executable, "bench/huge_table.py", *args, "--result", str(result)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(result.read_text())["results"]
    resume = results["huge"]["parts"]["resume"]
    assert resume["restore"]["loss_matches"] and resume["final_step"] == 3
    assert results["huge"]["parts"]["train"]["tables"]["layer1"]["store"]["misses"] > 0
    assert results["control"]["val_loss_difference"] == 0.0  # host and disk: the same arithmetic
    assert not (tmp_path / "runs" / "huge").exists()  # deleted without --keep


@pytest.mark.skipif(not dist.is_available(), reason="torch without torch.distributed")
def test_sharded_lookup_of_one_rank_matches_the_unsharded_table_on_cpu(
    tmp_path, deepseek, deepseek_vocab
):
    """The GPU's NCCL check (`bench/distributed.py --cuda`), run with gloo on the CPU."""
    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    config = SpecConfig(
        tokenizer="deepseek",
        layer_ids=(0,),
        orders=(2, 3),
        heads_per_order=2,
        base_sizes=(211, 211),
        row_dim=4,
    )
    spec = resolve(config, tokenizer=deepseek, vocab=deepseek_vocab)
    ids = torch.randint(0, 5000, (4 * 2, 16), generator=torch.Generator().manual_seed(0))
    rows = NgramHasher(spec, deepseek_vocab)(ids)[0].view(4, 2, 16, -1)
    init = f"tcp://127.0.0.1:{free_port()}"
    out = one_rank_check(spec, rows, tmp_path, torch.device("cpu"), init, backend="gloo", warm=1)
    assert out["outputs_equal"] and out["rows_and_state_equal_after"]
    assert out["touched_rows"] > 0 and out["exchanged_bytes"] == 0  # one rank: nothing leaves
    assert out["config"]["steps"] == 3 and not dist.is_initialized()
