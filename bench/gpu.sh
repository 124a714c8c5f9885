#!/usr/bin/env bash
# Issue 16's GPU numbers in ONE call of a lent GPU machine (at most 500 s: every step has a
# timeout): the CUDA tests, then training and decoding tokens/s with and without Engram on the
# `gpu` preset (bench/gpu_train.py, bench/gpu_decode.py). Everything printed goes to
# $OUT/gpu.log; each step writes one JSON under $OUT: cuda_tests.json, gpu_train.json,
# gpu_decode.json (each benchmark's record is also the last line it prints).
#
#   bash bench/gpu.sh               # on the GPU machine, with its own python3 and torch
#   bash bench/gpu.sh --cpu-smoke   # the same steps at tiny sizes on this CPU (< 1 minute)
#   bash bench/gpu.sh --captured    # a second call: whole decode steps captured, CUDA graphs
#
# `--captured` runs the captured decoder's CUDA tests and bench/gpu_decode.py with its captured
# pair at batch 1 (gpu_decode_captured.json). How long the `gpu` preset's whole step takes to
# compile is not yet measured, so it is a call of its own (at most 420 s), after the first.
#
# The `gpu` preset uses the DeepSeek tokenizer, whose package the GPU image lacks: run
# `make devdeps` here once and name .devdeps in the device tool's `carry`.
# Not run here, a call of its own of up to 9 minutes (the command: docs/benchmarks.md, GPU):
#   engram study allocation --recipe recipes/gpu-allocation.toml
# bench/device_check.sh (CUDA training with resume, table placement, the NCCL path) and
# bench/cuda_check.py (the hasher and the Engram layer alone) stay separate calls.
set -uo pipefail

mode=gpu
part=main
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) mode=cpu ;;
    --captured) part=captured ;;
    *) echo "usage: bash bench/gpu.sh [--cpu-smoke] [--captured]" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d -t engram-gpu.XXXXXX)}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/.devdeps${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$mode" = gpu ]; then
  # A fresh machine: caches (the compressed DeepSeek vocabulary) go to its own disk.
  export ENGRAM_CACHE_DIR=${ENGRAM_CACHE_DIR:-/tmp/engram-cache}
  device=cuda
  train_sizes=(--preset gpu --batch 4 --seq 2048 --warmup 3 --steps 12)
  decode_sizes=(--preset gpu --prompt 128 --steps 64 --repeats 5)
else
  device=cpu
  train_sizes=(--preset tiny --batch 2 --seq 64 --warmup 1 --steps 2)
  decode_sizes=(--preset tiny --prompt 32 --steps 8 --repeats 2)
fi
# The files holding CUDA-only tests (skipped without a GPU), and the keyword that picks them.
CUDA_TESTS=(tests/test_hashing.py tests/test_module.py tests/test_tables.py tests/test_optim.py
  tests/test_placed_tables.py tests/test_errors.py tests/test_compiled_decoding.py)
failed=()

# Run one step (a command that carries its own `timeout`, -k: KILL where TERM is ignored),
# timing it; remember a failure and carry on, so one broken step leaves the others' numbers.
step() {
  local name=$1
  shift
  echo "== $name"
  local start=$SECONDS
  "$@"
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

# pytest's junit XML -> cuda_tests.json: counts, the names of what failed or skipped, the machine.
tests_json() {
  "$PYTHON" - "$1" "$2" "$OUT/cuda_tests.json" <<'EOF'
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

from engram.experiments.report import machine_info

xml, rc, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
cases = ET.parse(xml).getroot().iter("testcase") if Path(xml).stat().st_size else []
outcome = {"passed": [], "failed": [], "skipped": []}
for case in cases:
    name = f"{case.get('classname')}::{case.get('name')}"
    kind = "failed" if case.find("failure") is not None or case.find("error") is not None else (
        "skipped" if case.find("skipped") is not None else "passed")
    outcome[kind].append(name)
machine = machine_info()
record = {"benchmark": "cuda_tests", "machine": machine, "commit": machine["commit"],
          "config": {"selection": "-k 'cuda or accelerator'"}, "pytest_exit": rc,
          "results": {k: len(v) for k, v in outcome.items()}, **outcome}
out.write_text(json.dumps(record, indent=2) + "\n")
print(json.dumps(record))
EOF
}

# run_tests SECONDS FILE...: the CUDA-only tests of those files.
run_tests() {
  local xml limit=$1
  shift
  xml=$(mktemp)
  timeout -k 10 "$limit" "$PYTHON" -m pytest -q -p no:cacheprovider -k "cuda or accelerator" \
    --junitxml "$xml" "$@"
  local rc=$?
  tests_json "$xml" "$rc"
  rm -f "$xml"
  return "$rc"
}

main() {
  echo "engram bench/gpu.sh: mode $mode, part $part, OUT=$OUT, commit $(git rev-parse --short HEAD 2>/dev/null)"
  [ "$mode" = gpu ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available())"
  local has_cuda="import sys, torch; sys.exit(not torch.cuda.is_available())"
  if [ "$mode" = gpu ] && ! "$PYTHON" -c "$has_cuda"; then
    echo "no CUDA device here: bash bench/gpu.sh --cpu-smoke runs the same steps on a CPU"
    return 2
  fi
  if [ "$part" = captured ]; then
    step "CUDA tests of the captured decoder" run_tests 150 tests/test_captured_decoding.py
    step "decode tokens/s, with and without Engram, batch 1, captured" timeout -k 10 260 \
      "$PYTHON" bench/gpu_decode.py "${decode_sizes[@]}" --device "$device" --batch 1 \
      --captured --out "$OUT/gpu_decode_captured.json"
  else
    step "CUDA tests" run_tests 170 "${CUDA_TESTS[@]}"
    step "training tokens/s, with and without Engram" timeout -k 10 180 "$PYTHON" \
      bench/gpu_train.py "${train_sizes[@]}" --device "$device" --precision bf16 --fused \
      --out "$OUT/gpu_train.json"
    step "decode tokens/s, with and without Engram, batch 1" timeout -k 10 150 "$PYTHON" \
      bench/gpu_decode.py "${decode_sizes[@]}" --device "$device" --batch 1 \
      --out "$OUT/gpu_decode.json"
  fi
  if [ "${#failed[@]}" -gt 0 ]; then
    printf '== failed: %s\n' "${failed[@]}"
    return 1
  fi
  echo "== done: $(cd "$OUT" && ls | tr "\n" " ")"
}

main 2>&1 | tee "$OUT/gpu.log"
