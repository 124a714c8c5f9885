"""Checkpoints: safetensors for tensors, a JSON manifest for everything else, written atomically.

A checkpoint is a folder `step-XXXXXXX/` holding
- `model.safetensors`: parameters and persistent buffers (e.g. MoE balancing biases);
- `optim.safetensors`: every optimiser state tensor, keyed `"{optimiser}.{param index}.{name}"`;
- `manifest.json`: format version, step, the run config, the hash spec, the tokenizer fingerprint,
  the loader position, optimiser hyper-parameters, and RNG states;
- attachments: folders other parts write into the checkpoint before it is committed, e.g.
  `tables/` for Engram tables held outside the model (`engram.tables.PlacedTables.write`);
and is first written to a temporary folder, then renamed: a crash mid-write leaves the previous
checkpoint as `latest`. Never pickle.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from engram.files import remove_later, sweep_trash

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
    """Write `root/step-XXXXXXX` atomically, point `root/latest` at it, keep the newest `keep`.

    Each attachment `name: write` is called with the folder `<checkpoint>/name` (not yet
    created) while the checkpoint is still temporary; what it returns goes into the manifest
    under `name`, so the attached files are committed by the same rename as the weights.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        tensors, meta = {}, {}
        for name, opt in optimizers.items():
            t, m = _optimizer_tensors(name, opt)
            tensors.update(t)
            meta[name] = m
        save_file(tensors, str(tmp / "optim.safetensors"))
        attached = {name: write(tmp / name) for name, write in (attachments or {}).items()}
        full = {
            "format_version": CHECKPOINT_FORMAT,
            "step": step,
            "optimizers": meta,
            "rng": rng_state(),
            **manifest,
            **attached,
        }
        (tmp / "manifest.json").write_text(json.dumps(full, indent=1))
        if final.exists():
            remove_later(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            remove_later(tmp)
    _write_latest(root, final.name)
    sweep_trash(root)
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        remove_later(old)  # a checkpoint with disk tables can take minutes to free (engram.files)
    return final


def _write_latest(root: Path, name: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".latest-")
    with os.fdopen(fd, "w") as f:
        f.write(name + "\n")
    os.replace(tmp, root / LATEST)


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
    if manifest.get("format_version") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"checkpoint {ckpt} has format_version "
            f"{manifest.get('format_version')!r}; this library reads "
            f"{CHECKPOINT_FORMAT}"
        )
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
    try:
        missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False)
    except Exception as e:  # safetensors raises its own types for corrupt files and bad shapes
        raise ValueError(f"checkpoint {ckpt} does not fit this model: {e}") from e
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {ckpt} does not fit this model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    if optimizers:
        tensors = load_file(str(ckpt / "optim.safetensors"))
        for name, opt in optimizers.items():
            if name not in manifest["optimizers"]:
                raise ValueError(f"checkpoint {ckpt} has no state for optimiser {name!r}")
            _restore_optimizer(name, opt, tensors, manifest["optimizers"][name])
    return manifest
