"""Configuration: a training run as typed data, and configs to and from plain data.

`TrainConfig` (model, optimiser, tables, data, schedule) is what `engram train` resolves, what a
run folder records as `config.json`, and what loading a trained run reads back: so it lives apart
from the trainer, and serving code reads it without importing the training loop.

Configs go to and from plain data (dicts, JSON, TOML recipes, `key=value` overrides) through
`to_dict`, `from_dict`, `load_recipe` and `apply_overrides`. Precedence, as the CLI applies it:
dataclass defaults < recipe file < `key=value` arguments. Keys are dotted paths through nested
dataclasses (`model.moe.num_routed=8`); values are checked against the field's declared type once,
here, so a typo or a wrong type is an error (ValueError) that names the key and the value.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engram.model import ModelConfig, model_preset
from engram.parallel import ParallelConfig
from engram.tables.plan import TablePlan


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 50
    schedule: str = "cosine"  # "cosine", "step" (x0.316 at 80% and 90%, as DeepSeek) or "constant"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # on the backbone's gradient norm; 0 disables
    sparse_tables: bool = True  # False: dense Adam over the whole table (for comparisons)
    backbone: str = "adamw"  # or "muon": Muon for hidden matrices, AdamW for the rest
    # AdamW's fused kernel (CPU and CUDA): one C++/CUDA loop over all parameters. On the CPU
    # torch's own default is a Python loop of ~10 ops per tensor: for the demo's 418 tensors
    # (64 experts per MoE layer) 24.3 ms a step against 7.8 fused (bench/results/moe_parts.json).
    # False: torch's default (the same update to float rounding).
    fused: bool = True

    def validate(self) -> None:
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(
                f"lr={self.lr} must be > 0 and min_lr_ratio={self.min_lr_ratio} in [0, 1]"
            )
        if self.backbone not in ("adamw", "muon"):
            raise ValueError(f"backbone={self.backbone!r} must be adamw or muon")
        if self.schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"schedule={self.schedule!r} must be cosine, step or constant")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("warmup_steps, weight_decay and grad_clip must be >= 0")


@dataclass(frozen=True)
class BaseConfig:
    """A pretrained Hugging Face decoder as the backbone (`engram.hf.backbone`), instead of our
    own LM. Only `model.engram` is then read from the model settings: the rest is the pretrained
    model's, and the tokenizer is the model's own (`tokenizer` is ignored)."""

    path: str = ""  # a local folder written by save_pretrained ("": our own LM); never downloaded
    train: str = "all"  # backbone parameters that train: "all", "none", or comma-separated globs
    dtype: str = "fp32"  # the backbone's weights: "fp32", "bf16", or "auto" (as saved)

    def validate(self) -> None:
        if self.dtype not in ("fp32", "bf16", "auto"):
            raise ValueError(f"base.dtype={self.dtype!r} must be fp32, bf16 or auto")
        if not self.train.strip():
            raise ValueError("base.train='' must be all, none, or comma-separated name globs")

    @property
    def patterns(self) -> tuple[str, ...]:
        """The name globs of the trainable backbone parameters (every one for "all")."""
        if self.train == "none":
            return ()
        if self.train == "all":
            return ("*",)
        return tuple(p.strip() for p in self.train.split(",") if p.strip())


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=lambda: model_preset("tiny"))
    base: BaseConfig = field(default_factory=BaseConfig)  # a pretrained HF backbone (optional)
    optim: OptimConfig = field(default_factory=OptimConfig)
    tables: TablePlan = field(default_factory=TablePlan)  # where each Engram table lives
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # under torchrun only
    tokenizer: str = "bpe:2048"  # "bpe:N" trains a byte-level BPE on the train split
    data: str = "default"
    seq_len: int = 128
    batch_size: int = 16  # the global batch: split over the ranks of a torchrun launch
    steps: int = 100
    eval_every: int = 50
    eval_tokens: int = 32768  # validation tokens, the same for every model
    log_every: int = 10
    ckpt_every: int = 0  # 0: only at the end
    seed: int = 0
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16", "fp32"
    peak_tflops: float = 0.0  # per device, for MFU; 0: a known GPU's bf16 peak, else no MFU
    compile: bool = False  # torch.compile the training step's model (the first steps compile)
    device: str = "auto"
    out_dir: str = "runs/train"
    progress: bool = True

    def validate(self) -> None:
        for name in ("seq_len", "batch_size", "steps", "eval_every", "log_every", "eval_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.peak_tflops >= 0:
            raise ValueError(f"peak_tflops={self.peak_tflops} must be >= 0")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision={self.precision!r} must be auto, bf16 or fp32")
        self.base.validate()
        if self.base.path:  # the model is the pretrained one: checked once it is loaded
            if self.model.engram is not None:
                self.model.engram.validate()
        elif self.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"seq_len={self.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
            )
        else:
            self.model.validate()
        self.optim.validate()
        self.tables.validate()
        self.parallel.validate()


# ---- configs to and from plain data ----------------------------------------------------------
_NONE = ("none", "null")


def to_dict(obj: Any) -> Any:
    """A dataclass (nested) as JSON-able data: tuples become lists."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    return obj


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), type(None) in typing.get_args(tp)
    return tp, False


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Coerce plain data `value` to type `tp` (dataclass, tuple, int, float, bool, str).

    Values come as strings (`key=value` arguments) or as TOML/JSON data; each is checked against
    the field's type here, once, so a wrong type is an error naming the key, never a traceback
    later nor a silent conversion (`steps = true`, `progress = 5`).
    """
    tp, optional = _strip_optional(tp)
    if value is None or (isinstance(value, str) and value.lower() in _NONE and tp is not str):
        if optional:
            return None
        raise ValueError(f"{key} cannot be none")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ValueError(f"{key} must be a table of fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if typing.get_origin(tp) is tuple:
        item_types = {a for a in typing.get_args(tp) if a is not Ellipsis}
        if len(item_types) != 1:  # a dataclass declared tuple[int, str]: our bug, not the user's
            raise TypeError(f"config field {key}: only tuple[X, ...] is supported, not {tp}")
        (item,) = item_types
        if not isinstance(value, str | list | tuple):
            raise ValueError(f"{key}={value!r} is not a valid list (use [a, b] or 'a,b')")
        items = value.split(",") if isinstance(value, str) else value
        return tuple(
            _convert(item, v.strip() if isinstance(v, str) else v, key)
            for v in items
            if not (isinstance(v, str) and not v.strip())
        )
    if tp is Any:
        return value
    try:
        return _scalar(tp, value)
    except (ValueError, OverflowError):
        raise ValueError(f"{key}={value!r} is not a valid {tp.__name__}") from None


def _scalar(tp: type, value: Any) -> Any:
    """`value` as a bool, int, float or str; ValueError (or OverflowError) when it is not one."""
    if tp not in (str, bool, int, float):  # a field type this module cannot parse: our bug
        raise TypeError(f"config fields of type {tp!r} are not supported")
    if tp is str:
        if not isinstance(value, str):
            raise ValueError
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ValueError  # a number is not a flag: `progress = 5` is a mistake
    # bool is an int subclass: `steps = true` must not train one step.
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError
    if tp is float:
        number = float(value)  # OverflowError for an int beyond float range
        if not math.isfinite(number):
            raise ValueError
        return number
    if isinstance(value, int):  # tp is int from here on
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass  # maybe `1e3`: an integer written as a float
    number = float(value)
    if not math.isfinite(number) or not number.is_integer():
        raise ValueError
    return int(number)


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from plain data; unknown keys are an error naming them.

    A dataclass that renamed a field lists `RENAMED = {old: new}` (a ClassVar): configs written
    before the rename (run folders, study summaries) still read, under the new name.
    """
    renamed = getattr(cls, "RENAMED", {})
    data = {renamed.get(k, k): v for k, v in data.items()}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"unknown field(s) {[prefix + k for k in unknown]}; "
            f"known: {sorted(prefix + n for n in names)}"
        )
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - set(data))
    if missing:
        raise ValueError(f"missing field(s) {[prefix + k for k in missing]}")
    kwargs = {k: _convert(hints[k], v, prefix + k) for k, v in data.items()}
    # Checked above rather than by catching TypeError from cls(...), which would also turn a
    # bug in a __post_init__ into a user error.
    return cls(**kwargs)


