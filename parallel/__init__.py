"""Sharding engines behind one interface (`parallel.base.Backend`); pick one by name."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import torch

from ngdiff.errors import UserError
from parallel.base import Backend, DistContext
from parallel.distributed import init_single_process_group

if TYPE_CHECKING:
    from ngdiff.config import OptimConfig, ParallelConfig

# name -> "module:Class", imported only when chosen (DeepSpeed's import alone takes seconds)
BACKENDS: dict[str, str] = {
    "single": "parallel.single:SingleBackend",
    "ddp": "parallel.ddp:DDPBackend",
    "fsdp": "parallel.fsdp:FSDPBackend",
    "zero3": "parallel.zero3:Zero3Backend",
}


def backend_class(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise UserError(f"unknown parallel.backend {name!r}; choose one of: {', '.join(sorted(BACKENDS))}")
    module_name, class_name = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def shards_parameters(name: str) -> bool:
    """Whether the backend called `name` shards parameters, gradients and optimizer state over ranks (its
    class says so: `Backend.shards_parameters`), for code that plans a run without building one."""
    return backend_class(name).shards_parameters


def planned_buffers(
    name: str, parallel_cfg: ParallelConfig | None = None, hidden_size: int | None = None
) -> dict[str, int]:
    """The engine buffer sizes (elements) the backend called `name` would configure for a model of hidden size
    `hidden_size` under `parallel_cfg` (`Backend.planned_buffers`), for code that plans a run without
    building one; without arguments, the engine's defaults."""
    return backend_class(name).planned_buffers(parallel_cfg, hidden_size)


def build_backend(
    name: str, ctx: DistContext, parallel_cfg: ParallelConfig, optim_cfg: OptimConfig, precision: str
) -> Backend:
    cls = backend_class(name)
    if name != "single" and not ctx.distributed and not torch.distributed.is_initialized():
        init_single_process_group(ctx)
    if name == "single" and ctx.world_size > 1:
        raise UserError(
            f"parallel.backend=single runs one process, but {ctx.world_size} were launched; choose ddp, fsdp or zero3"
        )
    return cls(ctx, parallel_cfg, optim_cfg, precision)


__all__ = [
    "BACKENDS",
    "Backend",
    "DistContext",
    "backend_class",
    "build_backend",
    "planned_buffers",
    "shards_parameters",
]
