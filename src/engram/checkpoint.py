"""Checkpoints: safetensors for tensors, a JSON manifest for everything else, written atomically.

A checkpoint is a folder `step-XXXXXXX/` holding
- `model.safetensors`: parameters and persistent buffers (e.g. MoE balancing biases);
- `optim.safetensors`: every optimiser state tensor, keyed `"{optimiser}.{param index}.{name}"`;
- `manifest.json`: format version, step, the run config, the hash spec, the tokenizer fingerprint,
  the loader position, optimiser hyper-parameters, and RNG states;
- attachments: folders other parts write into the checkpoint before it is committed, e.g.
  `tables/` for Engram tables held outside the model (`engram.tables.PlacedTables.write`);
and is first written to a temporary folder, fsynced, then renamed (`commit`): a crash mid-write
leaves the previous checkpoint as `latest`. Never pickle. Table files inside a checkpoint are
written by `engram.tables.placed.write_tables`; this is the only module that commits checkpoints.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from engram.files import fsync_dir, fsync_file, remove_later, sweep_trash

CHECKPOINT_FORMAT = 1
LATEST = "latest"


def _optimizer_tensors(name: str, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Split an optimiser state dict into tensors (for safetensors) and JSON-able scalars."""
    state = opt.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(name: str, opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    prefix = f"{name}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, field = key[len(prefix) :].split(".", 1)
            state.setdefault(int(index), {})[field] = value
    for key, value in meta["scalars"].items():
        index, field = key.split(".", 1)
        state.setdefault(int(index), {})[field] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_checkpoint(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    manifest: dict[str, Any],
    keep: int = 2,
    attachments: Mapping[str, Callable[[Path], Any]] | None = None,
) -> Path:
    """Write `root/step-XXXXXXX` atomically and durably (`commit`); keep the newest `keep`.

    Each attachment `name: write` is called with the folder `<checkpoint>/name` (not yet
    created) while the checkpoint is still temporary; what it returns goes into the manifest
    under `name`, so the attached files are committed by the same rename as the weights.
    """

    def write(tmp: Path) -> dict[str, Any]:
        save_model(model, str(tmp / "model.safetensors"))
        tensors, meta = {}, {}
        for name, opt in optimizers.items():
            t, m = _optimizer_tensors(name, opt)
            tensors.update(t)
            meta[name] = m
        save_file(tensors, str(tmp / "optim.safetensors"))
        for file in ("model.safetensors", "optim.safetensors"):
            fsync_file(tmp / file)
        attached = {name: write(tmp / name) for name, write in (attachments or {}).items()}
        return {"optimizers": meta, "rng": rng_state(), **manifest, **attached}

    return commit(root, step, write, keep)


def commit(
    root: str | Path, step: int, write: Callable[[Path], dict[str, Any]], keep: int = 2
) -> Path:
    """Commit `root/step-XXXXXXX`: `write(tmp)` fills a fresh folder and returns its manifest.

    A crash (or an exception) at any point leaves `latest` naming the previous checkpoint,
    untouched and loadable:

        1. `write` fills a fresh `.tmp-*` folder (its files fsynced)
        2. manifest.json is written and fsynced, then the folder
        3. the folder is renamed to `step-XXXXXXX` (atomic), and `root` fsynced
        4. `latest` is written to a temporary file, fsynced, renamed over `latest`, `root` fsynced
        5. older checkpoints beyond `keep` are removed in the background (never `latest`)
    """
    if step < 0 or keep < 1:
        raise ValueError(f"step={step} must be >= 0 and keep={keep} >= 1")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    sweep_trash(root)
    for stale in root.glob(".tmp-*"):  # folders a crash left mid-write: never committed
        remove_later(stale)
    final = root / f"step-{step:07d}"
    if final.exists() and _latest_name(root) == final.name:
        raise ValueError(f"{final} is the latest checkpoint; save a later step")
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        manifest = {"format_version": CHECKPOINT_FORMAT, "step": step, **write(tmp)}
        _write_manifest(tmp, manifest)
        fsync_dir(tmp)
        if final.exists():  # committed by a run that crashed before moving `latest`
            remove_later(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        remove_later(tmp)
        raise
    _point_latest(root, final.name)
    older = [p for p in sorted(root.glob("step-*")) if p.name != final.name]
    for old in older[: max(0, len(older) - (keep - 1))]:
        remove_later(old)  # a checkpoint with disk tables can take minutes to free (engram.files)
    return final


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    with open(folder / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _point_latest(root: Path, name: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".latest-")
    with os.fdopen(fd, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    fsync_dir(root)


def _latest_name(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text().strip()
    except FileNotFoundError:
        return None


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the one a run's `checkpoints/latest` names."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / "manifest.json").is_file():
            return candidate
        if (candidate / LATEST).is_file():
            target = candidate / (candidate / LATEST).read_text().strip()
            if (target / "manifest.json").is_file():
                return target
    raise ValueError(
        f"no checkpoint at {path} (expected a step-* folder with manifest.json, or a "
        "run folder with checkpoints/latest)"
    )


def read_manifest(path: str | Path) -> dict[str, Any]:
    ckpt = find_checkpoint(path)
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {ckpt} has an unreadable manifest: {e}") from e
    if not isinstance(manifest, dict):
        raise ValueError(f"checkpoint {ckpt} has a manifest that is not a JSON object")
    if manifest.get("format_version") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"checkpoint {ckpt} has format_version "
            f"{manifest.get('format_version')!r}; this library reads "
            f"{CHECKPOINT_FORMAT}"
        )
    # What save_checkpoint writes itself, then what a run's manifest adds and resuming or
    # loading reads: a damaged manifest is refused here, not as a KeyError halfway through.
    required = ("step", "optimizers", "rng", "config", "spec", "tokenizer_fingerprint")
    required += ("loader", "tokens_seen", "curve")
    missing = [key for key in required if key not in manifest]
    if missing:
        raise ValueError(f"checkpoint {ckpt} has a manifest without {', '.join(missing)}")
    manifest["path"] = str(ckpt)
    return manifest


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
) -> dict[str, Any]:
    """Load weights (and optimiser states) into already-built objects; returns the manifest."""
    manifest = read_manifest(path)
    ckpt = Path(manifest["path"])
    # Only the errors a damaged or foreign file causes are the user's; anything else is a bug.
    try:
        missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False)
    except (SafetensorError, OSError) as e:  # truncated, garbage, missing
        raise ValueError(f"checkpoint {ckpt}: model.safetensors is unreadable: {e}") from e
    except RuntimeError as e:  # torch's size mismatches, one line per tensor
        shapes = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ValueError(f"checkpoint {ckpt} does not fit this model: {shapes}") from e
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {ckpt} does not fit this model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    if optimizers:
        try:
            tensors = load_file(str(ckpt / "optim.safetensors"))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"checkpoint {ckpt}: optim.safetensors is unreadable: {e}") from e
        for name, opt in optimizers.items():
            if name not in manifest["optimizers"]:
                raise ValueError(f"checkpoint {ckpt} has no state for optimiser {name!r}")
            _restore_optimizer(name, opt, tensors, manifest["optimizers"][name])
    return manifest
