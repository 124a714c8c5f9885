"""The `engram` command line: one entry point, one subcommand per job.

Every user error (unknown preset, bad ids, unreadable tokenizer) is a ValueError raised where it is
detected; `main` turns it into one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

import torch

from engram.spec import PRESETS, HashSpec, SpecConfig, preset, resolve


def parse_value(text: str, current: object) -> object:
    """Parse `text` to the type of the field's current value (int, bool, tuple of int, str)."""
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    try:
        if isinstance(current, tuple):
            return tuple(int(x) for x in text.split(",") if x.strip())
        if isinstance(current, int) or current is None:
            return None if text.lower() == "none" else int(text)
    except ValueError as e:
        raise ValueError(f"expected an integer (or comma-separated integers), got {text!r}") from e
    return text


def apply_overrides(config: SpecConfig, overrides: Sequence[str]) -> SpecConfig:
    """Apply `key=value` strings to a config; an unknown key is an error listing the valid ones."""
    fields = {f.name for f in dataclasses.fields(config)}
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"bad override {item!r}: use key=value with key in {sorted(fields)}")
        try:
            changes[key] = parse_value(value, getattr(config, key))
        except ValueError as e:
            raise ValueError(f"bad override {item!r}: {e}") from e
    return dataclasses.replace(config, **changes)


def _spec_from_args(args: argparse.Namespace) -> HashSpec:
    return resolve(apply_overrides(preset(args.preset), args.set))


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

    config = apply_overrides(preset(args.preset), args.set)
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
    from engram.demo import run_demo

    run_demo(steps=args.steps, out_dir=args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engram", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

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

    p = sub.add_parser("demo", help="a two-minute tour of the core with a small experiment")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default="runs/demo-core")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as e:
        print(f"engram {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
