"""The `engram` command line: one entry point, one subcommand per job.

Every user error (unknown preset, bad ids, unreadable tokenizer) is a ValueError raised where it is
detected; `main` turns it into one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from engram.config import apply_overrides, parse_assignments
from engram.files import check_writable, disk_full
from engram.spec import PRESETS, HashSpec, SpecConfig, preset, resolve


def _spec_config(args: argparse.Namespace) -> SpecConfig:
    return apply_overrides(preset(args.preset), parse_assignments(args.set))


def _spec_from_args(args: argparse.Namespace) -> HashSpec:
    return resolve(_spec_config(args))


def _check_out(args: argparse.Namespace) -> None:
    """An explicit `--out` folder must take files: fail before the work, not after it."""
    if getattr(args, "out", None):
        check_writable(args.out)


def cmd_vocab(args: argparse.Namespace) -> None:
    from engram.tokenizer import load_tokenizer
    from engram.vocab import compress

    tok = load_tokenizer(args.tokenizer)
    vocab = compress(tok, use_cache=not args.no_cache)
    report = {
        "tokenizer": tok.name,
        "tokenizer_fingerprint": tok.fingerprint,
        "vocab_size": tok.vocab_size,
        "compressed_vocab_size": vocab.size,
        "reduction": round(vocab.reduction, 6),
        "vocab_map_fingerprint": vocab.fingerprint,
        "largest_groups": vocab.groups(tok, top=args.top),
    }
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
        return
    print(
        f"{tok.name}: {tok.vocab_size:,} ids -> {vocab.size:,} canonical ids "
        f"({vocab.reduction:.2%} fewer)"
    )
    for g in report["largest_groups"]:
        print(f"  {g['size']:>4} ids -> canonical {g['canonical_id']}: {g['tokens'][:8]}")


def cmd_spec(args: argparse.Namespace) -> None:
    spec = _spec_from_args(args)
    if args.json:
        print(spec.to_json(indent=2))
        return
    print(
        f"preset {args.preset} (digest {spec.digest}), tokenizer {spec.config.tokenizer}: "
        f"{spec.vocab_size:,} ids -> {spec.compressed_vocab_size:,} canonical"
    )
    print(
        f"orders {list(spec.orders)}, {spec.config.heads_per_order} heads per order, "
        f"row dim {spec.row_dim}, d_mem {spec.d_mem}, table params {spec.table_params:,}"
    )
    for layer in spec.layer_ids:
        print(
            f"  layer {layer}: {spec.layer_rows(layer):,} rows, primes "
            f"{list(spec.layer_primes(layer))}"
        )


def cmd_hash(args: argparse.Namespace) -> None:
    from engram.hashing import NgramHasher
    from engram.tokenizer import load_tokenizer
    from engram.vocab import compress

    config = _spec_config(args)
    tok = load_tokenizer(config.tokenizer)
    vocab = compress(tok, enabled=config.compress)
    spec = resolve(config, tokenizer=tok, vocab=vocab)
    if args.ids is not None:
        try:
            ids = [int(x) for x in args.ids.split(",") if x.strip()]
        except ValueError as e:
            raise ValueError(f"--ids must be comma-separated integers, got {args.ids!r}") from e
    else:
        ids = tok.encode(args.text)
    if not ids:
        raise ValueError("nothing to hash: the input has no tokens")
    hasher = NgramHasher(spec, vocab)
    x = torch.tensor([ids], dtype=torch.int64)
    rows = hasher(x)
    report = {
        "preset": args.preset,
        "spec_digest": spec.digest,
        "ids": ids,
        "compressed_ids": hasher.canonicalize(x)[0].tolist(),
        "layers": {str(layer): rows[layer][0].tolist() for layer in spec.layer_ids},
    }
    if args.json:
        print(json.dumps(report))
        return
    for t, tid in enumerate(ids):
        first = spec.layer_ids[0]
        print(
            f"{tid:>7} -> {report['compressed_ids'][t]:>7}  layer {first}: "
            f"{report['layers'][str(first)][t]}"
        )


def cmd_demo(args: argparse.Namespace) -> None:
    from engram.experiments.arms import study_from_args
    from engram.experiments.demo import QUICK, DemoConfig, run_demo

    _check_out(args)
    run_demo(study_from_args(args, DemoConfig(), QUICK))


def train_config(recipe: str | None, overrides: Sequence[str]):
    """Defaults < recipe < key=value. `preset=NAME` (in either) picks the model preset first."""
    from engram.config import TrainConfig, load_recipe
    from engram.model import model_preset

    values = load_recipe(recipe) if recipe else {}
    if recipe and "study" in values:  # e.g. recipes/gpu-allocation.toml
        raise ValueError(
            f"recipe {recipe} is a study's: run engram study {values['study']} --recipe {recipe}"
        )
    values.update(parse_assignments(list(overrides)))
    name = values.pop("preset", None)
    base = TrainConfig(model=model_preset(name)) if name else TrainConfig()
    return apply_overrides(base, values)


def cmd_train(args: argparse.Namespace) -> None:
    from engram.train import train

    config = train_config(args.recipe, args.overrides)
    summary = train(config, resume=args.resume, overwrite=args.overwrite)
    if summary["rank"] == 0:  # under torchrun, one summary for the job
        print(json.dumps({k: v for k, v in summary.items() if k not in ("curve", "rank")}))


def cmd_eval(args: argparse.Namespace) -> None:
    from engram.assembly import evaluate, pick_device
    from engram.data import build_shard
    from engram.inference.load import load_trained

    trained = load_trained(args.ckpt, device=args.device)
    model, manifest = trained.model, trained.manifest
    config = apply_overrides(trained.config, parse_assignments(args.overrides))
    quantized = _install_tables(model, args.tables) if args.tables else None
    val = build_shard(config.data, "val", trained.tokenizer).tokens
    device = pick_device(args.device)
    report = {
        "ckpt": manifest["path"],
        "step": manifest["step"],
        "data": config.data,
        "eval_tokens": config.eval_tokens,
        "quantized": quantized,
    }
    report["val_loss"] = evaluate(model, val, config, device)
    if model.spec is not None:
        report["val_loss_engram_off"] = evaluate(model, val, config, device, engram_off=True)
    print(json.dumps(report))


def _install_tables(model, folder: str) -> dict:
    """Install a quantised-tables folder in `model`; what was installed, for eval's JSON."""
    from engram.inference.quantized import install_quantized, load_quantized, summary

    stores, meta = load_quantized(folder, model)
    install_quantized(model, stores)
    return {"folder": str(folder), **summary(meta)}


