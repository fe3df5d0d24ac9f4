"""AutoLR: the GeN learning-rate rule applied to the unlearning direction.

A reconstruction from the GeN method (Bu & Xu, 2024) and its public code; the NGDiff paper's own
algorithm text was not available (see docs/autolr.md). Every `every` steps:

1. take the real optimizer step once at the current lr; `u = theta_after - theta_before` (SGD, Adam
   and AdamW steps are linear in lr, so `u` scales exactly with it);
2. probe a loss at `theta_before + r * u` for the configured r (forward only), on the step's own
   batch (`probe_batch=step`: r = 0 is the step's forward, not probed) or a fresh one, summed per
   rank and all-reduced as (loss x units, units), so every rank sees the same numbers;
3. least-squares fit of `l(r) - l(0) = A r^2 / 2 - B r`; the optimal multiple of `u` is `B / A`;
4. if `A > 0`, `B > 0` (and R^2 >= min_r2 with more than three points):
   `lr <- m * lr + (1 - m) * scale * clip(lr * B / A, lr / c, c lr)`, else halve (or keep) the lr;
   rank 0's value is broadcast;
5. leave the parameters at `theta_before + (lr_new / lr) * u`: the step just taken, rescaled.

GeN's public code (`lr_parabola`, GeN/GeN.py of the gen-optim package) probes a fresh batch, uses
m = 0.9, c = 2, keeps the lr on a rejected fit and halves it only when the fit raises; the defaults
here differ where docs/autolr.md's study on the demo model measured that they must.
The optimizer's moments are updated once per step (unlike the public GeN code on Adam). Memory: one
extra copy of this rank's parameter shard (`u`). Cost: len(probe_points) forward passes, one fewer
with `probe_batch=step` (r = 0 is the step's own forward).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ngdiff.finite import require_finite
from parallel.grads import StepLine

if TYPE_CHECKING:
    from ngdiff.config import AutoLRConfig
    from parallel.base import Backend

log = logging.getLogger(__name__)


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


def next_lr(
    lr: float,
    fit: QuadraticFit,
    momentum: float = 0.9,
    scale: float = 1.0,
    max_change: float = 2.0,
    on_reject: str = "keep",
) -> float:
    """The GeN update `m lr + (1 - m) scale clip(lr B / A, lr / c, c lr)` with `c = max_change`.

    A rejected fit keeps the lr (`on_reject="keep"`) or halves it (`"halve"`: what the public GeN
    code does when its fit fails; see docs/autolr.md for why a rejection here mostly means the step
    raised the probed loss).
    """
    if not fit.accepted:
        if on_reject == "halve":
            return lr / 2.0
        if on_reject == "keep":
            return lr
        raise ValueError(f"unknown autolr.on_reject {on_reject!r}")
    proposal = min(max(lr * fit.optimal_multiple, lr / max_change), max_change * lr)
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
    acceptance_rate: float = math.nan  # running fraction of accepted fits over the run so far

    def as_metrics(self) -> dict[str, float]:
        out = {f"autolr/probe_loss_{r:+g}": loss for r, loss in zip(self.probe_points, self.probe_losses, strict=True)}
        out.update({k: v for k, v in asdict(self).items() if k in ("A", "B", "r2", "acceptance_rate")})
        out = {k if k.startswith("autolr/") else f"autolr/{k}": float(v) for k, v in out.items()}
        out["autolr/accepted"] = float(self.accepted)
        out["autolr/lr_fitted"] = self.lr_after
        return out


class AutoLR:
    """Runs the AutoLR step against any backend (it only needs the backend's interface)."""

    def __init__(self, cfg: AutoLRConfig, backend: Backend, max_steps: int, optimizer: str = ""):
        if cfg.enabled and optimizer == "adamw" and cfg.probe_loss == "retain" and backend.ctx.is_main:
            log.warning(
                "AutoLR's retain probe assumes the raw NGDiff direction (optim.name=sgd); under AdamW it was "
                "measured to grow the lr until retention is lost (docs/autolr.md)"
            )
        self.cfg = cfg
        self.backend = backend
        self.max_steps = max_steps
        self.fits = 0  # AutoLR steps so far, and how many of their fits were accepted
        self.accepted = 0

    def state_dict(self) -> dict[str, int]:
        return {"fits": self.fits, "accepted": self.accepted}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.fits, self.accepted = int(state["fits"]), int(state["accepted"])

    def due(self, step: int) -> bool:
        return bool(self.cfg.enabled) and step % self.cfg.every == 0

    @torch.no_grad()
    def step(
        self,
        lr: float,
        step: int,
        probe_sums: Callable[[], torch.Tensor],
        probe_loss: Callable[[torch.Tensor], float],
        at_zero: torch.Tensor | None = None,
    ) -> AutoLRRecord:
        """Take the optimizer step at `lr`, probe, fit, rescale the step; returns the record.

        `probe_sums()` gives this rank's partial sums at the current parameters (a 1-d float64
        tensor); `probe_loss` turns the all-reduced sums into the probed loss. `at_zero`, when given,
        is the all-reduced row at r = 0 already known (the step's own forward on the probed batch):
        that point is then not probed, which saves one forward.
        """
        cfg = self.cfg
        backend = self.backend
        line = StepLine(backend, lr)
        points = tuple(cfg.probe_points)
        rows = line.probe([r for r in points if at_zero is None or r != 0.0], probe_sums)
        if at_zero is not None:
            rows[0.0] = at_zero
        losses = [probe_loss(rows[r]) for r in points]
        probed_at = "the step was probed, not rescaled"
        probes = {f"autolr/probe_loss_{r:+g}": loss for r, loss in zip(points, losses, strict=True)}
        require_finite(step + 1, probes, probed_at)
        fit = fit_quadratic(points, losses, cfg.min_r2)
        scale = horizon_scale(cfg.horizon_decay, step, self.max_steps)
        proposal = next_lr(lr, fit, cfg.momentum, scale, cfg.max_change, cfg.on_reject)
        chosen = torch.tensor([proposal], dtype=torch.float64)
        new_lr = float(backend.broadcast(chosen.to(backend.ctx.device), src=0).cpu())
        require_finite(step + 1, {"autolr/lr_fitted": new_lr}, probed_at)
        line.move_to(new_lr / lr)
        self.fits += 1
        self.accepted += int(fit.accepted)
        rate = self.accepted / self.fits
        return AutoLRRecord(lr, new_lr, points, losses, fit.A, fit.B, fit.r2, fit.accepted, rate)
