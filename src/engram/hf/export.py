"""Export a run trained on a pretrained Hugging Face model: its Engram alone, or a merged folder.

    engram export --ckpt RUN --out DIR           the Engram (`save_engram`'s format): its weights,
                                                 spec, layers, tokenizer fingerprint and module
                                                 config, and its tables as the run placed them
                                                 (copied from the checkpoint: a disk table stays
                                                 a disk table, read where it lies on load)
    engram export --ckpt RUN --out DIR --merged  the backbone as trained (`save_pretrained`), the
                                                 Engram beside it and the tokenizer: one call,
                                                 `load_merged(DIR)`, gives the model back, and it
                                                 generates exactly what the run's model does

`load_engram(model, DIR, tokenizer)` attaches an exported Engram to any copy of the base model.
Every file is recorded with its SHA-256 in engram.json and checked on load.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

from engram.config import to_dict
from engram.files import fsync_dir
from engram.hf.attach import TABLES, load_engram, save_engram
from engram.hf.backbone import HFEngramLM
from engram.inference.load import Trained, load_trained
from engram.tokenizer import load_tokenizer


def export_run(path: str | Path, out: str | Path, merged: bool = False) -> Path:
    """Write the run at `path` (a run folder or checkpoint on a pretrained base) to the new
    folder `out`, atomically: its Engram alone, or `merged` with the trained backbone."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} exists: remove it or choose another folder")
    trained = load_trained(path, device="cpu")
    if not isinstance(trained.model, HFEngramLM):
        raise ValueError(
            f"{path} is a run of our own LM: export it with "
            "engram.hf.EngramForCausalLM.from_run(path).save_pretrained(folder)"
        )
    if trained.model.attachment is None and not merged:
        raise ValueError(f"{path} has no Engram (model.engram=none): export it --merged")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{uuid.uuid4().hex[:8]}")
    try:
        if merged:  # a run without Engram: the backbone alone (pretrained further, say)
            _save_backbone(trained, tmp)
        if trained.model.attachment is not None:
            _save_engram(trained, tmp)
        tmp.rename(out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if trained.tables:
            trained.tables.close()
    return out


def _save_backbone(trained: Trained, folder: Path) -> None:
    """The pretrained model's weights as trained (Engram's kept apart), config and tokenizer."""
    hf = trained.model.hf
    state = {k: v for k, v in hf.state_dict().items() if ".engram." not in k}
    hf_logging.disable_progress_bar()
    hf.save_pretrained(folder, state_dict=state)
    trained.tokenizer.save(folder / "tokenizer.json")


def _save_engram(trained: Trained, folder: Path) -> None:
    """The Engram, and the tables the run placed off the model as its checkpoint holds them."""
    tables = None
    if trained.tables:  # tables still in row stores (embedded ones left them): files copied
        ckpt = trained.checkpoint / "tables"
        shutil.copytree(ckpt, folder / TABLES)
        saved = trained.manifest["tables"]
        tables = {"plan": to_dict(trained.config.tables), "saved": saved}
        # Untouched rows read as their init, drawn when the run built its model: kept with them.
        inits = {str(m.layer_id): m.init.to_json() for m in trained.model.engram_layers}
        tables["inits"] = inits
        tables["betas"] = [trained.config.optim.beta1, trained.config.optim.beta2]  # RowAdam's
    folder.mkdir(parents=True, exist_ok=True)
    save_engram(trained.model.hf, folder, tables)


def load_merged(folder: str | Path, device: str = "cpu") -> PreTrainedModel:
    """A merged export (`export_run(..., merged=True)`) as one model: the backbone from its
    `save_pretrained` files, the Engram (if the run had one) attached with its tables, in eval
    mode."""
    folder = Path(folder)
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder} is not a merged export: {e}") from e
    model.to(device)
    if (folder / "engram.json").is_file():
        load_engram(model, folder, load_tokenizer(folder))
    return model.eval()
