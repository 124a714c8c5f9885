"""Cached decoding with Engram's per-token work compiled ahead of time (AOTInductor).

Why: a decode step's Engram work is a few thousand FLOPs spread over some 70 tiny ops (hash
one token, gather its rows, two projections, the gate, the conv), and on a CPU each op costs
microseconds of dispatch whatever its size. `torch.compile` fuses the ops, but its call
overhead (guards and runtime wrappers) eats the gain at this size. AOTInductor compiles the
same eager code through `torch.export` into a shared library whose runner takes a flat list of
tensors: one call of a tiny function costs 16 us through `torch.compile`, 1.2 us through such a
runner and 4.7 us eager on this project's 2-core machine (`bench/call_overhead.py`).

`compile_decoding(model)` installs two drop-ins, both compiled from the eager code as it
stands (so there is no second implementation to keep in step):

- on the hasher, `fast_hash_one` for `NgramHasher.hash_one` (one token's rows, exact: integer
  arithmetic, tested bit for bit);
- on every Engram layer, `fast_step` for `Engram._step` (the gated value and the conv step;
  fused float arithmetic: logits within 1e-5 of eager, tested).

Each compiles on first use for the layout it meets (every tensor's shape, strides, dtype and
device; seconds on a CPU) and is kept under `engram.vocab.cache_dir() / "aot"`, keyed by the
torch version, the instruction set, the source of the code it compiles, the module's
configuration and the layout; a later process loads it in a fraction of a second. Parameters
and the table go in as inputs on every call, never baked in: a model keeps training, loading
and moving its weights as before.

Limits: inference only (with grad enabled the eager step runs, so training is unchanged); a
table read through a row source (host or disk placement) runs eagerly too; compiling needs a
C++ compiler on a CPU (as `torch.compile` does).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

import engram.hashing
import engram.module
from engram.hashing import NgramHasher
from engram.model import EngramLM
from engram.module import Engram
from engram.vocab import cache_dir

Layout = tuple  # what a compiled package is specialised to (shapes, strides, dtypes, device)


def compile_decoding(
    model: EngramLM, batch_size: int | None = None, directory: Path | str | None = None
) -> EngramLM:
    """Install AOT-compiled decode steps on `model`'s hasher and Engram layers; returns it.

    With `batch_size`, the steps are compiled (or loaded) now, by decoding one token on a
    scratch cache, so that the first real step does not pay for it; otherwise on first use.
    `directory` holds the compiled packages (default: `cache_dir() / "aot"`). Undo with
    `uncompile_decoding`. Outputs match the eager path (tests/test_compiled_decoding.py).
    """
    where = Path(directory) if directory is not None else cache_dir() / "aot"
    if model.hasher is not None:
        model.hasher.fast_hash_one = CompiledHashOne(model.hasher, where)
    for module in model.modules():
        if isinstance(module, Engram):
            module.fast_step = CompiledStep(module, where)
    if batch_size is not None:
        device = next(model.parameters()).device
        with torch.inference_mode():
            model(
                torch.zeros(batch_size, 1, dtype=torch.int64, device=device),
                cache=model.new_cache(batch_size, 1),
            )
    return model


def uncompile_decoding(model: EngramLM) -> EngramLM:
    """Back to the eager decode steps."""
    if model.hasher is not None:
        model.hasher.fast_hash_one = None
    for module in model.modules():
        if isinstance(module, Engram):
            module.fast_step = None
    return model


class AotFunction:
    """A pure function of tensors, compiled by AOTInductor once per input layout.

    `fn(*tensors)` must return a tuple of tensors and may update its inputs in place (as the
    conv's window is). `source` names everything the compiled code depends on besides the
    layout (code, configuration): it is part of the package's file name.

    `single_threaded`: the runner skips AOTInductor's bookkeeping for calls from several
    threads (a lock, and on CUDA an event recorded after each call and waited for before the
    next), which may then not call it at once. On CUDA that wait would also break the
    recording of a CUDA graph around a call.
    """

    def __init__(
        self,
        name: str,
        fn: Callable[..., Any],
        source: str,
        directory: Path,
        single_threaded: bool = False,
    ) -> None:
        self.name, self.fn, self.directory = name, fn, directory
        self.source, self.single_threaded = source, single_threaded
        self.compiles = 0  # packages built (not loaded from disk) by this object
        self._runners: dict[Layout, Callable[[list[torch.Tensor]], list[torch.Tensor]]] = {}

    def __call__(self, layout: Layout, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        run = self._runners.get(layout)
        if run is None:
            run = self.prepare(layout, tensors)
        return run(tensors)

    def prepare(self, layout: Layout, tensors: list[torch.Tensor]) -> Callable:
        """The runner for `layout`, loaded or compiled now (`tensors` are only examples)."""
        if layout not in self._runners:
            self._runners[layout] = self._load(layout, tensors)
        return self._runners[layout]

    def package(self, layout: Layout, tensors: list[torch.Tensor]) -> Path:
        """Where the package for `layout` lives. The key holds the instruction sets it was
        built for (Inductor compiles for the machine it runs on)."""
        key = repr((torch.__version__, _isa(tensors), self.source, _LOWERING, layout)).encode()
        return self.directory / f"{self.name}-{hashlib.sha256(key).hexdigest()[:20]}.pt2"

    def _load(self, layout: Layout, tensors: list[torch.Tensor]):
        path = self.package(layout, tensors)
        if not path.exists():
            self._compile(tensors, path)
        package = torch._inductor.aoti_load_package(
            str(path), run_single_threaded=self.single_threaded
        )
        return package.loader.run

    def _compile(self, tensors: list[torch.Tensor], path: Path) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with torch.inference_mode(False), torch.no_grad():
            examples = tuple(_example(t) for t in tensors)
            program = torch.export.export(_Traced(self.fn), examples)
            cpu = all(t.device.type == "cpu" for t in tensors)
            if cpu:  # on CUDA Inductor unfuses the bias itself where its users are pointwise
                decompositions = torch.export.default_decompositions()
                decompositions[torch.ops.aten.linear.default] = _linear_as_mm_add
                program = program.run_decompositions(decompositions)
            # One thread on a CPU: a decode step's kernels are too small to split, and an
            # OpenMP region costs more to wake than the work inside it.
            configs = {"cpp.threads": 1} if cpu else {}
            with tempfile.TemporaryDirectory(dir=self.directory) as scratch:
                partial = Path(scratch) / path.name
                torch._inductor.aoti_compile_and_package(
                    program, package_path=str(partial), inductor_configs=configs
                )
                os.replace(partial, path)  # whole or absent: another process may be loading it
        self.compiles += 1


class CompiledHashOne:
    """`NgramHasher.hash_one`, compiled: the same arguments, the same rows bit for bit."""

    def __init__(self, hasher: NgramHasher, directory: Path) -> None:
        self.hasher = hasher
        source = _source_digest(engram.hashing) + hasher.spec.digest
        self.function = AotFunction("hash-one", hasher.hash_one, source, directory)

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.is_grad_enabled():  # integer-only, but keep the compiled path to inference
            return self.hasher.hash_one(*tensors)
        # ids may be a column of a longer batch, and a history a fresh tensor or a slice of
        # the last step's buffer: one layout (one package) for all of them.
        ids, history, *constants = tensors
        tensors = (ids.contiguous(), history.contiguous(), *constants)
        rows, history = self.function(_layout(tensors), list(tensors))
        return rows, history


class CompiledStep:
    """`Engram._step` of one module, compiled: the same arguments and result (and the same
    in-place update of the conv window)."""

    def __init__(self, module: Engram, directory: Path) -> None:
        self.module = module
        source = _source_digest(engram.module) + repr(module.config) + module.spec.digest
        self._functions = {
            has_starts: AotFunction(
                "engram-step", self._traced(has_starts), f"{source} starts={has_starts}", directory
            )
            for has_starts in (False, True)
        }
        self._tree: list[tuple[dict, str, nn.Module | None]] | None = None  # None: not read yet
        self._slots: list[tuple[dict, str]] = []

    def __call__(
        self,
        h: torch.Tensor,
        rows: torch.Tensor,
        starts: torch.Tensor | None,
        window: torch.Tensor,
    ) -> torch.Tensor:
        module = self.module
        if torch.is_grad_enabled() or module.row_source is not None:
            return module._step(h, rows, starts, window)
        state = self._state()
        inputs = [h, rows, window] if starts is None else [h, rows, window, starts]
        # The state's shapes too: layers of one config differ in their table's rows.
        layout = (_layout(state), _layout(inputs))
        (y,) = self._functions[starts is not None](layout, [*state, *inputs])
        return y

    def _state(self) -> list[torch.Tensor]:
        """The module's parameters and buffers, read afresh on every call: a weight assigned
        or loaded later, or a table swapped by `use_table`, is what the next step uses."""
        tree = self._tree
        if tree is None or not all(children.get(name) is child for children, name, child in tree):
            self._tree = _tree(self.module)
            self._slots = [(owner, key) for _, owner, key in _tensor_slots(self.module)]
        return [owner[key] for owner, key in self._slots]

    def _traced(self, has_starts: bool) -> Callable[..., tuple[torch.Tensor]]:
        module = self.module

        def step(*tensors: torch.Tensor) -> tuple[torch.Tensor]:
            names = [name for name, _, _ in _tensor_slots(module)]
            state, inputs = tensors[: len(names)], tensors[len(names) :]
            h, rows, window = inputs[:3]
            starts = inputs[3] if has_starts else None
            with _eager(module):
                y = torch.func.functional_call(
                    module, dict(zip(names, state, strict=True)), (h, rows, starts, None, window)
                )
            return (y,)

        return step


def _tree(module: nn.Module) -> list[tuple[dict, str, nn.Module | None]]:
    """(parent's children, name, child) of every submodule: a replaced one shows up."""
    return [
        (m._modules, name, child) for m in module.modules() for name, child in m._modules.items()
    ]


def _tensor_slots(module: nn.Module) -> list[tuple[str, dict, str]]:
    """(qualified name, owning dict, key) of every parameter and buffer, in a fixed order."""
    return [
        (f"{prefix}.{key}".lstrip("."), owner, key)
        for prefix, sub in module.named_modules()
        for owner in (sub._parameters, sub._buffers)
        for key, t in owner.items()
        if t is not None
    ]


class _Traced(nn.Module):
    """An nn.Module around a function, for torch.export."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *tensors: torch.Tensor) -> Any:
        return self.fn(*tensors)


@contextmanager
def _eager(module: Engram) -> Iterator[None]:
    """Trace the eager step, not the compiled one installed on the module."""
    saved, module.fast_step = module.fast_step, None
    try:
        yield
    finally:
        module.fast_step = saved


def _linear_as_mm_add(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear` as a matmul and an add, for CPU packages. Inductor lowers a CPU linear with
    a bias to an `addmm_out` call, which first expands the bias and copies it into the output:
    two more calls into torch per projection, each a dispatch that costs more than the work.
    The add instead fuses into the kernel that follows. The compiled steps' outputs were
    bitwise those of `addmm` on this project's CPU, and the decode tests hold them to eager."""
    y = torch.matmul(x, weight.t())
    return y if bias is None else y + bias


_LOWERING = "linear=mm+add"  # in the package key: packages built otherwise are not reused


def _layout(tensors: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> Layout:
    return tuple((t.shape, t.stride(), t.dtype, t.device) for t in tensors)


def _example(t: torch.Tensor) -> torch.Tensor:
    """`t`, or for an inference tensor (which export cannot trace in-place updates of) a plain
    one of the same layout. Export reads layouts, not values, so it may stay uninitialised."""
    if not t.is_inference():
        return t  # the parameters and tables: never copied
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)


def _isa(tensors: list[torch.Tensor]) -> tuple[str, ...]:
    isa = [torch.backends.cpu.get_cpu_capability()]
    for device in {t.device for t in tensors if t.device.type == "cuda"}:
        isa.append(f"sm{''.join(map(str, torch.cuda.get_device_capability(device)))}")
    return tuple(isa)


def _source_digest(module: Any) -> str:
    return hashlib.sha256(inspect.getsource(module).encode()).hexdigest()[:16]


__all__ = [
    "AotFunction",
    "CompiledHashOne",
    "CompiledStep",
    "compile_decoding",
    "uncompile_decoding",
]
