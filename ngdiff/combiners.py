"""k-task gradient combiners: pure functions from the k x k Gram matrix and the losses to k weights.

Each task i has a gradient g_i (of its mean loss) and a role: retain tasks are descended, forget
tasks ascended. The update direction is `d = sum_i w_i g_i` and the step `theta <- theta - lr * d`,
so a forget task gets a negative weight. The multi-task methods are defined on the *task gradients*
`h_i = s_i g_i` (s = +1 retain, -1 forget: the gradient of what each task minimises); they pick
`d = sum_i lambda_i h_i`, so `w_i = s_i lambda_i`. With `G_ij = <g_i, g_j>`, the task Gram matrix is
`H = S G S`, and every method below is a formula in (H, losses). No tensor is touched here: the
trainer builds G from the (sharded) gradients with one all-reduce and applies the weights in place.

Sources, and where they are departed from:
- NGDiff, GDiff and GA as the NGDiff paper (Bu et al., 2025) defines them for two tasks. For more
  tasks NGDiff adds one unit vector per task (the issue's generalisation); GDiff and GA split each
  role's share equally over its tasks (ours: no reference defines them for several sets).
- LossNorm: that paper's baseline, each loss divided by its *magnitude* (see `loss_normalization`).
- RLW (Lin et al., 2022): LibMTL `LibMTL/weighting/RLW.py`, softmax of a standard normal draw; drawn
  from (seed, step) instead of the global RNG, so every rank draws the same weights.
- MGDA (Sener & Koltun, 2018): the min-norm point of the convex hull of the h_i, as
  `MinNormSolver` in isl-org/MultiObjectiveOptimization `multi_task/min_norm_solvers.py` computes it
  (its closed form for two tasks; LibMTL's `weighting/MGDA.py` ports it, gradient normalisation
  `none`). Departures: that closed form clips the weight to [0.001, 0.999], here to [0, 1] (the exact
  minimiser: a task whose gradient already lies beyond the other's gets weight 0); for more tasks
  that code runs projected gradient descent (250 iterations, stop at 1e-5), here the same quadratic
  programme is solved exactly (active sets), so the weights are the minimiser, not an approximation.
- PCGrad (Yu et al., 2020): LibMTL `LibMTL/weighting/PCGrad.py` (each task projected in its own
  random order, itself included), kept as coefficients over h; the order is drawn from (seed, step)
  instead of Python's global `random`, so every rank projects alike.
- IMTL-G (Liu et al., 2021): the gradient part of LibMTL `LibMTL/weighting/IMTL.py`,
  `alpha = h_1 U^T (D U^T)^-1`, in Gram terms. Not implemented: IMTL-L, the learned loss scales
  `exp(s_i) L_i - s_i` that file also applies (a trainable parameter per task); here the losses
  enter unscaled.
- BLUR (Reisizadeh et al., EACL 2026; hadireisizadeh/BLURLLMUnlearning `MUSE/baselines/baselines/iterative.py`,
  `unlearn_method='BLO_forget_lower'`, the default): there `param.grad = remain_grad + xi * forget_grad`,
  `xi = gama - <remain_grad, forget_grad> / |forget_grad|^2`, where forget_grad is the gradient of the
  forget *objective* (-L_F for GA, the NPO loss for NPO): ngdiff's task gradient h_F = -g_F. So
  `d = g_R + (gamma - <g_R, h_F>/|h_F|^2) h_F`, i.e. `w_R = 1`, `w_F = -(gamma + <g_R, g_F>/|g_F|^2)`:
  the retain gradient's component orthogonal to h_F plus gamma h_F (forget progress <d, h_F> = gamma |h_F|^2
  whatever the retain gradient). The reference sums the dot products of each rank's local gradients;
  here they are the global batch's (the all-reduced Gram). Several sets: g_R, h_F are each role's mean.
- GRU (Wang et al., 2025; open-unlearning PR #83, `src/trainer/unlearn/gru.py`): the unlearning gradient
  h_F, and when it conflicts with the retain gradient r (<h_F, r> < 0) its projection onto r's normal
  plane, `d = h_F - min(0, <h_F, r>)/|r|^2 r`; the retain gradient only steers, it is not descended.
  Departure: the reference smooths r as an EMA over steps, `r_t = gamma_gru g_R,t + (1 - gamma_gru)
  r_(t-1)` (gamma_gru = 0.8). <h_F, r_t> involves past steps' gradients, which no Gram matrix of this
  step holds: it needs a persistent full-size (sharded) buffer. Here r = g_R of this step, i.e. the
  reference with the EMA off (its search space's "gamma = N/A"). Several sets: each role's mean.
Each is tested against its definition on explicit vectors (tests/test_combiners.py, tests/test_tasks.py).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

EPS = 1e-12
RETAIN, FORGET = "retain", "forget"
SIGN = {RETAIN: 1.0, FORGET: -1.0}
MAX_EXACT_MGDA_TASKS = 12  # the active-set solution enumerates 2^k supports


@dataclass(frozen=True)
class TaskStats:
    """Global (all-rank) quantities of one step, tasks in the trainer's order."""

    gram: tuple[tuple[float, ...], ...]  # G_ij = <g_i, g_j>
    losses: tuple[float, ...]
    roles: tuple[str, ...]  # "retain" | "forget" per task
    step: int = 0

    @classmethod
    def two(cls, a: float, b: float, c: float, loss_retain: float, loss_forget: float, step: int = 0) -> TaskStats:
        """The two-task case of the paper: a = |g_R|^2, b = |g_F|^2, c = <g_R, g_F>."""
        return cls(((a, c), (c, b)), (loss_retain, loss_forget), (RETAIN, FORGET), step)

    @property
    def k(self) -> int:
        return len(self.roles)

    @property
    def signs(self) -> np.ndarray:
        return np.array([SIGN[role] for role in self.roles])

    def norm(self, i: int) -> float:
        return math.sqrt(max(self.gram[i][i], 0.0))

    def cosine(self, i: int, j: int) -> float:
        denom = self.norm(i) * self.norm(j)
        return self.gram[i][j] / denom if denom > 0 else 0.0

    def task_gram(self) -> np.ndarray:
        """H = S G S: the Gram matrix of the task gradients h_i = s_i g_i."""
        s = self.signs
        return np.asarray(self.gram, dtype=np.float64) * np.outer(s, s)

    def of_role(self, role: str) -> list[int]:
        return [i for i, r in enumerate(self.roles) if r == role]


