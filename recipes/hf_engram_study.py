"""The worked example through `engram train`: Engram on a pretrained Llama, with fair controls.

1. A 4-layer, 128-wide Llama (`python -m engram.hf.tiny`, a 2,048-id BPE of the default corpus)
   is pretrained for `--base-steps` steps with `engram train` (`model.engram=none`) and exported
   as a Hugging Face folder (`engram export --merged`): the "pretrained checkpoint".
2. From it, each arm trains `--steps` steps on the same stream, for every seed of `--seeds`
   (the seed sets Engram's initialisation and the data order):
   - `backbone`: the backbone keeps training, no Engram;
   - `engram-alone`: Engram on the frozen backbone (`base.train=none`);
   - `zero-table-alone`: the same Engram module with its table zero and frozen: every parameter
     of `engram-alone` except the stored rows trains (projections, gate, conv): the control at
     equal trainable parameters, without memory;
   - `engram+backbone`: both train;
   - `zero-table+backbone`: both train, the table zero and frozen: equal added parameters,
     without memory;
   - `random-rows+backbone`: both train, Engram reads rows drawn from the position in the
     stream, not from the tokens: equal parameters and sparsity, without content addressing.
   Controls are `engram.experiments.control_arms` (the `engram study controls` arms).
3. Writes `report.json` and `report.md` under `--out`: validation loss per arm and seed, the
   mean, the spread (max - min over seeds), and each Engram arm's paired difference per seed
   against its controls.

    OMP_NUM_THREADS=1 python recipes/hf_engram_study.py --seeds 0,1      # about 10 minutes
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from engram.cli import train_config
from engram.experiments.control_arms import CONTROLS, train_control
from engram.experiments.report import machine_info
from engram.hf.export import export_run
from engram.train import train

RECIPE = str(Path(__file__).resolve().parent / "hf-llama.toml")
# arm: (control, backbone parameters that train)
ARMS = {
    "backbone": ("no-engram", "all"),
    "engram-alone": ("reference", "none"),
    "zero-table-alone": ("zero-table", "none"),
    "engram+backbone": ("reference", "all"),
    "zero-table+backbone": ("zero-table", "all"),
    "random-rows+backbone": ("random-rows", "all"),
}
PAIRS = [  # (Engram arm, its control)
    ("engram-alone", "zero-table-alone"),
    ("engram+backbone", "backbone"),
    ("engram+backbone", "zero-table+backbone"),
    ("engram+backbone", "random-rows+backbone"),
]


# The old worked example's settings (docs/hf.md): AdamW at 3e-3 with 30 warm-up steps. The
# tables stay in the model (device placement): the zero-table control freezes an embedding.
COMMON = ["optim.lr=3e-3", "optim.warmup_steps=30", "tables.placement=device", "progress=false"]


def pretrained(out: Path, steps: int) -> tuple[Path, float]:
    """The pretrained Llama (`out/pretrained`) and its validation loss, made once: a random one
    trained `steps` steps."""
    folder, record = out / "pretrained", out / "pretraining.json"
    if folder.is_dir() and record.is_file():
        return folder, json.loads(record.read_text())["val_loss"]
    random = out / "random-init"
    tiny = [sys.executable, "-m", "engram.hf.tiny", str(random), "--hidden-size", "128"]
    subprocess.run([*tiny, "--layers", "4"], check=True)
    run = out / "pretraining"
    overrides = [f"base.path={random}", "model.engram=none", f"steps={steps}", f"out_dir={run}"]
    summary = train(train_config(RECIPE, [*COMMON, *overrides]), overwrite=True)
    export_run(run, folder, merged=True)
    record.write_text(json.dumps({"val_loss": summary["val_loss"], "steps": steps}))
    return folder, summary["val_loss"]


def run_arm(base: Path, out: Path, arm: str, seed: int, steps: int) -> dict[str, Any]:
    control, trainable = ARMS[arm]
    overrides = [f"base.path={base}", f"base.train={trainable}", f"steps={steps}", f"seed={seed}"]
    overrides += [f"out_dir={out / f'seed-{seed}' / arm}", *COMMON]
    if control == "no-engram":
        overrides.append("model.engram=none")
        return train(train_config(RECIPE, overrides), overwrite=True)
    return train_control(train_config(RECIPE, overrides), CONTROLS[control])


def summarise(losses: dict[str, dict[int, float]], seeds: list[int]) -> dict[str, Any]:
    arms = {
        arm: {
            "mean": statistics.fmean(by_seed.values()),
            "spread": max(by_seed.values()) - min(by_seed.values()),
            "per_seed": by_seed,
        }
        for arm, by_seed in losses.items()
    }
    pairs = {}
    for a, b in PAIRS:
        diffs = {s: losses[a][s] - losses[b][s] for s in seeds}
        spread = max(arms[a]["spread"], arms[b]["spread"])
        mean = statistics.fmean(diffs.values())
        pairs[f"{a} - {b}"] = {
            "per_seed": diffs,
            "mean": mean,
            "same_sign": len({d > 0 for d in diffs.values()}) == 1,
            "resolved": abs(mean) > 2 * spread,  # the project's bar: twice the seed spread
        }
    return {"arms": arms, "pairs": pairs}


def markdown(report: dict[str, Any], seeds: list[int]) -> str:
    head = "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | spread |"
    lines = [head, "|---|" + "---:|" * (len(seeds) + 2)]
    for arm, r in report["summary"]["arms"].items():
        cells = " | ".join(f"{r['per_seed'][s]:.4f}" for s in seeds)
        lines.append(f"| {arm} | {cells} | {r['mean']:.4f} | {r['spread']:.4f} |")
    lines += ["", "| Engram arm - control | " + " | ".join(f"seed {s}" for s in seeds)
              + " | mean | same sign | > 2x spread |",
              "|---|" + "---:|" * (len(seeds) + 3)]  # fmt: skip
    for name, p in report["summary"]["pairs"].items():
        cells = " | ".join(f"{p['per_seed'][s]:+.4f}" for s in seeds)
        verdict = f"{p['same_sign']} | {p['resolved']}"
        lines.append(f"| {name} | {cells} | {p['mean']:+.4f} | {verdict} |")
    base = report["pretrained_val_loss"]
    return (
        f"# Engram on a pretrained Llama, through `engram train`\n\n"
        f"Validation loss after {report['config']['steps']} steps from a checkpoint pretrained "
        f"{report['config']['base_steps']} steps (its own loss: {base:.4f}); seeds {seeds}; "
        f"commit {report['machine']['commit']}; {report['seconds']:.0f} s.\n\n" + "\n".join(lines)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--base-steps", type=int, default=500)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--out", default="runs/hf-engram-study")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    out = Path(args.out)
    start = time.perf_counter()
    base, base_loss = pretrained(out, args.base_steps)
    losses: dict[str, dict[int, float]] = {arm: {} for arm in arms}
    for seed in seeds:
        for arm in arms:
            losses[arm][seed] = run_arm(base, out, arm, seed, args.steps)["val_loss"]
            print(f"seed {seed} {arm}: {losses[arm][seed]:.4f}", flush=True)
    report = {
        "config": {**vars(args), "recipe": RECIPE},
        "machine": machine_info(),
        "pretrained_val_loss": base_loss,
        "losses": losses,
        "summary": summarise(losses, seeds),
        "seconds": time.perf_counter() - start,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report, seeds) + "\n")
    print(markdown(report, seeds))


if __name__ == "__main__":
    main()
