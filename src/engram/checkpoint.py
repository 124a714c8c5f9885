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

A run of several ranks (`engram.parallel`) writes one checkpoint together: rank 0 makes the
temporary folder and tells the others its name; the dense state is gathered whole through
torch.distributed.checkpoint's state dicts (FSDP's shards assembled) and written by rank 0 in
the one-process format, so it loads at any world size; every rank writes its own table shards
into the same folder and sends rank 0 its manifest entries; rank 0 commits only once it holds
every rank's entries. A checkpoint some rank never finished is never renamed, so it is never
taken as complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import _remove_duplicate_names, load_file, load_model
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from engram.files import (
    disk_full,
    fsync_dir,
    fsync_file,
    remove_later,
    save_tensors,
    sweep_trash,
)

CHECKPOINT_FORMAT = 1
LATEST = "latest"


# Several ranks: torch.distributed.checkpoint's whole state dicts, gathered on rank 0's CPU.
_WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _optimizer_tensors(
    name: str, opt: torch.optim.Optimizer, model: torch.nn.Module, distributed: bool
) -> tuple[dict, dict]:
    """Split an optimiser state dict into tensors (for safetensors) and JSON-able scalars, keyed
    by parameter index as `opt.state_dict()` numbers them. Several ranks: the state dict comes
    whole (FSDP's shards gathered) from torch.distributed.checkpoint, keyed by parameter name,
    and is renumbered, so the file is the one a single process writes (empty on ranks > 0)."""
    if distributed:
        state = _indexed(get_optimizer_state_dict(model, opt, options=_WHOLE))
    else:
        state = opt.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):  # (a gathered one may view a larger buffer)
                value = value.detach().cpu().contiguous()
                tensors[f"{name}.{index}.{key}"] = value.clone() if distributed else value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _indexed(state: dict[str, Any]) -> dict[str, Any]:
    """A name-keyed optimiser state dict (torch.distributed.checkpoint's) keyed by parameter
    index instead: params are numbered through the groups in order, as Optimizer.state_dict."""
    if not state:  # ranks other than 0
        return {"state": {}, "param_groups": []}
    names = [name for group in state["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[n]: v for n, v in state["state"].items()}, "param_groups": groups}


def _restore_optimizer(name: str, opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    params = [p for group in opt.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    prefix = f"{name}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, field = key[len(prefix) :].split(".", 1)
            param = params[int(index)] if int(index) < len(params) else None
            if isinstance(param, DTensor) and value.shape == param.shape:
                # A whole tensor from the file, cut to this rank's shard (no communication).
                value = distribute_tensor(
                    value.to(param.device), param.device_mesh, param.placements, src_data_rank=None
                )
            state.setdefault(int(index), {})[field] = value
    for key, value in meta["scalars"].items():
        index, field = key.split(".", 1)
        state.setdefault(int(index), {})[field] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _save_model(
    model: torch.nn.Module, path: Path, distributed: bool, main: bool, leave_out: Collection[str]
) -> None:
    """`safetensors.torch.save_model`'s file, at any world size: several ranks gather the whole
    state dict through torch.distributed.checkpoint (a collective), rank 0 writes it. Tied
    weights are stored once under the name save_model keeps; `leave_out` names are not stored."""
    if distributed:  # {} on ranks > 0; a tensor may view a larger gathered buffer: own it
        state = {k: v.clone() for k, v in get_model_state_dict(model, options=_WHOLE).items()}
    else:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if not main:
        return
    state = {name: value for name, value in state.items() if name not in leave_out}
    by_param: dict[int, str] = {}  # tied names: one tensor, so that their storage is shared
    for name, param in model.named_parameters(remove_duplicate=False):
        first = by_param.setdefault(id(param), name)
        if first != name and first in state and name not in leave_out:
            state[name] = state[first]
    metadata = {}
    for kept, removed in _remove_duplicate_names(state).items():
        for name in removed:
            metadata[name] = kept
            del state[name]
    save_tensors(state, path, metadata=metadata or None)


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
    distributed: bool = False,
) -> Path:
    """Write `root/step-XXXXXXX` atomically and durably (`commit`); keep the newest `keep`.

    A manifest with a `base` entry (`base_entry`: the weights a pretrained model's folder
    provides, frozen, and that folder's digests) leaves those weights out of the checkpoint.
    Each attachment `name: write` is called with the folder `<checkpoint>/name` (not yet
    created) while the checkpoint is still temporary; what it returns goes into the manifest
    under `name`, so the attached files are committed by the same rename as the weights.
    `distributed`: every rank of the default process group calls this together (see the module
    docstring); each rank's attachments write into the same folders, and their manifest entries
    (dicts of dicts) are merged, key by key, on rank 0. Returns the committed folder.
    """
    rank = dist.get_rank() if distributed else 0

    def write(tmp: Path) -> dict[str, Any]:
        left_out = set((manifest.get(BASE) or {}).get("left_out", ()))
        _save_model(model, tmp / "model.safetensors", distributed, rank == 0, left_out)
        tensors, meta = {}, {}
        for name, opt in optimizers.items():
            t, m = _optimizer_tensors(name, opt, model, distributed)
            tensors.update(t)
            meta[name] = m
        if rank == 0:
            save_tensors(tensors, tmp / "optim.safetensors")
            for file in ("model.safetensors", "optim.safetensors"):
                fsync_file(tmp / file)
        attached = {name: write(tmp / name) for name, write in (attachments or {}).items()}
        return {"optimizers": meta, "rng": rng_state(), **manifest, **attached}

    if not distributed:
        return commit(root, step, write, keep)
    return _commit_together(Path(root), step, write, keep, rank, set(attachments or ()))


def _commit_together(
    root: Path,
    step: int,
    write: Callable[[Path], dict[str, Any]],
    keep: int,
    rank: int,
    attached: set[str],
) -> Path:
    """`commit` by every rank: rank 0 makes the folder and commits once all ranks have written."""
    box: list[Any] = [_begin(root, step, keep) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    tmp = Path(box[0])
    try:
        manifest = write(tmp)
        parts: list[Any] = [None] * dist.get_world_size() if rank == 0 else []
        dist.gather_object(manifest, parts if rank == 0 else None, dst=0)
        if rank == 0:
            for sub in tmp.iterdir():  # the ranks' attachment files are all in place now
                if sub.is_dir():
                    fsync_dir(sub)
            final = _finish(root, step, tmp, _merge_ranks(parts, attached), keep)
    except BaseException as e:  # a rank that fails exits; torchrun then ends the others
        if rank == 0:
            _discard(tmp, e)
        if disk_full(e):
            raise _no_space(root, step, e) from e
        raise
    box = [str(final) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)  # no rank goes on before the commit
    return Path(box[0])


def _merge_ranks(parts: list[dict[str, Any]], attached: set[str]) -> dict[str, Any]:
    """Rank 0's manifest, with each attachment's per-rank entries merged: an attachment returns
    dicts of dicts keyed by file name (distinct across ranks), merged key by key."""
    merged = dict(parts[0])
    for name in attached:
        merged[name] = {
            key: {k: v for part in parts for k, v in part[name][key].items()}
            for key in parts[0][name]
        }
    return merged


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
    root = Path(root)
    tmp = _begin(root, step, keep)
    try:
        return _finish(root, step, tmp, write(tmp), keep)
    except BaseException as e:
        _discard(tmp, e)
        if disk_full(e):
            raise _no_space(root, step, e) from e
        raise


def _discard(tmp: Path, e: BaseException) -> None:
    """Remove a checkpoint folder that will never be committed (gone already once renamed)."""
    if disk_full(e):  # now, not in the background: the space is needed back
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        remove_later(tmp)


def _no_space(root: Path, step: int, e: OSError) -> ValueError:
    """The one line a full disk gets: what failed, and that the last checkpoint is intact."""
    where = f" ({e.filename})" if e.filename else ""
    return ValueError(
        f"no space left on the device writing checkpoint step {step} to {root}{where}; the "
        f"last complete checkpoint ({_latest_name(root) or 'none yet'}) is intact: free "
        "space, then resume (--resume)"
    )


def _begin(root: Path, step: int, keep: int = 2) -> Path:
    """Steps 0-1 of `commit`: check, sweep what a crash left, and make the temporary folder."""
    if step < 0 or keep < 1:
        raise ValueError(f"step={step} must be >= 0 and keep={keep} >= 1")
    root.mkdir(parents=True, exist_ok=True)
    sweep_trash(root)
    # What a crash left mid-write (one run writes a folder at a time: `engram.files.FolderLock`):
    # checkpoint folders never committed, and `latest` files never renamed into place.
    for stale in [*root.glob(".tmp-*"), *root.glob(".latest-*")]:
        remove_later(stale)
    final = root / f"step-{step:07d}"
    if final.exists() and _latest_name(root) == final.name:
        raise ValueError(f"{final} is the latest checkpoint; save a later step")
    return Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))


def _finish(root: Path, step: int, tmp: Path, manifest: dict[str, Any], keep: int) -> Path:
    """Steps 2-5 of `commit`, once `tmp` holds every file (the caller removes `tmp` if this
    fails before the rename: `_discard`)."""
    final = root / f"step-{step:07d}"
    files = file_digests(tmp)
    write_manifest(
        tmp, {"format_version": CHECKPOINT_FORMAT, "step": step, **manifest, FILES: files}
    )
    fsync_dir(tmp)
    if final.exists():  # committed by a run that crashed before moving `latest`
        remove_later(final)
    os.replace(tmp, final)
    fsync_dir(root)
    _point_latest(root, final.name)
    older = [p for p in sorted(root.glob("step-*")) if p.name != final.name]
    for old in older[: max(0, len(older) - (keep - 1))]:
        remove_later(old)  # a checkpoint with disk tables can take minutes to free (engram.files)
    return final


def _json_digest(value: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    """`manifest` with the SHA-256 of its canonical JSON (any earlier one replaced). Parsing and
    re-encoding gives the same text, so a manifest can carry the digest of its own content: a
    flipped bit in a digit still parses, and a manifest checks itself as it checks its files."""
    manifest = {key: value for key, value in manifest.items() if key != SELF_DIGEST}
    return {**manifest, SELF_DIGEST: _json_digest(manifest)}


def unseal(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    """Remove a sealed manifest's digest, checked (ValueError naming `name` if its content
    changed since). A manifest written before sealing is accepted as it is."""
    recorded = manifest.pop(SELF_DIGEST, None)
    if recorded is not None and recorded != _json_digest(manifest):
        raise ValueError(
            f"{name} is damaged (its SHA-256 differs from the one recorded when it was written)"
        )
    return manifest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write `folder/manifest.json`, sealed (`seal`), and fsync it."""
    manifest = seal(manifest)
    with open(folder / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


FILES = "files"  # the manifest's record of every other file: its size and SHA-256
BASE = "base"  # weights left to a pretrained model's folder, and its digests (`base_entry`)
SELF_DIGEST = "manifest_sha256"  # the SHA-256 of the manifest's other keys (`_json_digest`)


def file_digests(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "sha256"}} of every file under a checkpoint folder but its
    manifest: what `verify_files` checks before anything is loaded. SHA-256 runs at 1.2-1.7
    GB/s here (bench/results/integrity.json); a checkpoint holds the weights and a table's
    written rows, not the table."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == "manifest.json":
            continue
        out[rel] = file_digest(path)
    return out


def file_digest(path: Path) -> dict[str, Any]:
    """{"bytes", "sha256"} of one file, as manifests record it."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": path.stat().st_size, "sha256": digest}


def verify_files(manifest: dict[str, Any]) -> None:
    """ValueError naming the first file of the checkpoint that is missing, of another size, or
    whose bytes changed since it was written (a flipped bit, a half copy); a manifest naming a
    path outside its folder is refused before anything is read. Checkpoints written before
    digests were recorded are accepted as they are."""
    ckpt = Path(manifest["path"])
    files = manifest.get(FILES)
    if files is not None:
        check_digests(ckpt, files, f"checkpoint {ckpt}", "is damaged")
    base = manifest.get(BASE)
    if base:  # the weights it left out, in the pretrained model's folder: unchanged since?
        where = f"base model {base['path']} (this checkpoint holds only the weights it trained)"
        check_digests(Path(base["path"]), base["files"], where, "changed since the run saved")


def check_digests(folder: Path, files: Any, label: str, changed: str) -> None:
    """ValueError naming the first of `files` ({rel: {bytes, sha256}}) under `folder` that is
    missing, of another size or another SHA-256; names outside `folder` are refused first."""
    if not isinstance(files, dict):
        raise ValueError(f"{label}: its record of files is not an object")
    for rel, record in files.items():
        path = _inside(folder, rel)
        if not path.is_file():
            raise ValueError(f"{label}: {rel} is missing")
        if not isinstance(record, dict) or path.stat().st_size != record.get("bytes"):
            raise ValueError(
                f"{label}: {rel} has {path.stat().st_size} bytes, the manifest "
                f"says {record.get('bytes') if isinstance(record, dict) else record!r} "
                "(truncated or replaced)"
            )
        if file_digest(path)["sha256"] != record.get("sha256"):
            raise ValueError(
                f"{label}: {rel} {changed} (its SHA-256 differs from the one recorded when "
                "it was written)"
            )


def base_entry(folder: str | Path, left_out: Collection[str]) -> dict[str, Any]:
    """A manifest's `base` entry: the weights `left_out` of its checkpoints (a pretrained
    model's frozen ones), and the digests of the folder that provides them (its config and
    safetensors files), checked before they are loaded again."""
    folder = Path(folder)
    names = ["config.json", *sorted(p.name for p in folder.glob("*.safetensors"))]
    files = {name: file_digest(folder / name) for name in names}
    return {"path": str(folder), "files": files, "left_out": sorted(left_out)}


def _inside(folder: Path, rel: str) -> Path:
    """`folder / rel`, refused unless it stays inside `folder` (a hostile manifest)."""
    path = Path(rel)
    if path.is_absolute() or ".." in path.parts or not rel:
        raise ValueError(f"checkpoint {folder}: the manifest names {rel!r}, outside its folder")
    return folder / path


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
    """A checkpoint folder, or the one a run's `checkpoints/latest` names. A `latest` that names
    no checkpoint (damaged, or its folder removed) is refused, never passed over: resuming from
    an older checkpoint, or from none, would silently throw training away."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / "manifest.json").is_file():
            return candidate
        if (candidate / LATEST).is_file():
            return _named_by_latest(candidate)
    raise ValueError(
        f"no checkpoint at {path} (expected a step-* folder with manifest.json, or a "
        "run folder with checkpoints/latest)"
    )


def _named_by_latest(root: Path) -> Path:
    try:
        name = (root / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{root / LATEST} is unreadable: {e}") from e
    if re.fullmatch(r"step-\d{7}", name) and (root / name / "manifest.json").is_file():
        return root / name
    complete = sorted(p.name for p in root.glob("step-*") if (p / "manifest.json").is_file())
    raise ValueError(
        f"{root / LATEST} names {name[:40]!r}, which is not a checkpoint here (the file is "
        f"damaged or the folder was removed); checkpoints here: {', '.join(complete) or 'none'}: "
        "write the name of the one to resume from into it"
    )


def read_manifest(path: str | Path) -> dict[str, Any]:
    ckpt = find_checkpoint(path)
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {ckpt}: manifest.json is unreadable: {e}") from e
    if not isinstance(manifest, dict):
        raise ValueError(f"checkpoint {ckpt} has a manifest that is not a JSON object")
    unseal(manifest, f"checkpoint {ckpt}: manifest.json")
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
    elsewhere: Collection[str] = (),
    verify: bool = True,
) -> dict[str, Any]:
    """Load weights (and optimiser states) into already-built objects; returns the manifest.
    `elsewhere`: names in the file this model holds elsewhere (e.g. a table it keeps in a row
    store, read by `embedded_rows`), not to be loaded into it. `verify=False`: the caller has
    checked every file already (`verify_files`)."""
    manifest = read_manifest(path)
    ckpt = Path(manifest["path"])
    if verify:
        verify_files(manifest)  # every file, tables included, before any is read
    # Only the errors a damaged or foreign file causes are the user's; anything else is a bug.
    try:
        missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False)
    except (SafetensorError, OSError) as e:  # truncated, garbage, missing
        raise ValueError(f"checkpoint {ckpt}: model.safetensors is unreadable: {e}") from e
    except RuntimeError as e:  # torch's size mismatches, one line per tensor
        shapes = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ValueError(f"checkpoint {ckpt} does not fit this model: {shapes}") from e
    unexpected = [name for name in unexpected if name not in elsewhere]
    provided = set((manifest.get(BASE) or {}).get("left_out", ()))  # built from the base folder
    missing = [name for name in missing if name not in provided]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {ckpt} does not fit this model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    if optimizers:
        load_optimizers(manifest, optimizers)
    return manifest


def load_optimizers(manifest: dict[str, Any], optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Load the optimiser states of the checkpoint `manifest` (from `read_manifest`) into
    already-built optimisers; a parameter FSDP shards takes this rank's part of its state."""
    ckpt = Path(manifest["path"])
    try:
        tensors = load_file(str(ckpt / "optim.safetensors"))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"checkpoint {ckpt}: optim.safetensors is unreadable: {e}") from e
    for name, opt in optimizers.items():
        if name not in manifest["optimizers"]:
            raise ValueError(f"checkpoint {ckpt} has no state for optimiser {name!r}")
        _restore_optimizer(name, opt, tensors, manifest["optimizers"][name])


def saved_weights(path: str | Path) -> set[str]:
    """The names of the tensors in a checkpoint's model.safetensors."""
    ckpt = find_checkpoint(path)
    try:
        with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
            return set(f.keys())
    except (SafetensorError, OSError) as e:
        raise ValueError(f"checkpoint {ckpt}: model.safetensors is unreadable: {e}") from e


def embedded_rows(
    manifest: dict[str, Any], weight: str, index: int, start: int, stop: int
) -> tuple[list[torch.Tensor], int]:
    """Rows [start, stop) of a table the checkpoint holds in its model as `weight` (an
    nn.Embedding trained by the "tables" optimiser, SparseAdam, as its parameter `index`):
    ([value, exp_avg, exp_avg_sq], each [stop - start, r], and SparseAdam's step count), read
    as slices, so a rank reads only its own range. Adam's state is zero before its first step."""
    ckpt = Path(manifest["path"])
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        value = f.get_slice(weight)[start:stop]
    state = manifest["optimizers"].get("tables", {}).get("scalars", {})
    step = state.get(f"{index}.step", 0)
    parts = [value]
    with safe_open(str(ckpt / "optim.safetensors"), framework="pt") as f:
        names = set(f.keys())
        for field in ("exp_avg", "exp_avg_sq"):
            key = f"tables.{index}.{field}"
            parts.append(f.get_slice(key)[start:stop] if key in names else torch.zeros_like(value))
        if f"tables.{index}.step" in names:
            step = f.get_tensor(f"tables.{index}.step").item()
    return parts, int(step)