Weights = tuple[float, ...]  # one per task: d = sum_i w_i g_i


def direction_norm_sq(weights: Sequence[float], stats: TaskStats) -> float:
    """|sum_i w_i g_i|^2 = w^T G w from the Gram matrix alone (used for clipping: no extra collective)."""
    w = np.asarray(weights, dtype=np.float64)
    return float(w @ np.asarray(stats.gram, dtype=np.float64) @ w)


@dataclass(frozen=True)
class CombinerOptions:
    gdiff_coefficient: float = 0.5
    seed: int = 0
    blur_gamma: float = 1.0  # BLUR's gamma (the reference's `gama`, default 1.0)
    cagrad_c: float = 0.5  # TorchJD CAGrad's c
    fairgrad_alpha: float = 1.0  # TorchJD FairGrad's alpha


def step_seed(opts: CombinerOptions, step: int) -> int:
    """The seed of a randomised combiner at `step`: from (seed, step) alone, so every rank draws alike."""
    return opts.seed * 1_000_003 + step


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


def signed(s: TaskStats, lambdas: Sequence[float]) -> Weights:
    """Weights on the raw gradients from weights on the task gradients: w_i = s_i lambda_i."""
    return tuple(float(sign * lam) for sign, lam in zip(s.signs, lambdas, strict=True))


def role_shares(s: TaskStats, retain_share: float, forget_share: float) -> Weights:
    """Each role's share split equally over its tasks (task weights, not yet signed)."""
    n_retain, n_forget = len(s.of_role(RETAIN)), len(s.of_role(FORGET))
    return tuple(retain_share / n_retain if r == RETAIN else forget_share / n_forget for r in s.roles)


@register("ga")
def gradient_ascent(s: TaskStats, opts: CombinerOptions) -> Weights:
    return signed(s, role_shares(s, 0.0, 1.0))


@register("gdiff")
def gradient_difference(s: TaskStats, opts: CombinerOptions) -> Weights:
    c0 = opts.gdiff_coefficient
    return signed(s, role_shares(s, c0, 1.0 - c0))


