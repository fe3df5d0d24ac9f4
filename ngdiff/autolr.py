"""AutoLR: the GeN learning-rate rule applied to the unlearning direction.

A reconstruction from the GeN method (Bu & Xu, 2024) and its public code; the NGDiff paper's own
algorithm text was not available (see docs/autolr.md). Every `every` steps:

1. take the real optimizer step once at the current lr; `u = theta_after - theta_before` (SGD, Adam
   and AdamW steps are linear in lr, so `u` scales exactly with it);
2. probe a loss at `theta_before + r * u` for the configured r (forward only), summed per rank and
   all-reduced as (loss x units, units), so every rank sees the same numbers;
3. least-squares fit of `l(r) - l(0) = A r^2 / 2 - B r`; the optimal multiple of `u` is `B / A`;
4. if `A > 0`, `B > 0` (and R^2 >= min_r2 with more than three points):
   `lr <- m * lr + (1 - m) * scale * clip(lr * B / A, lr / 2, 2 lr)`; rank 0's value is broadcast;
5. leave the parameters at `theta_before + (lr_new / lr) * u`: the step just taken, rescaled.

The optimizer's moments are updated once per step (unlike the public GeN code on Adam). Memory: one
extra copy of this rank's parameter shard (`u`). Cost: len(probe_points) forward passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class QuadraticFit:
    A: float
    B: float
    r2: float
    accepted: bool

    @property
    def optimal_multiple(self) -> float:
        return self.B / self.A if self.A != 0 else math.nan


def fit_quadratic(points: tuple[float, ...], losses: list[float], min_r2: float = 0.99) -> QuadraticFit:
    """Least squares of `l(r) - l(0) = A r^2/2 - B r` over the probed points (0 must be one of them)."""
    r = np.asarray(points, dtype=np.float64)
    values = np.asarray(losses, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        return QuadraticFit(math.nan, math.nan, math.nan, False)
    delta = values - values[list(points).index(0.0)]
    design = np.stack([r**2 / 2.0, -r], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, delta, rcond=None)
    residual = delta - design @ np.array([a, b])
    spread = np.sum((delta - delta.mean()) ** 2)
    r2 = 1.0 - float(np.sum(residual**2) / spread) if spread > 0 else 0.0
    accepted = bool(a > 0 and b > 0 and (len(points) <= 3 or r2 >= min_r2))
    return QuadraticFit(float(a), float(b), r2, accepted)


def horizon_scale(kind: str, step: int, max_steps: int) -> float:
    if kind == "none" or max_steps <= 0:
        return 1.0
    progress = min(max(step / max_steps, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown autolr.horizon_decay {kind!r}")


def next_lr(lr: float, fit: QuadraticFit, momentum: float = 0.9, scale: float = 1.0) -> float:
    """The GeN update; a rejected fit keeps the current lr."""
    if not fit.accepted:
        return lr
    proposal = min(max(lr * fit.optimal_multiple, lr / 2.0), 2.0 * lr)
    return momentum * lr + (1.0 - momentum) * scale * proposal


@dataclass
class AutoLRRecord:
    """What one AutoLR step saw and decided, for the metrics log."""

    lr_before: float
    lr_after: float
    probe_points: tuple[float, ...]
    probe_losses: list[float]
    A: float
    B: float
    r2: float
    accepted: bool

    def as_metrics(self) -> dict[str, float]:
        out = {f"autolr/probe_loss_{r:+g}": loss for r, loss in zip(self.probe_points, self.probe_losses, strict=True)}
        out.update({k: v for k, v in asdict(self).items() if k in ("A", "B", "r2")})
        out = {k if k.startswith("autolr/") else f"autolr/{k}": float(v) for k, v in out.items()}
        out["autolr/accepted"] = float(self.accepted)
        out["autolr/lr_fitted"] = self.lr_after
        return out


class AutoLR:
    """Runs the AutoLR step against any backend (it only needs the backend's interface)."""

    def __init__(self, cfg, backend, max_steps: int):
        self.cfg = cfg
        self.backend = backend
        self.max_steps = max_steps

    def due(self, step: int) -> bool:
        return bool(self.cfg.enabled) and step % self.cfg.every == 0

    @torch.no_grad()
    def step(
        self,
        lr: float,
        step: int,
        probe_sums: Callable[[], torch.Tensor],
        probe_loss: Callable[[torch.Tensor], float],
    ) -> AutoLRRecord:
        """Take the optimizer step at `lr`, probe, fit, rescale the step; returns the record.

        `probe_sums()` gives this rank's partial sums at the current parameters (a 1-d float64
        tensor); `probe_loss` turns the all-reduced sums into the probed loss.
        """
        backend = self.backend
        update = [t.detach().clone() for t in backend.local_params()]  # theta_before for now
        backend.step(lr)
        live = backend.local_params()
        for u, now in zip(update, live, strict=True):
            u.neg_().add_(now)  # u = theta_after - theta_before
        position = 1.0
        partial = []
        for r in self.cfg.probe_points:
            self._move(live, update, r - position)
            position = r
            partial.append(probe_sums())
        sums = backend.all_reduce_sum(torch.stack(partial))
        losses = [probe_loss(row) for row in sums]
        fit = fit_quadratic(self.cfg.probe_points, losses, self.cfg.min_r2)
        scale = horizon_scale(self.cfg.horizon_decay, step, self.max_steps)
        chosen = torch.tensor([next_lr(lr, fit, self.cfg.momentum, scale)], dtype=torch.float64)
        new_lr = float(backend.broadcast(chosen.to(backend.ctx.device), src=0).cpu())
        self._move(live, update, new_lr / lr - position)
        return AutoLRRecord(lr, new_lr, tuple(self.cfg.probe_points), losses, fit.A, fit.B, fit.r2, fit.accepted)

    def _move(self, live: list[torch.Tensor], update: list[torch.Tensor], alpha: float) -> None:
        if alpha != 0.0:
            for param, u in zip(live, update, strict=True):
                param.add_(u, alpha=alpha)
        self.backend.params_changed()
