"""TorchJD's Gramian-based weightings as ngdiff combiners (torchjd 0.18, `pip install "ngdiff[torchjd]"`).

Convention: the weighting's rows are the tasks' *descent* gradients of the global batch's mean loss,
h_i = s_i g_i (retain: grad L_R; forget: -grad L_F), in the trainer's task order (retain tasks first);
its input is their Gram matrix H = S G S (ngdiff/combiners.py, all-reduced once per step), and the
update direction is the weighting's combination of those rows, d = sum_i lambda_i h_i, with no extra
normalisation: `torchjd.aggregation.UPGrad()(torch.stack(rows))` is the direction of `upgrad`. In
ngdiff's weights on the raw gradients, w_i = s_i lambda_i.

Departures, all forced by ranks having to agree and runs having to resume:
- PCGrad and GradVac draw their projection orders from torch's global RNG; here that RNG is forked and
  seeded from (train.seed, step) around the call, so every rank draws the same order and the run's own
  RNG stream is left as it was.
- GradVac (its EMA of cosines, k x k) and PCD (its EMA of squared norms and step count) keep state
  across steps: it goes into the checkpoint's trainer state (`state_dict`), so a resumed run continues
  with the state the uninterrupted run had.
- PCD treats the first row as its primary objective: here the first forget task, the others (retain
  tasks, then further forget tasks, in the trainer's order) are its secondary objectives.
torchjd is imported on the first step that uses one of these combiners, never otherwise.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ngdiff.errors import UserError
from parallel.compat.deepspeed import module_subclassing_as_defined

if TYPE_CHECKING:
    from ngdiff.combiners import CombinerOptions, TaskStats, Weights

INSTALL = 'pip install "ngdiff[torchjd]"'


@dataclass(frozen=True)
class WeightingSpec:
    """How one combiner builds its TorchJD weighting; `build(aggregation, opts)`."""

    build: Callable[[Any, CombinerOptions], Any]
    needs: tuple[str, ...] = ()  # modules beyond torchjd (its optional extras)
    randomised: bool = False  # draws from torch's global RNG
    stateful: bool = False  # keeps buffers across calls
    min_tasks: int = 2
    primary_forget: bool = False  # PCD: the first forget task is the weighting's first row
    reference: str = field(default="", compare=False)


QP = ("numpy", "qpsolvers", "quadprog")
WEIGHTINGS: dict[str, WeightingSpec] = {
    "upgrad": WeightingSpec(lambda a, o: a.UPGradWeighting(), QP, reference="_upgrad.py"),
    "dualproj": WeightingSpec(lambda a, o: a.DualProjWeighting(), QP, reference="_dualproj.py"),
    "cagrad": WeightingSpec(
        lambda a, o: a.CAGradWeighting(c=o.cagrad_c), ("numpy", "cvxpy", "clarabel"), reference="_cagrad.py"
    ),
    "aligned_mtl": WeightingSpec(lambda a, o: a.AlignedMTLWeighting(), reference="_aligned_mtl.py"),
    "fairgrad": WeightingSpec(
        lambda a, o: a.FairGradWeighting(alpha=o.fairgrad_alpha), ("numpy", "scipy"), reference="_fairgrad.py"
    ),
    "krum": WeightingSpec(lambda a, o: a.KrumWeighting(n_byzantine=0), min_tasks=3, reference="_krum.py"),
    "gradvac": WeightingSpec(
        lambda a, o: a.GradVacWeighting(), randomised=True, stateful=True, reference="_gradvac.py"
    ),
    "pcd": WeightingSpec(lambda a, o: a.PCDWeighting(), stateful=True, primary_forget=True, reference="_pcd.py"),
    # TorchJD's versions of methods ngdiff implements itself (compared in tests/test_torchjd_combiners.py)
    "torchjd_mgda": WeightingSpec(lambda a, o: a.MGDAWeighting(), reference="_mgda.py"),
    "torchjd_pcgrad": WeightingSpec(lambda a, o: a.PCGradWeighting(), randomised=True, reference="_pcgrad.py"),
    "torchjd_imtlg": WeightingSpec(lambda a, o: a.IMTLGWeighting(), reference="_imtl_g.py"),
}


def missing_requirement(name: str, n_tasks: int) -> str | None:
    """Why combiner `name` cannot run here with `n_tasks` tasks (a missing package, too few tasks), or None."""
    spec = WEIGHTINGS.get(name)
    if spec is None:
        return None
    missing = [module for module in ("torchjd", *spec.needs) if importlib.util.find_spec(module) is None]
    if missing:
        return f"method.combiner={name} needs {', '.join(missing)}, not installed: {INSTALL}"
    if n_tasks < spec.min_tasks:
        return (
            f"method.combiner={name} needs at least {spec.min_tasks} tasks (data.forget + data.retain files), "
            f"got {n_tasks}"
        )
    return None


def task_order(stats: TaskStats, spec: WeightingSpec) -> list[int]:
    """The weighting's rows as trainer task indices (the trainer's order, PCD's primary first)."""
    order = list(range(stats.k))
    if spec.primary_forget:
        first = stats.roles.index("forget")
        order.remove(first)
        order.insert(0, first)
    return order