def cmd_export(args: argparse.Namespace) -> None:
    from engram.hf.export import export_run

    out = export_run(args.ckpt, args.out, merged=args.merged)
    kind = "merged model" if args.merged else "Engram"
    print(f"exported the {kind} of {args.ckpt} to {out}")


def cmd_quantize(args: argparse.Namespace) -> None:
    from engram.inference.load import load_trained
    from engram.inference.quantized import (
        quantization_report,
        quantize_tables,
        save_quantized,
        summary,
    )
    from engram.tables.quant import payload_dtype

    payload_dtype(args.kind)  # an unknown kind fails before the model is loaded
    if args.block < 0:
        raise ValueError(f"--block {args.block} must be >= 0 (0: one scale per row)")
    if args.out:  # the folder itself must not exist yet (save_quantized renames into it)
        check_writable(Path(args.out).parent)
    trained = load_trained(args.ckpt, device=args.device)
    model, manifest = trained.model, trained.manifest
    stores = quantize_tables(model, args.kind, args.block)
    report = quantization_report(model, stores)
    report["source"] = {"ckpt": manifest["path"], "step": manifest["step"]}
    suffix = f"-b{args.block}" if args.block else ""
    # Beside the run's checkpoints, not inside one: pruning old checkpoints would delete it.
    run_dir = Path(manifest["path"]).parent.parent
    out = Path(args.out or run_dir / f"quantized-{args.kind}{suffix}-step{manifest['step']}")
    save_quantized(out, stores, report, overwrite=args.overwrite)
    short = summary(report)
    errors = ", ".join(f"{k} {v:.3%}" for k, v in short["relative_rms_error"].items())
    print(f"{out}: {args.kind}, block {args.block or 'per row'}; relative RMS error {errors}")
    fp32, quant = short["bytes_per_token_fp32"], short["bytes_per_token"]
    print(
        f"table bytes per token: fp32 {fp32:,} -> {args.kind} {quant:,} ({quant / fp32:.3f}x); "
        f"tables {report['table_bytes_fp32']:,} -> {report['table_bytes']:,} bytes"
    )


