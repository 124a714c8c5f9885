"""Engram through `transformers.Trainer` (`engram.hf.trainer`): a few lines, and exact resume.

A small Llama with Engram attached trains for six steps with its tables in a row store (host
memory, and a disk file behind the hot-row cache); a second Trainer resumes from the first's
step-3 checkpoint and must end with the same logits and the same table rows, bit for bit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

from engram.hf.attach import add_engram, get_attachment
from engram.hf.tiny import tiny_decoder
from engram.hf.trainer import RECORD, engram_for_trainer
from engram.spec import SpecConfig, resolve
from engram.tables.plan import TablePlan
from engram.tokenizer import train_bpe

TEXT = "\n".join(f"def f{i}(x):\n    return x + {i}  # note {i % 7}" for i in range(400))
PLANS = {
    "host": TablePlan(placement="host"),
    "disk+cache": TablePlan(placement="disk", cache_rows=512),
}


@pytest.fixture(scope="module")
def tok():
    return train_bpe([TEXT], vocab_size=300)


def _data(tok) -> list[dict[str, torch.Tensor]]:
    ids = tok.encode(TEXT)
    windows = [ids[i : i + 32] for i in range(0, 32 * 24, 32)]
    return [{"input_ids": torch.tensor(w), "labels": torch.tensor(w)} for w in windows]


def _train(tok, out: Path, plan: TablePlan, resume: Path | None = None):
    config = SpecConfig(
        tokenizer="test", layer_ids=(1,), orders=(2, 3), heads_per_order=2,
        base_sizes=(1009, 1013), row_dim=8,
    )  # fmt: skip
    model = tiny_decoder("llama", tok)
    add_engram(model, resolve(config, tokenizer=tok), tok)
    optimizer, callback = engram_for_trainer(model, out / "live-tables", lr=3e-3, plan=plan)
    args = TrainingArguments(
        output_dir=str(out), max_steps=6, save_steps=3, per_device_train_batch_size=4,
        learning_rate=3e-3, warmup_steps=2, report_to=[], use_cpu=True, seed=0,
        logging_steps=1, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=_data(tok), optimizers=(optimizer, None),
        callbacks=[callback],
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return model, callback.tables


@pytest.mark.parametrize("placement", list(PLANS))
def test_trainer_trains_the_tables_and_resumes_exactly(tok, tmp_path, placement):
    plan = PLANS[placement]
    straight, tables = _train(tok, tmp_path / "straight", plan)
    ids = torch.tensor([tok.encode(TEXT[:200])[:40]])
    ((name, table),) = tables.tables.items()
    rows = table.store.read(torch.arange(table.store.num_rows))
    assert table.optimizer.steps == 6  # the row optimiser stepped with the Trainer
    assert rows.abs().sum() > 0 and (tmp_path / "straight" / "checkpoint-3" / RECORD).is_file()
    # A new process resumes from the step-3 checkpoint.
    shutil.copytree(tmp_path / "straight" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed, again = _train(tok, tmp_path / "resumed", plan, tmp_path / "resumed" / "checkpoint-3")
    with torch.no_grad():
        assert torch.equal(resumed.eval()(ids).logits, straight.eval()(ids).logits)
    ((_, other),) = again.tables.items()
    assert torch.equal(other.store.read(torch.arange(other.store.num_rows)), rows)
    for model, placed in ((straight, tables), (resumed, again)):
        get_attachment(model).remove(model)
        placed.close()