class TorchJDCombiner:
    """A combiner (TaskStats, CombinerOptions) -> weights running one TorchJD weighting on H."""

    def __init__(self, name: str, spec: WeightingSpec):
        self.name, self.spec = name, spec
        self._weighting: Any = None
        self._built_for: CombinerOptions | None = None
        self._pending: dict[str, Any] | None = None  # loaded state, applied once k is known

    def fresh(self) -> TorchJDCombiner:
        return TorchJDCombiner(self.name, self.spec)

    def weighting(self, opts: CombinerOptions, n_tasks: int) -> Any:
        """Built on first use (and again if the options change, which starts its state afresh)."""
        if self._weighting is None or opts != self._built_for:
            problem = missing_requirement(self.name, n_tasks)
            if problem:
                raise UserError(problem)
            with module_subclassing_as_defined():
                import torchjd.aggregation

            self._weighting, self._built_for = self.spec.build(torchjd.aggregation, opts), opts
        return self._weighting

    def __call__(self, stats: TaskStats, opts: CombinerOptions) -> Weights:
        from ngdiff.combiners import signed, step_seed

        order = task_order(stats, self.spec)
        H = torch.tensor(stats.task_gram(), dtype=torch.float64)[order][:, order]
        weighting = self.weighting(opts, stats.k)
        if self._pending is not None:
            self._restore(weighting, stats.k)
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only (torch.manual_seed would reseed CUDA's too, outside the fork)
            torch.default_generator.manual_seed(step_seed(opts, stats.step))
            rows = weighting(H)
        lambdas = [0.0] * stats.k
        for row, task in enumerate(order):
            lambdas[task] = float(rows[row])
        return signed(stats, lambdas)

    # ------------------------------------------------------------------ state (GradVac, PCD)
    def state_dict(self) -> dict[str, Any]:
        """The weighting's buffers as JSON lists (the checkpoint's trainer state is JSON)."""
        if not self.spec.stateful:
            return {}
        if self._weighting is None:
            return dict(self._pending or {})
        return {name: buffer.tolist() for name, buffer in self._weighting.named_buffers()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = dict(state) if self.spec.stateful and state else None

    def _restore(self, weighting: Any, k: int) -> None:
        """One call on the identity creates the buffers (and the weighting's record of their shape), then
        the saved values overwrite them: the weighting continues as if it had run the saved steps."""
        with torch.random.fork_rng(devices=[]):
            weighting(torch.eye(k, dtype=torch.float64))
        buffers = dict(weighting.named_buffers())
        for name, value in self._pending.items():
            buffers[name].copy_(torch.tensor(value, dtype=buffers[name].dtype))
        self._pending = None


def register_torchjd_weightings(register: Callable[[str], Callable]) -> None:
    for name, spec in WEIGHTINGS.items():
        register(name)(TorchJDCombiner(name, spec))