def cmd_generate(args: argparse.Namespace) -> None:
    from engram.inference import SamplingConfig, generate
    from engram.inference.load import load_trained

    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            text = Path(args.prompts_file).read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"cannot read --prompts-file: {e}") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give --prompt TEXT (repeatable) or --prompts-file FILE")
    trained = load_trained(args.ckpt, device=args.device)
    model, tok = trained.model, trained.tokenizer
    if args.compile:  # before the clock starts: the first compile takes seconds
        from engram.inference.compiled import compile_decoding

        compile_decoding(model, batch_size=len(prompts))
    decoder = None
    if args.capture:
        from engram.inference.captured import CapturedDecoder

        decoder = CapturedDecoder(model)
    cfg = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        prefill_chunk=args.prefill_chunk,
    )
    cfg.validate()  # before anything is printed
    ids = [tok.encode(p) for p in prompts]
    if any(not i for i in ids):
        raise ValueError("a prompt encodes to no tokens")
    stream = _Streamer(tok, prompts[0]) if len(prompts) == 1 else None
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    if decoder is not None:
        print(
            "capturing the decode step: compiled the first time for this batch size and cache "
            "size (tens of seconds to minutes), then read from disk",
            file=sys.stderr,
        )
    gen = generate(model, ids, cfg, tok.eos_id, pad, stream, decoder)
    if stream is not None:
        stream.flush()
    else:
        for prompt, new in zip(prompts, gen.tokens, strict=True):
            print(json.dumps({"prompt": prompt, "completion": tok.decode(new)}))
    print(
        f"{gen.new_tokens} new tokens for {len(prompts)} prompt(s): prefill "
        f"{gen.prompt_tokens} tokens in {gen.prefill_s:.2f} s, decode "
        f"{gen.decode_tokens_per_s:,.1f} tokens/s",
        file=sys.stderr,
    )


class _Streamer:
    """Prints a single completion as it grows (decoding the whole tail keeps UTF-8 intact)."""

    def __init__(self, tok, prompt: str) -> None:
        self.tok, self.ids, self.shown = tok, [], 0
        print(prompt, end="", flush=True)

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[self.shown :], end="", flush=True)
            self.shown = len(text)

    def flush(self) -> None:
        print(self.tok.decode(self.ids)[self.shown :], flush=True)


def cmd_plan(args: argparse.Namespace) -> None:
    from engram.config import to_dict
    from engram.model import model_preset
    from engram.model.planner import format_plan, plan_allocation, plan_from_moe

    base = apply_overrides(model_preset(args.preset), parse_assignments(args.overrides))
    if args.p_tot is not None or args.p_act is not None:
        if args.p_tot is None or args.p_act is None:
            raise ValueError(
                "give both --p-tot and --p-act, or neither (then the MoE baseline "
                "of the preset without Engram sets them)"
            )
        plan = plan_allocation(
            base.with_(engram=None), args.p_tot, args.p_act, args.rho, engram=base.engram
        )
    else:
        plan = plan_from_moe(base.with_(engram=None), args.rho, engram=base.engram)
    if args.json:
        print(
            json.dumps(
                {
                    "rho": plan.rho,
                    "num_routed": plan.num_routed,
                    "base_size": plan.base_size,
                    "table_rows": plan.table_rows,
                    "counts": plan.counts.as_dict(),
                    "warnings": plan.warnings,
                    "config": to_dict(plan.config),
                }
            )
        )
        return
    print(format_plan(plan))


# Each study module defines HELP, add_arguments(parser) and run_cli(args); one line here adds one.
STUDIES = (
    "ablation",
    "allocation",
    "collisions",
    "controls",
    "gates",
    "granularity",
    "long-context",
    "logit-lens",
    "cka",
    "memory",
)


def _run_study(args: argparse.Namespace) -> None:
    _check_out(args)
    args.run_study(args)


def _add_studies(sub: argparse._SubParsersAction) -> None:
    import importlib

    study = sub.add_parser("study", help="the paper's experiments, each writing a report")
    studies = study.add_subparsers(dest="study", required=True)
    for name in STUDIES:
        module = importlib.import_module(f"engram.experiments.{name.replace('-', '_')}")
        p = studies.add_parser(name, help=module.HELP)
        module.add_arguments(p)
        p.set_defaults(func=_run_study, run_study=module.run_cli)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engram", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_spec_commands(sub)
    _add_run_commands(sub)
    _add_generate(sub)
    _add_plan(sub)
    _add_studies(sub)
    _add_demo(sub)
    return parser


def _add_spec_commands(sub: argparse._SubParsersAction) -> None:
    """vocab, spec, hash: the tokenizer's compression and the hash specs."""
    p = sub.add_parser("vocab", help="tokenizer compression: sizes, reduction, largest groups")
    p.add_argument("--tokenizer", default="deepseek", help="'deepseek', a path, or a HF name")
    p.add_argument("--top", type=int, default=10, help="how many merge groups to list")
    p.add_argument("--no-cache", action="store_true", help="rebuild the map, ignore the cache")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_vocab)

    for name, func, help_text in (
        ("spec", cmd_spec, "print a resolved hash spec"),
        ("hash", cmd_hash, "hash token ids or text with a spec"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--preset", required=True, help=f"one of {sorted(PRESETS)}")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a spec field, e.g. --set seed=1 --set layer_ids=1,5",
        )
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)
        if name == "hash":
            src = p.add_mutually_exclusive_group(required=True)
            src.add_argument("--ids", help="comma-separated token ids")
            src.add_argument("--text", help="text to tokenize with the spec's tokenizer")


