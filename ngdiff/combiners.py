"""Two-task gradient combiners: pure functions from the 2x2 Gram matrix and the losses to two weights.

The update direction is `d = w_R * g_R + w_F * g_F` and the step `theta <- theta - lr * d`, so a
negative `w_F` pushes the forget loss up. With `a = |g_R|^2`, `b = |g_F|^2`, `c = <g_R, g_F>`, every
method of the paper is a formula in (a, b, c, L_R, L_F). No tensor is touched here: the trainer builds
the Gram matrix from the (sharded) gradients with one all-reduce and applies the weights in place.

Sources, two-task forms: NGDiff, GDiff and GA as the NGDiff paper (Bu et al., 2025) defines them; MGDA
(Sener & Koltun, 2018) as the closed-form min-norm point of two vectors; PCGrad (Yu et al., 2020) and
IMTL-G (Liu et al., 2021) as their papers' algorithms written in Gram terms; LossNorm as the NGDiff
paper's baseline (each loss divided by its value); RLW (Lin et al., 2022) as LibMTL's
`weighting/RLW.py` (softmax of a standard normal draw). Each is tested against its definition on
explicit vectors (tests/test_combiners.py).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

EPS = 1e-12


@dataclass(frozen=True)
class TaskStats:
    """Global (all-rank) quantities of one step."""

    a: float  # |g_R|^2
    b: float  # |g_F|^2
    c: float  # <g_R, g_F>
    loss_retain: float
    loss_forget: float
    step: int = 0

    @property
    def norm_retain(self) -> float:
        return math.sqrt(max(self.a, 0.0))

    @property
    def norm_forget(self) -> float:
        return math.sqrt(max(self.b, 0.0))

    @property
    def cosine(self) -> float:
        denom = self.norm_retain * self.norm_forget
        return self.c / denom if denom > 0 else 0.0


@dataclass(frozen=True)
class Weights:
    retain: float
    forget: float

    def direction_norm_sq(self, s: TaskStats) -> float:
        """|w_R g_R + w_F g_F|^2 from the Gram matrix alone (used for clipping, no extra collective)."""
        return self.retain**2 * s.a + 2 * self.retain * self.forget * s.c + self.forget**2 * s.b


@dataclass(frozen=True)
class CombinerOptions:
    gdiff_coefficient: float = 0.5
    seed: int = 0


Combiner = Callable[[TaskStats, CombinerOptions], Weights]
COMBINERS: dict[str, Combiner] = {}


def register(name: str) -> Callable[[Combiner], Combiner]:
    def add(fn: Combiner) -> Combiner:
        COMBINERS[name] = fn
        return fn

    return add


def guarded(value: float, what: str) -> float:
    """A denominator that is zero (or not finite) becomes EPS, with a warning instead of a NaN."""
    if not math.isfinite(value) or abs(value) < EPS:
        warnings.warn(f"{what} is {value!r}; using {EPS} to avoid dividing by zero", RuntimeWarning, stacklevel=3)
        return EPS if not math.isfinite(value) or value >= 0 else -EPS
    return value


@register("ga")
def gradient_ascent(s: TaskStats, opts: CombinerOptions) -> Weights:
    return Weights(0.0, -1.0)


@register("gdiff")
def gradient_difference(s: TaskStats, opts: CombinerOptions) -> Weights:
    c0 = opts.gdiff_coefficient
    return Weights(c0, -(1.0 - c0))


@register("ngdiff")
def normalized_gradient_difference(s: TaskStats, opts: CombinerOptions) -> Weights:
    return Weights(
        1.0 / math.sqrt(guarded(s.a, "|g_R|^2")),
        -1.0 / math.sqrt(guarded(s.b, "|g_F|^2")),
    )


@register("lossnorm")
def loss_normalization(s: TaskStats, opts: CombinerOptions) -> Weights:
    """Each task weighted by 1/|L|: by the loss's *magnitude*, so the signs of the update stay those of
    the method. NPO, SimNPO and IdK return a negative forget quantity (see ngdiff/objectives.py), and
    dividing by the signed value would flip w_F and relearn the forget set."""
    return Weights(
        1.0 / guarded(abs(s.loss_retain), "retain loss"),
        -1.0 / guarded(abs(s.loss_forget), "forget loss"),
    )


@register("rlw")
def random_loss_weighting(s: TaskStats, opts: CombinerOptions) -> Weights:
    """softmax(z), z ~ N(0, I), drawn from (seed, step) alone so every rank draws the same weights."""
    generator = torch.Generator().manual_seed(opts.seed * 1_000_003 + s.step)
    weights = torch.softmax(torch.randn(2, generator=generator, dtype=torch.float64), dim=0)
    return Weights(float(weights[0]), -float(weights[1]))


@register("mgda")
def min_norm(s: TaskStats, opts: CombinerOptions) -> Weights:
    """Min-norm point of the segment between g_R and -g_F."""
    alpha = (s.b + s.c) / guarded(s.a + 2 * s.c + s.b, "|g_R + g_F|^2")
    alpha = min(max(alpha, 0.0), 1.0)
    return Weights(alpha, -(1.0 - alpha))


@register("pcgrad")
def projected_conflicting_gradients(s: TaskStats, opts: CombinerOptions) -> Weights:
    """PCGrad on the task gradients g_R and -g_F: they conflict when <g_R, -g_F> < 0, i.e. c > 0."""
    conflict = max(s.c, 0.0)
    return Weights(
        1.0 + conflict / guarded(s.a, "|g_R|^2"),
        -(1.0 + conflict / guarded(s.b, "|g_F|^2")),
    )


@register("imtlg")
def impartial_gradients(s: TaskStats, opts: CombinerOptions) -> Weights:
    """IMTL-G for two tasks g1 = g_R, g2 = -g_F: d = (1-t) g1 + t g2 with equal projections on u1, u2.

    t = <g1, u1 - u2> / <g1 - g2, u1 - u2>, which in Gram terms is
    (sqrt(a) + c/sqrt(b)) / (sqrt(a) + sqrt(b) + c/sqrt(a) + c/sqrt(b)).
    """
    ra = math.sqrt(guarded(s.a, "|g_R|^2"))
    rb = math.sqrt(guarded(s.b, "|g_F|^2"))
    numerator = ra + s.c / rb
    t = numerator / guarded(ra + rb + s.c / ra + s.c / rb, "IMTL-G denominator")
    return Weights(1.0 - t, -t)


def get_combiner(name: str) -> Combiner:
    try:
        return COMBINERS[name]
    except KeyError:
        raise ValueError(f"unknown combiner {name!r}; choose one of: {', '.join(sorted(COMBINERS))}") from None
