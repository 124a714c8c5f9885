"""Quantised Engram tables: validation loss and bytes per token, fp32 vs int8 vs fp8, one run.

One trained checkpoint (`--ckpt`; by default the `demo` preset trained for `--steps` steps into
runs/bench-quant, reused when that run already reached them) is evaluated side by side on the
same validation tokens with its tables as trained (fp32) and converted by
`engram.inference.quantized`: int8 and fp8 (e4m3), each with one scale per row and with one
scale per block of `--block` columns. Only the tables change; every dense weight is the same.

Per variant: validation loss and its change vs fp32 (also as a share of what Engram gains over
the same model with Engram switched off), table bytes fetched per token (heads x stored bytes
per row, summed over tables), table bytes in memory and on disk (the saved folder), and the
quantisation error of the rows (max abs, relative RMS). The last line of output is one JSON
record (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from engram.assembly import evaluate
from engram.checkpoint import read_manifest
from engram.cli import train_config
from engram.data import build_shard
from engram.experiments.report import machine_info
from engram.inference.load import load_trained
from engram.inference.quantized import (
    install_quantized,
    quantization_report,
    quantize_tables,
    save_quantized,
)
from engram.train import train


def trained_checkpoint(args: argparse.Namespace) -> Path:
    """`--ckpt`, or the demo preset trained for `--steps` steps (reused when already there)."""
    if args.ckpt:
        return Path(args.ckpt)
    run = Path(args.run)
    try:
        if read_manifest(run)["step"] >= args.steps:
            return run
    except ValueError:  # no checkpoint yet
        pass
    config = train_config(
        None, ["preset=demo", f"steps={args.steps}", f"out_dir={run}", "progress=false"]
    )
    t0 = time.perf_counter()
    summary = train(config)
    print(
        f"trained {run} for {args.steps} steps in {time.perf_counter() - t0:.0f} s: "
        f"val loss {summary['val_loss']:.4f}"
    )
    return run


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def variant_row(name: str, loss: float, fp32: float, gain: float, report: dict | None) -> dict:
    """One table row: loss, its change, bytes and error of one variant."""
    row = {"variant": name, "val_loss": loss, "delta": loss - fp32}
    row["delta_share_of_engram_gain"] = (loss - fp32) / gain if gain > 0 else None
    if report is None:  # the float tables as trained
        return row
    errors = [t["error"] for t in report["tables"].values()]
    row.update(
        kind=report["kind"],
        block=report["block"],
        bytes_per_token=report["bytes_per_token"],
        table_bytes=report["table_bytes"],
        max_abs_error=max(e["max_abs_error"] for e in errors),
        relative_rms_error=max(e["relative_rms_error"] for e in errors),
    )
    return row


def measure(args: argparse.Namespace, ckpt: Path) -> tuple[dict, list[dict]]:
    """(config of the run, one row per variant), every variant on the same model and tokens."""
    trained = load_trained(ckpt, device="cpu")
    model, tok, config, manifest = (
        trained.model,
        trained.tokenizer,
        trained.config,
        trained.manifest,
    )
    if args.eval_tokens:
        config = replace(config, eval_tokens=args.eval_tokens)
    val = build_shard(config.data, "val", tok).tokens
    device = torch.device("cpu")
    variants = {"int8": ("int8", 0), f"int8-b{args.block}": ("int8", args.block)}
    variants.update({"fp8": ("fp8", 0), f"fp8-b{args.block}": ("fp8", args.block)})
    stores, reports = {}, {}
    for name, (kind, block) in variants.items():  # every conversion before the float is dropped
        stores[name] = quantize_tables(model, kind, block)
        reports[name] = quantization_report(model, stores[name])
    fp32 = evaluate(model, val, config, device)
    off = evaluate(model, val, config, device, engram_off=True)
    first = reports["int8"]
    rows = [variant_row("fp32", fp32, fp32, off - fp32, None)]
    rows[0].update(
        bytes_per_token=first["bytes_per_token_fp32"], table_bytes=first["table_bytes_fp32"]
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in variants:
            install_quantized(model, stores[name])
            loss = evaluate(model, val, config, device)
            row = variant_row(name, loss, fp32, off - fp32, reports[name])
            row["file_bytes"] = folder_bytes(save_quantized(Path(tmp) / name, stores[name]))
            rows.append(row)
    memory = model.engram_layers[0]
    setup = {
        "ckpt": manifest["path"],
        "step": manifest["step"],
        "preset": None if args.ckpt else "demo",
        "data": config.data,
        "tokenizer": config.tokenizer,
        "eval_tokens": config.eval_tokens,
        "seq_len": config.seq_len,
        "tables": len(model.engram_layers),
        "rows": sum(m.spec.layer_rows(m.layer_id) for m in model.engram_layers),
        "row_dim": memory.spec.row_dim,
        "heads": memory.spec.heads_total,
        "block": args.block,
        "val_loss_engram_off": off,
    }
    return setup, rows


def print_table(rows: list[dict]) -> None:
    print(
        f"\n{'variant':<10}{'val loss':>10}{'delta':>10}{'of gain':>9}{'B/token':>9}"
        f"{'table MB':>10}{'max abs':>9}{'rel rms':>9}"
    )
    for r in rows:
        share = r["delta_share_of_engram_gain"]
        print(
            f"{r['variant']:<10}{r['val_loss']:>10.5f}{r['delta']:>+10.5f}"
            f"{(f'{share:+.2%}' if share is not None else '-'):>9}{r['bytes_per_token']:>9}"
            f"{r['table_bytes'] / 1e6:>10.3f}{r.get('max_abs_error', 0):>9.4f}"
            f"{r.get('relative_rms_error', 0):>9.4f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", help="a run folder or checkpoint (default: train the demo preset)")
    ap.add_argument("--steps", type=int, default=300, help="training steps of the default run")
    ap.add_argument("--run", default="runs/bench-quant", help="folder of the default run")
    ap.add_argument("--block", type=int, default=8, help="columns per scale of the block variants")
    ap.add_argument("--eval-tokens", type=int, default=0, help="0: the run's eval_tokens")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/quantized_tables.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ckpt = trained_checkpoint(args)
    t0 = time.perf_counter()
    setup, rows = measure(args, ckpt)
    print_table(rows)
    record = {
        "benchmark": "quantized_tables",
        "machine": machine_info(),
        "config": {**setup, "threads": torch.get_num_threads()},
        "results": rows,
        "seconds": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    sys.exit(main())
