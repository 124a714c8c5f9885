"""Data parallelism, applied from a plan to an unchanged model (torchtitan's `parallelize`).

A run launched by torchrun (`torchrun --nproc-per-node N -m engram train ...`, or with
`--nnodes` and a c10d rendezvous across machines) has N ranks; the same command without
torchrun is one process, and nothing here changes it. Per rank:

- `init_world(device)` reads torchrun's environment, joins the process group (gloo on the CPU;
  on CUDA `cpu:gloo,cuda:nccl`, so small host-side exchanges still work) and picks the rank's
  device (`cuda:LOCAL_RANK`). Model code never names a rank or a device.
- `parallelize(model, world, config)` makes the backbone data-parallel: FSDP2 (`fully_shard`
  per block, then the root) by default, or DDP (`parallel.dense=ddp`). It returns the module to
  call in training; `model` itself stays the one to evaluate and checkpoint.
- The Engram tables are kept out of both: they are row stores sharded by rows over
  `table_group(world)` (`engram.tables.sharded`), never parameters, so no dense table gradient
  is ever built or all-reduced.

Equivalence with one process on the global batch (tested): each rank's loss is the mean over its
own slice of the global batch, the backbone's gradients are averaged over ranks (DDP's
all-reduce, FSDP's reduce-scatter), the tables' row gradients are scaled by 1/world at their
owner, and the MoE's expert loads are summed over ranks (`sum_expert_loads`) before the step.
In one process an expert that no token chose has no gradient, and AdamW leaves it (and its
moments) alone for that step; DDP and FSDP must reduce a gradient for it on every rank where
another rank used it, and FSDP even where none did. So after the reduction, the gradients of
experts no token of the *global* batch chose are dropped again: the same step as one process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

PARALLEL_DENSE = ("fsdp", "ddp")


@dataclass(frozen=True)
class ParallelConfig:
    """How a run spreads over the ranks torchrun started (one process: nothing to apply)."""

    dense: str = "fsdp"  # the backbone: "fsdp" (FSDP2, sharded) or "ddp" (replicated)
    timeout_s: int = 600  # a collective waiting longer fails the job instead of hanging it

    def validate(self) -> None:
        if self.dense not in PARALLEL_DENSE:
            raise ValueError(f"parallel.dense={self.dense!r} must be one of {PARALLEL_DENSE}")
        if self.timeout_s < 1:
            raise ValueError(f"parallel.timeout_s={self.timeout_s} must be >= 1")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks: `rank` of `size`, `local_rank` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Whether this rank logs, writes run files and shows progress (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. builds a tokenizer or a token cache), the others
        after it, reading what it made instead of racing to write the same files."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    if not value.strip().isdigit():
        raise ValueError(f"environment variable {name}={value!r} must be a non-negative integer")
    return int(value)


def world_from_env() -> World:
    """The world torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); one process without it."""
    size = _env_int("WORLD_SIZE", 1)
    world = World(_env_int("RANK", 0), size, _env_int("LOCAL_RANK", 0))
    if size < 1 or not 0 <= world.rank < size:
        raise ValueError(f"RANK={world.rank} must be in [0, WORLD_SIZE={size})")
    return world


def init_world(
    device: torch.device, config: ParallelConfig | None = None
) -> tuple[World, torch.device]:
    """Join the process group torchrun set up, if any; returns the world and this rank's device.

    `device` is the run's resolved device: on CUDA each rank takes `cuda:LOCAL_RANK`.
    """
    world = world_from_env()
    if not world.distributed:
        return world, device
    config = config or ParallelConfig()
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={world.local_rank} but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"distributed training runs on cpu or cuda, not {device.type}")
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=config.timeout_s))
    if dist.get_world_size() != world.size:
        raise ValueError(f"the process group has {dist.get_world_size()} ranks, not {world.size}")
    return world, device


def table_group(world: World, device: torch.device):
    """The group the tables' row exchange runs on: all ranks, apart from the dense part's, so
    the two streams of collectives never interleave within one group."""
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    return dist.new_group(list(range(world.size)), backend=backend)


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


# ---- the dense part ---------------------------------------------------------------------------
def parallelize(model: nn.Module, world: World, config: ParallelConfig) -> nn.Module:
    """Make `model`'s parameters data-parallel over `world`; returns the module to train with.

    FSDP2 shards every block's parameters (and the root's: embeddings, head, final norm) over a
    one-dimensional mesh and reduce-scatters their gradients; DDP replicates them and
    all-reduces. The model's own forward, attributes and state-dict names are unchanged.
    """
    if not world.distributed:
        return model
    config.validate()
    if config.dense == "ddp":
        # Experts no token of this rank chose have no gradient here: DDP must look for them.
        return nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (world.size,), mesh_dim_names=("dp",))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # FSDP reduce-scatters one flat buffer per block: every rank must give every parameter a
    # gradient, so an expert unused on one rank contributes zeros (see the module docstring).
    model.set_reduce_scatter_unused_params(True)
    return model


def check_optimizer(dense: str, backbone: str) -> None:
    """Muon orthogonalises whole matrices, which FSDP holds in shards."""
    if dense == "fsdp" and backbone == "muon":
        raise ValueError(
            "optim.backbone=muon needs whole weight matrices on each rank: use parallel.dense=ddp"
        )


@torch.no_grad()
def sum_expert_loads(model: nn.Module, world: World) -> None:
    """Sum the MoE layers' expert loads over ranks, then drop the gradients of experts no token
    of the global batch chose (see the module docstring). Call between backward and the step:
    every rank then steps, and balances, as one process on the global batch would."""
    if not world.distributed:
        return
    layers = model.moe_layers
    if not layers:
        return
    flat = torch.cat([moe.load for moe in layers])
    dist.all_reduce(flat)
    for moe, load in zip(layers, flat.split([m.load.numel() for m in layers]), strict=True):
        moe.load.copy_(load)
        for expert, used in zip(moe.experts, load.tolist(), strict=True):
            if not used:
                for p in expert.parameters():
                    p.grad = None


def sum_over_ranks(values: list[float], world: World, device: torch.device) -> list[float]:
    """The sum of each value over ranks (float64; the values themselves in one process)."""
    if not world.distributed or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def mean_over_ranks(values: list[float], world: World, device: torch.device) -> list[float]:
    """The mean of each value over ranks (e.g. each rank's mean loss over its equal slice)."""
    return [v / world.size for v in sum_over_ranks(values, world, device)]