@register("ngdiff")
def normalized_gradient_difference(s: TaskStats, opts: CombinerOptions) -> Weights:
    """d = sum_i s_i g_i / |g_i|: every task's unit gradient, so no set drowns another."""
    return signed(s, [1.0 / math.sqrt(guarded(s.gram[i][i], f"|g_{s.roles[i]}{i}|^2")) for i in range(s.k)])


@register("lossnorm")
def loss_normalization(s: TaskStats, opts: CombinerOptions) -> Weights:
    """Each task weighted by 1/|L|: by the loss's *magnitude*, so the signs of the update stay those of
    the method. NPO, SimNPO and IdK return a negative forget quantity (see ngdiff/objectives.py), and
    dividing by the signed value would flip w_F and relearn the forget set."""
    return signed(s, [1.0 / guarded(abs(loss), f"{role} loss") for loss, role in zip(s.losses, s.roles, strict=True)])


@register("rlw")
def random_loss_weighting(s: TaskStats, opts: CombinerOptions) -> Weights:
    """softmax(z), z ~ N(0, I_k), drawn from (seed, step) alone so every rank draws the same weights."""
    generator = torch.Generator().manual_seed(step_seed(opts, s.step))
    weights = torch.softmax(torch.randn(s.k, generator=generator, dtype=torch.float64), dim=0)
    return signed(s, weights.tolist())


def min_norm_pair(h11: float, h12: float, h22: float) -> float:
    """alpha minimising |alpha h1 + (1 - alpha) h2|^2 over [0, 1] (Sener & Koltun's closed form)."""
    alpha = (h22 - h12) / guarded(h11 - 2 * h12 + h22, "|h_1 - h_2|^2")
    return min(max(alpha, 0.0), 1.0)


def min_norm_simplex(H: np.ndarray) -> np.ndarray:
    """argmin over the simplex of lambda^T H lambda, exactly: the optimum solves the KKT system of its own
    support (H_SS lambda_S = mu 1, 1^T lambda_S = 1), so the best feasible solution over all supports is
    the minimiser. 2^k small solves; Frank-Wolfe beyond MAX_EXACT_MGDA_TASKS tasks."""
    k = len(H)
    if k > MAX_EXACT_MGDA_TASKS:
        return frank_wolfe_simplex(H)
    best, best_value = np.full(k, 1.0 / k), math.inf
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            idx = list(support)
            kkt = np.zeros((size + 1, size + 1))
            kkt[:size, :size] = H[np.ix_(idx, idx)]
            kkt[:size, size] = -1.0
            kkt[size, :size] = 1.0
            rhs = np.zeros(size + 1)
            rhs[size] = 1.0
            solution = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:size]
            if np.any(solution < -1e-12) or not np.isclose(solution.sum(), 1.0):
                continue
            lam = np.zeros(k)
            lam[idx] = np.clip(solution, 0.0, None)
            lam /= lam.sum()
            value = float(lam @ H @ lam)
            if value < best_value:  # supports in increasing size: ties keep the sparser solution
                best, best_value = lam, value
    return best


def frank_wolfe_simplex(H: np.ndarray, iterations: int = 1000) -> np.ndarray:
    """Sener & Koltun's Frank-Wolfe (MinNormSolver.find_min_norm_element_FW) with exact line search."""
    k = len(H)
    lam = np.full(k, 1.0 / k)
    for _ in range(iterations):
        vertex = int(np.argmin(H @ lam))
        current = lam @ H @ lam
        alpha = min_norm_pair(H[vertex, vertex], float(H[vertex] @ lam), float(current))
        step = np.zeros(k)
        step[vertex] = 1.0
        new = alpha * step + (1 - alpha) * lam
        if np.allclose(new, lam, atol=1e-12):
            break
        lam = new
    return lam


@register("mgda")
def min_norm(s: TaskStats, opts: CombinerOptions) -> Weights:
    """Min-norm point of the convex hull of the task gradients h_i (for two: the segment h_R, -g_F)."""
    H = s.task_gram()
    if s.k == 2:
        alpha = min_norm_pair(H[0, 0], H[0, 1], H[1, 1])
        return signed(s, [alpha, 1.0 - alpha])
    if np.trace(H) < EPS:
        guarded(float(np.trace(H)), "the sum of the task gradients' squared norms")
    return signed(s, min_norm_simplex(H).tolist())