def apply_overrides(obj: Any, overrides: Mapping[str, Any]) -> Any:
    """Return `obj` with dotted-path overrides applied (values as strings or plain data)."""
    for key, value in overrides.items():
        obj = _set(obj, key.split("."), value, key)
    return obj


def _set(obj: Any, path: list[str], value: Any, key: str) -> Any:
    if not dataclasses.is_dataclass(obj):
        raise ValueError(
            f"cannot set {key}: {'.'.join(path)} is not inside a config section "
            "(set the section first, or it is none)"
        )
    fields = {f.name for f in dataclasses.fields(obj)}
    name = getattr(obj, "RENAMED", {}).get(path[0], path[0])
    if name not in fields:
        raise ValueError(f"unknown key {key!r}: {type(obj).__name__} has {sorted(fields)}")
    hints = typing.get_type_hints(type(obj))
    if len(path) == 1:
        new = _convert(hints[name], value, key)
    else:
        new = _set(getattr(obj, name), path[1:], value, key)
    return dataclasses.replace(obj, **{name: new})


def parse_assignments(items: list[str]) -> dict[str, str]:
    """`["a.b=1", "c=x"]` -> `{"a.b": "1", "c": "x"}`."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"bad override {item!r}: use key=value")
        out[key.strip()] = value.strip()
    return out


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables -> dotted keys (TOML sections become path prefixes)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A TOML recipe as dotted keys."""
    path = Path(path)
    try:
        return flatten(tomllib.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise ValueError(f"recipe {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"recipe {path} is not valid TOML: {e}") from e
