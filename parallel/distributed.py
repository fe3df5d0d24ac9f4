"""Process-group start-up from the launcher's environment (torchrun, deepspeed, or Slurm's srun)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from parallel.base import DistContext
from parallel.host_memory import return_freed_memory


def env_rank_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun/deepspeed variables, else Slurm's, else one process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init_distributed(timeout_minutes: float = 10.0) -> DistContext:
    """Join the process group (nccl on GPU, gloo on CPU) when more than one process runs."""
    return_freed_memory()  # before any model memory: a fragmented heap keeps every transient peak resident
    rank, world, local_rank = env_rank_world()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(minutes=timeout_minutes),
        )
        global _joined_group
        _joined_group = True
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


_joined_group = False  # this process joined a multi-rank group (see `leave`)


def shutdown_distributed() -> None:
    """Destroy the process group (no collective: a peer may be gone). Callers that finished together meet
    at a barrier first (`launcher.run.train_in_context`)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def leave(code: int) -> int:
    """End a process that joined a multi-rank group with `code`, skipping interpreter finalization.

    Everything ngdiff writes is closed by now (files, sinks, the group). What finalization would still run
    is the C++ teardown of torch.distributed, gloo and DeepSpeed objects, whose order is not defined: it
    aborts now and then ("terminate called without an active exception", exit -6) after a run that
    succeeded, and the launcher then reports the whole job as failed. A one-process run returns normally."""
    if not _joined_group:
        return code
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing left to say
            stream.flush()
    os._exit(code)


def init_single_process_group(ctx: DistContext) -> None:
    """A one-rank group, so a sharded engine also runs in a plain single process (debugging, tests)."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)  # what launchers set; DeepSpeed's zero.Init reads LOCAL_RANK
    dist.init_process_group(
        backend="nccl" if ctx.device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1
    )
