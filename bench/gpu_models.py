"""What bench/gpu_train.py and bench/gpu_decode.py share: a preset's model with and without
Engram on one device, built as the trainer builds it; timing that waits for the device; and the
JSON record each benchmark writes and prints as its last line.

Both scripts run on a lent GPU from bench/gpu.sh, and on a CPU at tiny sizes (`--cpu-smoke`).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engram.assembly import build_model, get_tokenizer
from engram.experiments.report import machine_info
from engram.inference.captured import CapturedDecoder
from engram.model import EngramLM, model_preset
from engram.tokenizer import Tokenizer

ARMS = ("without", "with")  # Engram off the backbone, and on it


def model_pair(
    preset: str, tokenizer: str, device: torch.device
) -> tuple[dict[str, EngramLM], Tokenizer]:
    """The preset's model ("with" Engram) and its backbone alone ("without"), on `device`.

    `tokenizer` "" means the preset's spec tokenizer (DeepSeek's for `gpu` and `tiny`): the
    vocabulary sizes the embedding and LM head, as in a real run; the benchmarks feed random
    ids, so no corpus is read (a `bpe:N` name trains on the stdlib corpus).
    """
    config = model_preset(preset)
    if config.engram is None:
        raise ValueError(f"preset {preset!r} has no Engram: nothing to compare")
    tok = get_tokenizer(tokenizer or config.engram.spec.tokenizer, "default")
    models = {}
    for arm in ARMS:
        torch.manual_seed(0)
        arm_config = config if arm == "with" else config.with_(engram=None)
        # Built on the CPU, then moved, as the trainer does (the hasher stays a CPU object).
        model, _ = build_model(arm_config, tok, tok.name)
        models[arm] = model
    share_backbone(models["with"], models["without"])
    return {arm: model.to(device) for arm, model in models.items()}, tok


def share_backbone(with_engram: EngramLM, without: EngramLM) -> EngramLM:
    """Give `with_engram` the backbone weights of `without` (its Engram layers keep theirs).

    Why: the two models draw their weights from one seed in different orders, so each gets
    its own random router. A router of its own sends the same tokens to more or fewer distinct
    experts per step (at batch 8 of the `demo` preset, decoding one token stream: 14.37 against
    13.44 per MoE layer, `routing` in bench/results/decode.json), and that difference, not
    Engram, would then sit in the ratio. With one backbone only Engram's work and its effect
    on the hidden states differ.
    """
    missing, unexpected = with_engram.load_state_dict(without.state_dict(), strict=False)
    strays = [key for key in missing if ".engram." not in key and "input_memory." not in key]
    if unexpected or strays:
        raise ValueError(f"not the same backbone: {unexpected or strays}")
    return with_engram


class Captured:
    """A model whose one-token steps run captured (`engram.inference.captured`; on CUDA with
    `cuda_graph`, replayed as CUDA graphs); a prompt is prefilled by the model itself."""

    def __init__(self, model: EngramLM, cuda_graph: bool = False) -> None:
        self.model, self.decoder = model, CapturedDecoder(model, cuda_graph=cuda_graph)

    def new_cache(self, batch: int, capacity: int):
        return self.model.new_cache(batch, capacity)

    def __call__(self, ids: torch.Tensor, cache) -> torch.Tensor:
        if ids.shape[1] == 1:
            return self.decoder(ids, cache)
        logits = self.model(ids, cache=cache)
        # Bound to the prefilled cache here, outside the decode's clock: the first time a
        # package compiles, and on CUDA a graph is recorded.
        self.decoder.prepare(cache)
        return logits


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds `fn()` takes, its queued device work included (CUDA runs asynchronously)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved(
    measure: Callable[[str], float], warmup: int, repeats: int, arms: tuple[str, ...] = ARMS
) -> dict[str, list[float]]:
    """What `measure(arm)` returns (seconds) for every arm: `warmup` untimed rounds, then
    `repeats` rounds whose order alternates, so drift (clocks, other load) hits all arms."""
    for _ in range(warmup):
        for arm in arms:
            measure(arm)
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for r in range(repeats):
        for arm in arms if r % 2 == 0 else tuple(reversed(arms)):
            times[arm].append(measure(arm))
    return times


def record(benchmark: str, device: torch.device, config: dict, results: dict) -> dict[str, Any]:
    """The JSON record: machine (with the GPU's name), versions, commit, config, results."""
    machine = machine_info()
    return {
        "benchmark": benchmark,
        "machine": machine,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
        "commit": machine["commit"],
        "config": config,
        "results": results,
    }


def write(rec: dict[str, Any], out: Path) -> None:
    """Write the record to `out` and print it as the last line of the output."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=2) + "\n")
    print(json.dumps(rec), flush=True)