def _add_run_commands(sub: argparse._SubParsersAction) -> None:
    """train, eval, quantize, export: a run and its checkpoints."""
    p = sub.add_parser("train", help="train a model from a recipe and key=value overrides")
    p.add_argument("--recipe", help="a TOML recipe (see recipes/)")
    p.add_argument("--resume", action="store_true", help="continue the run in out_dir exactly")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run already in out_dir (its metrics, checkpoints and tables are deleted)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="e.g. preset=demo steps=500 model.moe.num_routed=8 optim.lr=1e-3",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="validation loss of a checkpoint (and with Engram off)")
    p.add_argument("--ckpt", required=True, help="a run folder or a checkpoint folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--tables", help="a folder from `engram quantize`: evaluate with its rows")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. eval_tokens=65536")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quantize", help="int8/fp8 copies of a checkpoint's Engram tables")
    p.add_argument("--ckpt", required=True, help="a run folder or a checkpoint folder")
    p.add_argument("--kind", required=True, help="int8 or fp8 (e4m3)")
    p.add_argument("--block", type=int, default=0, help="columns per scale (0: one per row)")
    p.add_argument("--out", help="folder (default <run>/quantized-KIND[-bBLOCK]-stepSTEP)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.add_argument("--device", default="cpu", help="where to load and convert the tables")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("export", help="a run on a pretrained HF model: its Engram, or merged")
    p.add_argument("--ckpt", required=True, help="a run folder or a checkpoint folder")
    p.add_argument("--out", required=True, help="the new folder")
    p.add_argument("--merged", action="store_true", help="with the trained backbone and tokenizer")
    p.set_defaults(func=cmd_export)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue prompts with a trained model (cached decoding)")
    p.add_argument("--ckpt", required=True, help="a run folder or a checkpoint folder")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompts-file", help="one prompt per line, generated as one batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefill-chunk", type=int, default=0, help="0: the whole prompt at once")
    p.add_argument("--device", default="auto")
    fast = p.add_mutually_exclusive_group()
    fast.add_argument(
        "--compile",
        action="store_true",
        help="AOT-compile Engram's decode step (seconds the first time, then cached on disk)",
    )
    fast.add_argument(
        "--capture",
        action="store_true",
        help="AOT-compile each whole decode step, backbone and Engram (experimental; minutes "
        "the first time, then cached on disk)",
    )
    p.set_defaults(func=cmd_generate)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="iso-parameter MoE/Engram allocation (paper section 3.1)")
    p.add_argument("--preset", default="demo", help="model preset giving the backbone")
    p.add_argument("--rho", type=float, default=0.8, help="share of P_sparse in routed experts")
    p.add_argument("--p-tot", type=int, help="target P_tot (default: the MoE baseline's)")
    p.add_argument("--p-act", type=int, help="target P_act (default: the MoE baseline's)")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. vocab_size=8192")
    p.set_defaults(func=cmd_plan)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="MoE vs iso-parameter Engram vs dense, trained side by side")
    p.add_argument("--quick", action="store_true", help="a short run (under 3 minutes)")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1 (mean and spread)")
    p.add_argument("--steps", type=int, help="training steps per arm")
    p.add_argument("--data", help="text source (default: the stdlib corpus)")
    p.add_argument("--out", help="report folder (default runs/demo or runs/demo-quick)")
    p.add_argument(
        "--baseline",
        help="a granularity study's report (or its folder): its chosen MoE replaces the "
        "preset's, and the Engram arm is planned from it",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a TrainConfig field for every arm (repeatable), e.g. --set optim.lr=1e-3",
    )
    p.set_defaults(func=cmd_demo)


def _error_line(text: str) -> None:
    """One line on stderr in one write: print() writes the text and its newline apart, and the
    lines of several ranks refusing at once (under torchrun) then run into each other."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as e:
        # One line, always: some messages quote a library's multi-line text.
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        _error_line(f"engram {args.command}: error: {message}")
        return 2
    except OSError as e:
        if not disk_full(e):  # any other OSError we did not foresee is a bug: a traceback
            raise
        where = f" writing {e.filename}" if e.filename else ""
        _error_line(f"engram {args.command}: error: no space left on the device{where}")
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