@register("pcgrad")
def projected_conflicting_gradients(s: TaskStats, opts: CombinerOptions) -> Weights:
    """PCGrad on the task gradients, kept as coefficient vectors over h: task i's copy is projected onto
    the normal plane of each h_j it conflicts with (<., h_j> < 0), j in a random order drawn from
    (seed, step) so every rank draws the same one; d is the sum of the projected copies."""
    H = s.task_gram()
    generator = torch.Generator().manual_seed(step_seed(opts, s.step))
    lambdas = np.zeros(s.k)
    for i in range(s.k):
        coefficients = np.zeros(s.k)
        coefficients[i] = 1.0
        for j in torch.randperm(s.k, generator=generator).tolist():
            dot = float(coefficients @ H[:, j])
            scale = dot / guarded(H[j, j], f"|h_{j}|^2")
            if dot < 0:
                coefficients[j] -= scale
        lambdas += coefficients
    return signed(s, lambdas.tolist())


@register("imtlg")
def impartial_gradients(s: TaskStats, opts: CombinerOptions) -> Weights:
    """IMTL-G: d = sum_i alpha_i h_i with sum alpha = 1 and equal projections on every unit u_i.

    With D_j = h_1 - h_j and U_j = u_1 - u_j (j >= 2), alpha_{2..k} = h_1 U^T (D U^T)^-1, which in Gram
    terms is built from H_ij / |h_j| alone.
    """
    H = s.task_gram()
    norms = np.array([math.sqrt(guarded(H[i, i], f"|h_{i}|^2")) for i in range(s.k)])
    over = H / norms[None, :]  # over[i, j] = <h_i, u_j>
    rest = range(1, s.k)
    h1_u = np.array([over[0, 0] - over[0, j] for j in rest])
    d_u = np.array([[over[0, 0] - over[0, j] - over[i, 0] + over[i, j] for j in rest] for i in rest])
    if s.k == 2:
        alpha = np.array([h1_u[0] / guarded(float(d_u[0, 0]), "IMTL-G denominator")])
    else:
        alpha = np.linalg.lstsq(d_u.T, h1_u, rcond=None)[0]  # alpha D U^T = h_1 U^T
    return signed(s, [1.0 - float(alpha.sum()), *alpha.tolist()])


def role_means(s: TaskStats) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients over h of each role's mean task gradient: (retain r, forget f), 1/n on the role's tasks."""
    retain = np.array([1.0 if role == RETAIN else 0.0 for role in s.roles])
    forget = 1.0 - retain
    return retain / retain.sum(), forget / forget.sum()


@register("blur")
def bilevel_unlearning(s: TaskStats, opts: CombinerOptions) -> Weights:
    """BLUR: d = r + (gamma - <r, f>/|f|^2) f, r the retain gradient, f the forget task gradient h_F."""
    H = s.task_gram()
    r, f = role_means(s)
    xi = opts.blur_gamma - float(r @ H @ f) / guarded(float(f @ H @ f), "|h_F|^2 (BLUR)")
    return signed(s, r + xi * f)


@register("gru")
def gradient_rectified_unlearning(s: TaskStats, opts: CombinerOptions) -> Weights:
    """GRU without its EMA: d = f, or f projected onto the normal plane of r when <f, r> < 0."""
    H = s.task_gram()
    r, f = role_means(s)
    dot = float(f @ H @ r)
    scale = -dot / guarded(float(r @ H @ r), "|g_R|^2 (GRU)") if dot < 0 else 0.0
    return signed(s, f + scale * r)


def get_combiner(name: str) -> Combiner:
    """The combiner called `name`; a stateful one (see ngdiff/torchjd_adapter.py) as a fresh instance, so
    two trainers in one process never share its state."""
    try:
        combiner = COMBINERS[name]
    except KeyError:
        raise ValueError(f"unknown combiner {name!r}; choose one of: {', '.join(sorted(COMBINERS))}") from None
    return combiner.fresh() if hasattr(combiner, "fresh") else combiner


from ngdiff.torchjd_adapter import register_torchjd_weightings  # noqa: E402  (it needs the names above)

register_torchjd_weightings(register)
