"""`engram demo` runs end to end (a short version of what `make demo` runs)."""

from __future__ import annotations

import json
import math

from engram.demo import run_demo


def test_demo_runs_and_writes_a_summary(tmp_path):
    summary = run_demo(steps=8, out_dir=tmp_path, files=6)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["compression"]["compressed_vocab_size"] == 99_092
    arms = {a["name"]: a for a in saved["experiment"]["arms"]}
    assert set(arms) == {"bigram", "bigram+engram"}
    assert all(math.isfinite(a["val_loss"]) for a in arms.values())
    assert arms["bigram+engram"]["params"] > arms["bigram"]["params"]
    assert summary["experiment"]["steps"] == 8
