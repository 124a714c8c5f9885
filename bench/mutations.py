"""Mutation check: does the Hugging Face decoding suite fail when one piece of state handling is
removed?

`docs/hf.md` says that each exact-decoding test of `add_engram` fails when one piece of the
Engram state handling is removed. This script makes that claim reproducible: for each mutation
below it edits one line of `src/engram/hf/decoding.py` in place, runs the suite
(`tests/test_hf_attach.py`), records whether the suite failed ("caught"), and restores the file
(also on Ctrl-C). It first checks that the unmutated suite passes, and that the source still
holds each mutation's line exactly once, so a refactor that moves a line is reported, not
silently skipped.

    .venv/bin/python bench/mutations.py          # about a minute on 2 cores

The last line of output is one JSON record (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from engram.experiments.report import machine_info, write_json

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "src" / "engram" / "hf" / "decoding.py"
SUITE = ["tests/test_hf_attach.py"]
OUT = ROOT / "bench" / "results" / "mutations.json"

# name: (the line as it is, the line with that piece of state handling removed)
MUTATIONS = {
    "no N-gram history update": (
        "state.hash_state, state.length = new_history, state.length + T",
        "state.length = state.length + T",
    ),
    "no pads to the hasher": (
        "hasher.hash_stacked(ids, history, pads=pads)",
        "hasher.hash_stacked(ids, history, pads=None)",
    ),
    "no 'last token was EOS'": (
        "state.last_eos = torch.where(real.any(dim=1), ids[:, -1] == eos, state.last_eos)",
        "state.last_eos = state.last_eos",
    ),
    "no document starts in the conv": (
        "y = engram(hidden, rows, starts, pads, window)",
        "y = engram(hidden, rows, None, pads, window)",
    ),
    "no pads to the conv": (
        "y = engram(hidden, rows, starts, pads, window)",
        "y = engram(hidden, rows, starts, None, window)",
    ),
    "no conv window": (
        "y = engram(hidden, rows, starts, pads, window)",
        "y = engram(hidden, rows, starts, pads, None)",
    ),
    "no beam reordering": (
        "        super().reorder_cache(beam_idx)\n        self._engram_select(beam_idx)",
        "        super().reorder_cache(beam_idx)",
    ),
}


def run_suite() -> tuple[bool, float]:
    """(whether the suite passed, seconds)."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *SUITE]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return done.returncode == 0, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    original = TARGET.read_text()
    for name, (line, _) in MUTATIONS.items():
        if original.count(line) != 1:
            raise SystemExit(f"{name}: {TARGET.name} holds its line {original.count(line)} times")
    passed, seconds = run_suite()
    if not passed:
        raise SystemExit("the unmutated suite fails: fix it before checking mutations")
    results = {}
    try:
        for name, (line, mutated) in MUTATIONS.items():
            TARGET.write_text(original.replace(line, mutated))
            survived, took = run_suite()
            results[name] = {"caught": not survived, "seconds": round(took, 1)}
            print(f"{'caught' if not survived else 'MISSED'}: {name}", file=sys.stderr)
    finally:
        TARGET.write_text(original)
    record = {
        "bench": "mutations",
        "machine": machine_info(),
        "suite": SUITE,
        "target": str(TARGET.relative_to(ROOT)),
        "baseline_seconds": round(seconds, 1),
        "mutations": results,
        "caught": sum(r["caught"] for r in results.values()),
        "total": len(results),
    }
    write_json(args.out, record)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
