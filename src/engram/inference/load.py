"""Loading a trained run for use: a typed handle with its model, tables, tokenizer, spec, config.

`load_trained(path)` reads a run folder (or one of its checkpoints), checks every piece against
the checkpoint's manifest, assembles the model as the run did (`engram.assembly`), and places its
tables for inference: the run's `TablePlan`, except that a disk table is the checkpoint's own
file, mapped read-only where it lies (nothing copied, the run's files never written), and that
cached or off-device tables fetch each forward's rows ahead. Evaluation, generation, quantisation,
the Hugging Face export and the studies all start here; nothing here imports the trainer.

A run trained on several ranks saved each table as shards, one file per rank, and loads as one
model: a disk table reads its shards in place as one table (`engram.tables.reshard`), a host or
device table is restored from them into one store, and a table the plan embeds in the model
(which a shard never is) becomes its embedding again once restored.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from engram.assembly import build_model, pick_device
from engram.checkpoint import FILES, load_checkpoint, read_manifest
from engram.config import TrainConfig, from_dict
from engram.model import EngramLM, ModelConfig
from engram.model.accounting import count_params_from_config
from engram.module import HashedMemory, lazy_tables
from engram.spec import HashSpec, derive_primes
from engram.tables.placed import PlacedTables, table_name
from engram.tables.plan import LayerPlacement, TablePlan
from engram.tables.reshard import saved_entries
from engram.tokenizer import Tokenizer, load_tokenizer


@dataclass
class Trained:
    """A trained model ready for inference, and everything it was trained with."""

    model: EngramLM  # in eval mode, on the device asked for
    tables: PlacedTables  # tables held outside the model (empty when all are embeddings)
    tokenizer: Tokenizer
    spec: HashSpec | None  # None for a model without Engram
    config: TrainConfig  # the run's resolved config
    manifest: dict[str, Any]  # the checkpoint's manifest; "path" is its folder

    @property
    def checkpoint(self) -> Path:
        return Path(self.manifest["path"])


def load_trained(path: str | Path, device: str = "auto") -> Trained:
    """A trained model from a run folder or checkpoint, checked against its manifest.

    ValueError (a user's mistake: a wrong path, a mismatched or corrupt checkpoint) names what
    is wrong before any weight is loaded.
    """
    manifest = read_manifest(path)
    ckpt = Path(manifest["path"])
    tok_path = ckpt.parent.parent / "tokenizer.json"
    if not tok_path.is_file():
        raise ValueError(f"no tokenizer.json in the run folder {ckpt.parent.parent}")
    tok = load_tokenizer(tok_path)
    if tok.fingerprint != manifest["tokenizer_fingerprint"]:
        raise ValueError(f"{tok_path} is not the tokenizer this checkpoint was trained with")
    config = from_dict(TrainConfig, manifest["config"])
    check_affordable(
        config.model.with_(vocab_size=tok.vocab_size), config.tables, manifest, config.base.path
    )
    spec_tokenizer = (manifest["spec"] or {}).get("tokenizer", str(tok_path))
    # Seeded as the run was, so that each table's init (which untouched rows of a placed table
    # read as) is the run's; the caller's RNG is left as it was.
    with torch.random.fork_rng(devices=[]), lazy_tables():
        torch.manual_seed(config.seed)
        model, spec = build_model(config.model, tok, spec_tokenizer, config.base)
    if spec is not None and spec.to_dict() != manifest["spec"]:
        raise ValueError("the checkpoint's hash spec does not match what its config derives")
    target = pick_device(device)
    tables = place_for_inference(model, config, target, ckpt / "tables", manifest.get("tables"))
    load_checkpoint(ckpt, model)
    if tables:
        if "tables" not in manifest:
            raise ValueError(f"checkpoint {ckpt} has no tables/ for its placed Engram tables")
        restore_saved(tables, config.tables, ckpt / "tables", manifest["tables"])
    model.to(target).eval()
    return Trained(model, tables, tok, spec, config, manifest)


def check_affordable(
    model: ModelConfig, plan: TablePlan, manifest: dict[str, Any], base: str = ""
) -> None:
    """Refuse, before anything is built, a checkpoint whose config describes more weights than
    its weights file holds (a hostile or mismatched config.json would otherwise allocate them,
    terabytes perhaps), or tables the plan holds in memory that exceed the free RAM. A run on a
    pretrained `base` is built from that model's own folder: only its tables are counted."""
    ckpt = Path(manifest["path"])
    if not base:
        _check_weights(model, ckpt, manifest)
    _check_tables(model, plan, ckpt)


def _check_weights(model: ModelConfig, ckpt: Path, manifest: dict[str, Any]) -> None:
    counts = count_params_from_config(model)
    dense = 4 * (counts.p_tot - counts.engram_tables + counts.embedding + counts.head)
    record = manifest.get(FILES, {}).get("model.safetensors", {})
    weights = record.get("bytes") if isinstance(record, dict) else None
    if not isinstance(weights, int):
        weights = (ckpt / "model.safetensors").stat().st_size
    if dense > weights + (1 << 20):  # the file also holds buffers and a header: never fewer
        raise ValueError(
            f"checkpoint {ckpt}: its config describes {dense / 1e9:.3g} GB of weights, its "
            f"model.safetensors holds {weights / 1e9:.3g} GB"
        )


def _check_tables(model: ModelConfig, plan: TablePlan, ckpt: Path) -> None:
    if model.engram is None:
        return
    spec = model.engram.spec
    primes = derive_primes(spec.layer_ids, spec.orders, spec.heads_per_order, spec.base_sizes)
    in_memory = sum(
        sum(p) * spec.row_dim * 4
        for layer, p in zip(spec.layer_ids, primes, strict=True)
        if plan.for_layer(layer).placement != "disk"
    )
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if in_memory > free:
        raise ValueError(
            f"checkpoint {ckpt}: its tables would hold {in_memory / 1e9:.3g} GB in memory, more "
            f"than the {free / 1e9:.3g} GB of free RAM (a disk placement serves them from disk)"
        )


def inference_plan(plan: TablePlan, sharded: Collection[int] = ()) -> TablePlan:
    """The run's plan with every disk table read from the checkpoint folder itself. The tables of
    layers `sharded`, saved from row stores (shards, or a resumed run's store), are placed in host
    memory where the plan embeds them (device, adam), to be restored before they become
    embeddings."""
    stores = tuple(LayerPlacement(layer=i, placement="host") for i in sorted(sharded))
    stores = tuple(e for e in stores if plan.for_layer(e.layer).embedded)
    moved = {e.layer for e in stores}
    layers = tuple(replace(e, path="") for e in plan.layers if e.layer not in moved)
    return replace(plan, path="", layers=layers + stores)


def restore_saved(
    tables: PlacedTables, plan: TablePlan, folder: Path, saved: dict[str, Any]
) -> None:
    """Restore placed `tables` from the files in `folder` that `saved` (a manifest's "tables")
    describes; those the run's `plan` keeps in the model (a sharded run's) become embeddings."""
    tables.restore(folder, saved)
    embedded = [
        name
        for name, table in tables.tables.items()
        if plan.for_layer(table.memory.layer_id).embedded
    ]
    if embedded:
        tables.embed(embedded)


def place_saved_tables(
    memories: Sequence[HashedMemory],
    plan: TablePlan,
    device: torch.device,
    folder: Path,
    saved: dict[str, Any] | None,
    betas: tuple[float, float],
) -> PlacedTables:
    """Place the tables of `memories` as a run with `plan` did, for reading: disk tables are the
    saved files in `folder`, mapped read-only. `saved`: the manifest's "tables", which say which
    tables the run saved from row stores (e.g. shards of several ranks; see the module
    docstring); `betas`: its row optimiser's."""
    names = saved_entries(saved)  # held in stores, e.g. sharded, though the plan may embed them
    sharded = [m.layer_id for m in memories if table_name(m.layer_id) in names]
    reading = inference_plan(plan, sharded)
    if reading.all_embedded:
        return PlacedTables(memories, plan, ".", device, betas=betas)
    return PlacedTables(memories, reading, folder, device, betas=betas, read_only=True)


def place_for_inference(
    model: EngramLM,
    config: TrainConfig,
    device: torch.device,
    folder: Path,
    saved: dict[str, Any] | None = None,
) -> PlacedTables:
    """`place_saved_tables` for a run's model; cached and off-device tables fetch each
    forward's rows ahead. The stores close when the model is collected."""
    betas = (config.optim.beta1, config.optim.beta2)
    tables = place_saved_tables(model.engram_layers, config.tables, device, folder, saved, betas)
    if tables:
        tables.fetch_ahead(model)  # a forward's rows are read before its layers run
        weakref.finalize(model, tables.close)
    return tables
