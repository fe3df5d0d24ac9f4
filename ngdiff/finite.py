"""Stopping a run at its first non-finite number, before that number reaches the weights or an export.

A diverged run (an lr far too large) otherwise goes on with NaN losses and ends "successfully" with a
model whose every weight is NaN. The step's statistics are checked once they are all-reduced, so every
rank sees the same numbers and all ranks stop together, before the update is applied.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from ngdiff.errors import UserError

if TYPE_CHECKING:
    from ngdiff.combiners import TaskStats
    from parallel.base import Backend

ADVICE = "the run diverged; lower optim.lr (or bound the step with optim.max_grad_norm) and start again"


class NonFiniteError(UserError):
    """A loss, gradient norm, weight or AutoLR number that is inf or NaN: names the step and the quantity;
    `step` is the step it was found at (a study records a diverged run there)."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step

    def __reduce__(self):  # pickles with its step (a process pool hands exceptions back pickled)
        return type(self), (str(self), self.step)


def require_finite(step: int, values: Mapping[str, float], state: str = "its update was not applied") -> None:
    """Raise on the first of `values` (name -> number) that is not finite; `step` counts from 1 (as in
    metrics.jsonl); `state` says where the weights were left."""
    for name, value in values.items():
        if not math.isfinite(value):
            raise NonFiniteError(f"step {step}: {name} is {value}; {state}, no model exported; {ADVICE}", step)


def step_quantities(names: Sequence[str], stats: TaskStats) -> dict[str, float]:
    """The step's all-reduced losses and Gram entries, under the names the metrics log uses."""
    values = {f"loss_{name}": loss for name, loss in zip(names, stats.losses, strict=True)}
    for i, row in enumerate(stats.gram):
        for j, entry in enumerate(row[i:], start=i):
            values[f"grad_norm_{names[i]}" if i == j else f"cos_{names[i]}_{names[j]}"] = entry
    return values


def require_finite_weights(backend: Backend, step: int) -> None:
    """Refuse to export weights that are not all finite (a finite but huge last step can overflow them).

    Each rank checks its own shard; the one all-reduce lets every rank raise together."""
    bad = sum(int(not torch.isfinite(p).all()) for p in backend.local_params())
    flag = torch.tensor([float(bad)], dtype=torch.float64, device=backend.ctx.device)
    if float(backend.all_reduce_sum(flag).cpu()) > 0:
        raise NonFiniteError(
            f"after step {step}: the model's weights are not all finite; no model exported; {ADVICE}", step
        )
