"""A pretrained Hugging Face Llama with an Engram table larger than RAM, through `engram train`.

1. `python -m engram.hf.tiny` writes a small Llama (`--hidden-size`, `--layers`) with a BPE of
   the default corpus: the "pretrained" model (`base.path`).
2. `engram train --recipe recipes/hf-llama.toml` trains it with Engram at decoder layer 1, the
   spec's `base_sizes` scaled so that the table (rows x 3 x row_dim x 4 bytes: the row and
   RowAdam's m and v) is at least `--table-gb` GB (10^9 bytes), on disk behind a hot-row cache
   of `--cache-rows` rows, for `--steps` steps with a checkpoint halfway.
3. Resume: the run is rewound in place to its halfway checkpoint (the last one removed, `latest`
   pointed back) and `--resume`d to the end: its validation loss must equal step 2's.
4. Generation: the trained run is loaded (`load_trained`: the table mapped read-only from the
   checkpoint) and `engram.inference.generate` (cached decoding) must give what greedy decoding
   by full forwards gives, on two prompts.
5. Control, in the same run: the same model with a `--control-gb` table in host memory (fits
   in RAM), the same steps: the disk arm's tokens/s over the control's.
Peak resident memory (VmHWM) of each `engram train` process is sampled every 0.2 s.
Writes the JSON record (--result); its last line of stdout is that record.

    OMP_NUM_THREADS=1 python bench/hf_huge_table.py                 # 32 GB, 200 steps
    python bench/hf_huge_table.py --table-gb 0.2 --steps 20 --result /tmp/hf.json   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from system_probes import allocated

from engram.experiments.report import machine_info, write_json
from engram.inference import SamplingConfig, generate
from engram.inference.load import load_trained

ROOT = Path(__file__).resolve().parent.parent
RECIPE = str(ROOT / "recipes" / "hf-llama.toml")
HEADS, ROW_DIM = 8, 16  # the recipe's spec: orders 2 and 3, 4 heads each, 16-wide rows
PROMPTS = ["def __init__(self", "import os\n\n\ndef main("]


def base_sizes(gb: float) -> int:
    """The per-order base size whose 8 prime-sized heads hold >= `gb` GB of records."""
    return math.ceil(gb * 1e9 / (3 * ROW_DIM * 4) / HEADS)


def peak_rss(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, int]:
    """Run `cmd`; its result and its peak resident set (VmHWM), sampled until it exits."""
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while job.poll() is None:
        try:
            for line in Path(f"/proc/{job.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.2)
    out, err = job.communicate()
    done = subprocess.CompletedProcess(cmd, job.returncode, out, err)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}... failed:\n{err[-3000:]}")
    return done, peak


def train(run: Path, base: Path, env: dict, overrides: list[str], resume: bool = False) -> dict:
    cmd = [sys.executable, "-m", "engram", "train", "--recipe", RECIPE, f"base.path={base}"]
    cmd += [f"out_dir={run}", "progress=false", *overrides, *(["--resume"] if resume else [])]
    t0 = time.perf_counter()
    done, peak = peak_rss(cmd, env)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return {"summary": summary, "seconds": time.perf_counter() - t0, "peak_rss_bytes": peak}


def generation_is_exact(run: Path) -> dict[str, Any]:
    """Cached decoding (`generate`) against greedy decoding by full forwards."""
    trained = load_trained(run, device="cpu")
    tok = trained.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    made = generate(trained.model, prompts, SamplingConfig(max_new_tokens=12), None, tok.pad_id)
    same = []
    with torch.no_grad():
        for prompt, new in zip(prompts, made.tokens, strict=True):
            ids = list(prompt)
            for _ in range(12):
                ids.append(int(trained.model(torch.tensor([ids]))[0, -1].argmax()))
            same.append(new == ids[len(prompt) :])
    text = tok.decode(prompts[0] + made.tokens[0])
    trained.tables.close()
    return {"exact": all(same), "per_prompt": same, "sample": text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table-gb", type=float, default=32.0)
    parser.add_argument("--control-gb", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--cache-rows", type=int, default=262144)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--work", default="runs/bench-hf-huge-table")
    parser.add_argument("--result", default="bench/results/hf_huge_table.json")
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    base = work / "base"
    shape = ["--hidden-size", str(args.hidden_size), "--layers", str(args.layers)]
    subprocess.run([sys.executable, "-m", "engram.hf.tiny", str(base), *shape], env=env, check=True)
    half, size = args.steps // 2, base_sizes(args.table_gb)
    common = [f"steps={args.steps}", f"eval_every={args.steps}"]
    disk = [*common, f"model.engram.spec.base_sizes={size},{size}", "tables.placement=disk"]
    disk += [f"tables.cache_rows={args.cache_rows}", f"ckpt_every={half}"]
    record: dict[str, Any] = {"bench": "hf_huge_table", "machine": machine_info()}
    record["config"] = {**vars(args), "base_size": size, "ram_bytes": os.sysconf("SC_PHYS_PAGES")
                        * os.sysconf("SC_PAGE_SIZE")}  # fmt: skip
    record["disk"] = train(work / "disk", base, env, disk)
    record["disk"]["table"] = allocated(work / "disk" / "tables")
    print("disk", json.dumps(record["disk"]), flush=True)
    # Rewind in place to the halfway checkpoint, and resume to the end.
    ckpts = work / "disk" / "checkpoints"
    shutil.rmtree(ckpts / f"step-{args.steps:07d}")
    (ckpts / "latest").write_text(f"step-{half:07d}\n")
    record["resumed"] = train(work / "disk", base, env, disk, resume=True)
    straight, resumed = (record[k]["summary"]["val_loss"] for k in ("disk", "resumed"))
    record["resume_exact"] = straight == resumed
    print("resumed", json.dumps(record["resumed"]), flush=True)
    record["generation"] = generation_is_exact(work / "disk")
    print("generation", json.dumps(record["generation"]), flush=True)
    small = base_sizes(args.control_gb)
    host = [*common, f"model.engram.spec.base_sizes={small},{small}", "tables.placement=host"]
    record["host_control"] = train(work / "host", base, env, host)
    print("host control", json.dumps(record["host_control"]), flush=True)
    tps = {k: record[k]["summary"]["tokens_per_s"] for k in ("disk", "host_control")}
    record["tokens_per_s_disk_over_host"] = tps["disk"] / tps["host_control"]
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    write_json(Path(args.result), record)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
