"""Data-parallel evaluation: each rank takes a contiguous slice of the items, results meet on every rank.

Slices are padded (with copies of a real item, whose results are dropped) so that every rank runs the
same number of batches: under FSDP and ZeRO-3 each forward pass is a collective, and a rank with one
batch fewer would leave the others waiting forever.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class EvalDist:
    rank: int = 0
    world_size: int = 1
    synced: bool = False  # parameters are sharded: generation keeps all ranks stepping together

    @classmethod
    def from_backend(cls, backend) -> EvalDist:
        return cls(backend.ctx.rank, backend.ctx.world_size, backend.shards_parameters)

    @classmethod
    def current(cls, synced: bool = False) -> EvalDist:
        """The live process group (one process when none is initialised)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), synced)
        return cls()


def local_slice(items: Sequence[T], ed: EvalDist) -> tuple[list[T], list[int | None]]:
    """This rank's items and their global indices (None marks padding), equally many on every rank."""
    if not items:
        return [], []
    per_rank = math.ceil(len(items) / ed.world_size)
    start = ed.rank * per_rank
    indices: list[int | None] = list(range(start, min(start + per_rank, len(items))))
    padded = indices + [None] * (per_rank - len(indices))
    local = [items[i] if i is not None else items[-1] for i in padded]
    return local, padded


def gather_in_order(results: Sequence[Any], indices: Sequence[int | None], ed: EvalDist) -> list[Any]:
    """All ranks' results in global item order, on every rank (so all ranks can act on the metrics)."""
    mine = [(i, r) for i, r in zip(indices, results, strict=True) if i is not None]
    if ed.world_size == 1:
        return [r for _, r in mine]
    everyone: list[Any] = [None] * ed.world_size
    dist.all_gather_object(everyone, mine)
    merged = sorted((pair for part in everyone for pair in part), key=lambda pair: pair[0])
    return [r for _, r in merged]


ONE_PROCESS = EvalDist()
