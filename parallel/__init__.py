"""Sharding engines behind one interface (`parallel.base.Backend`); pick one by name."""

from __future__ import annotations

import importlib

import torch

from ngdiff.errors import UserError
from parallel.base import Backend, DistContext
from parallel.distributed import init_single_process_group

# name -> "module:Class", imported only when chosen (DeepSpeed's import alone takes seconds)
BACKENDS: dict[str, str] = {
    "single": "parallel.single:SingleBackend",
    "ddp": "parallel.ddp:DDPBackend",
    "fsdp": "parallel.fsdp:FSDPBackend",
    "zero3": "parallel.zero3:Zero3Backend",
}


def build_backend(name: str, ctx: DistContext, parallel_cfg, optim_cfg, precision: str) -> Backend:
    if name not in BACKENDS:
        raise UserError(f"unknown parallel.backend {name!r}; choose one of: {', '.join(sorted(BACKENDS))}")
    module_name, class_name = BACKENDS[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if name != "single" and not ctx.distributed and not torch.distributed.is_initialized():
        init_single_process_group(ctx)
    if name == "single" and ctx.world_size > 1:
        raise UserError(
            f"parallel.backend=single runs one process, but {ctx.world_size} were launched; choose ddp, fsdp or zero3"
        )
    return cls(ctx, parallel_cfg, optim_cfg, precision)


__all__ = ["BACKENDS", "Backend", "DistContext", "build_backend"]
