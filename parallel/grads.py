"""The gradient algebra of one step, in one place: take, stash, Gram sums, the packed all-reduce, combine.

For k task gradients g_1..g_k (each the gradient of its task's loss *sum* on this rank's shard), a step
1. takes each task's local gradient shard out of the engine: the k - 1 first into a `GradientStash`
   (fp32, bf16 or in host memory), the last one left live in the engine (`StepGradients.take`);
2. adds this rank's share of every <g_i, g_j> (i <= j) and sends them, with the tasks' loss sums, unit
   counts and the caller's extra numbers, in ONE all-reduce (`StepGradients.reduce`), after which every
   quantity is a mean over the global batch: one process and N processes compute the same numbers;
3. writes sum_i w_i g_i / n_i into the live gradient, in place, as the engine's gradient
   (`StepGradients.combine`);
4. on an AutoLR step, takes the optimizer step once and moves the parameters along it for the probes, whose
   sums travel in one all-reduce (`StepLine`).
An engine takes part only through `GradientEngine` (`StepEngine` for the step line): its local gradient
shards, writing them back, zeroing them, the sum all-reduce (and its parameter shards and optimizer step).
The weights and the probed losses come from the caller; nothing here knows the unlearning method.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from parallel.stash import GradientStash

if TYPE_CHECKING:
    from parallel.base import DistContext


class GradientEngine(Protocol):
    """What the gradient algebra needs of an engine (every `parallel.base.Backend` provides it)."""

    # every rank holds the whole reduced gradient (DDP): each adds only a 1/world_size slice to the Gram sums
    replicates_grads: bool
    # `zero_grad` lets go of the gradient tensors, so a stash may keep them instead of a copy
    releases_grads: bool

    ctx: DistContext

    def local_grads(self) -> list[torch.Tensor]:
        """This rank's (reduced) fp32 gradient shards."""

    def set_local_grads(self, grads: list[torch.Tensor]) -> None:
        """Make `grads` the gradients the optimizer steps with."""

    def zero_grad(self) -> None: ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...


class StepEngine(GradientEngine, Protocol):
    """What a step taken along a line needs beyond the gradient algebra (every `Backend` provides it)."""

    def local_params(self) -> list[torch.Tensor]:
        """This rank's live fp32 parameter shards; in-place edits are followed by `params_changed`."""

    def params_changed(self) -> None: ...

    def step(self, lr: float) -> None: ...


def upper_pairs(k: int) -> list[tuple[int, int]]:
    """(i, j), i <= j, row-major: the order of the Gram terms in the step's all-reduce."""
    return [(i, j) for i in range(k) for j in range(i, k)]


def gram_partial_sums(grads: Sequence[Iterable[torch.Tensor]]) -> torch.Tensor:
    """This rank's contributions to G_ij = <g_i, g_j> (i <= j, row-major upper triangle), in float64.

    The tasks' tensors are walked together, one parameter at a time (a stash yields its tensors one at
    a time), with one fp32 dot per pair and tensor, stacked and summed once: k(k+1)/2 kernels per
    tensor (the per-term conversion and accumulation cost more than the dots on a block's small tensors)."""
    pairs = upper_pairs(len(grads))
    dots = []
    for tensors in zip(*grads, strict=True):
        flat = [t.reshape(-1) for t in tensors]
        dots += [torch.dot(flat[i], flat[j]) for i, j in pairs]
    if not dots:
        return torch.zeros(len(pairs), dtype=torch.float64)
    return torch.stack(dots).view(-1, len(pairs)).double().sum(0)


def gram_matrix(upper: Sequence[float], counts: Sequence[float]) -> tuple[tuple[float, ...], ...]:
    """The Gram matrix of the tasks' mean-loss gradients from the all-reduced upper triangle of the
    loss-sum gradients: G_ij = P_ij / (n_i n_j)."""
    k = len(counts)
    gram = [[0.0] * k for _ in range(k)]
    for (i, j), value in zip(upper_pairs(k), upper, strict=True):
        gram[i][j] = gram[j][i] = value / (counts[i] * counts[j])
    return tuple(tuple(row) for row in gram)


def own_slice(engine: GradientEngine, tensors: Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    """The part of `tensors` whose inner products this rank adds to the global sums: the whole local shard,
    or, where every rank holds the whole gradient, a 1/world_size slice, so the all-reduce still counts
    every term once (and each rank computes 1/N of the dots). Any iterable passes through lazily otherwise
    (a stash converts its tensors one at a time as they are consumed)."""
    if not engine.replicates_grads:
        return tensors
    rank, world = engine.ctx.rank, engine.ctx.world_size
    return [t.reshape(-1).tensor_split(world)[rank] for t in tensors]


@dataclass(frozen=True)
class Reduced:
    """The step's all-reduced numbers: every one a sum or mean over the whole global batch."""

    gram: tuple[tuple[float, ...], ...]  # G_ij of the tasks' mean-loss gradients
    losses: tuple[float, ...]  # mean loss per task
    units: tuple[float, ...]  # global units (tokens or sequences) per task, at least 1
    extras: tuple[float, ...]  # the caller's extra numbers, summed over ranks, in their order
    loss_rows: torch.Tensor  # [loss sum, units] per task on the device (AutoLR's r = 0 point)


class StepGradients:
    """The k task gradients of one step, from the engine's backward to the combined gradient."""

    def __init__(self, engine: GradientEngine, k: int, stash_dtype: str = "fp32", stash_offload: bool = False):
        self.engine = engine
        self.k = k
        self.stash_dtype = stash_dtype
        self.stash_offload = stash_offload
        self.stashes: list[GradientStash] = []
        self.live: list[torch.Tensor] | None = None  # the last task's gradient: the combination is written here
        self.units: tuple[float, ...] = ()

    def take(self) -> None:
        """After a task's backward: stash its gradient and zero the engine's (tasks 1..k-1), or keep the
        last task's where it is."""
        engine = self.engine
        if len(self.stashes) == self.k - 1:
            self.live = engine.local_grads()
            return
        if self.stash_dtype == "fp32" and not self.stash_offload:
            # the engine's own tensors where it lets go of them (no copy, no extra traffic), else one copy
            grads = engine.local_grads()
            if not engine.releases_grads:
                grads = [g.detach().clone() for g in grads]
            self.stashes.append(GradientStash(grads, owned=True))
        else:  # a bf16 or offloaded stash converts the live gradients directly, with no fp32 copy in between
            self.stashes.append(GradientStash(engine.local_grads(), self.stash_dtype, self.stash_offload))
        engine.zero_grad()

    def reduce(
        self, loss_sums: Sequence[torch.Tensor], counts: Sequence[float], extras: Sequence[float] = ()
    ) -> Reduced:
        """The step's one all-reduce: [Gram partial sums, loss sums, unit counts, extras] (float64)."""
        if self.live is None:
            raise RuntimeError(f"reduce after {len(self.stashes)} of {self.k} task gradients were taken")
        engine, k = self.engine, self.k
        views = [own_slice(engine, stash) for stash in self.stashes] + [own_slice(engine, self.live)]
        partial = gram_partial_sums(views)
        host = torch.tensor([*counts, *extras], dtype=torch.float64)
        device = engine.ctx.device
        totals = engine.all_reduce_sum(torch.cat([partial.to(device), torch.stack(list(loss_sums)), host.to(device)]))
        values = totals.tolist()
        n_pairs = len(upper_pairs(k))
        upper, sums = values[:n_pairs], values[n_pairs : n_pairs + k]
        self.units = tuple(max(n, 1.0) for n in values[n_pairs + k : n_pairs + 2 * k])
        order = [index for i in range(k) for index in (n_pairs + i, n_pairs + k + i)]
        return Reduced(
            gram_matrix(upper, self.units),
            tuple(total / n for total, n in zip(sums, self.units, strict=True)),
            self.units,
            tuple(values[n_pairs + 2 * k :]),
            totals[order],
        )

    def combine(self, weights: Sequence[float]) -> None:
        """Write sum_i w_i g_i / n_i (the weighted mean-loss gradients) into the live gradient, in place, as
        the engine's gradient; the stashes are let go."""
        if len(self.units) != self.k or self.live is None:
            raise RuntimeError("combine before reduce")
        live, units = self.live, self.units
        torch._foreach_mul_(live, weights[-1] / units[-1])
        for stash, weight, n in zip(self.stashes, weights[:-1], units[:-1], strict=True):
            stash.add_to(live, weight / n)
        self.engine.set_local_grads(live)
        self.stashes, self.live = [], None


class StepLine:
    """The optimizer step taken once at `lr`, and the points theta_before + r u along it (u the step taken):
    AutoLR probes losses at a few r and leaves the parameters at the fitted one. SGD, Adam and AdamW steps
    are linear in lr, so r u is the step at r x lr, and the optimizer's state is updated once. Memory: one
    copy of this rank's parameter shards (u)."""

    def __init__(self, engine: StepEngine, lr: float):
        self.engine = engine
        self.update = [t.detach().clone() for t in engine.local_params()]  # theta_before for now
        engine.step(lr)
        self.live = engine.local_params()
        for u, now in zip(self.update, self.live, strict=True):
            u.neg_().add_(now)  # u = theta_after - theta_before
        self.position = 1.0  # the parameters are at theta_before + position u

    def move_to(self, r: float) -> None:
        """Put the parameters at theta_before + r u."""
        alpha, self.position = r - self.position, r
        if alpha == 0.0:
            return
        for param, u in zip(self.live, self.update, strict=True):
            param.add_(u, alpha=alpha)
        self.engine.params_changed()

    def probe(self, points: Sequence[float], partial_sums: Callable[[], torch.Tensor]) -> dict[float, torch.Tensor]:
        """`partial_sums()` (this rank's 1-d row) at each of `points`, nearest to r = 1 first (where the step
        leaves the parameters: r = 1 needs no move, and the path is short), all-reduced in one collective:
        point -> row summed over ranks."""
        order = sorted(points, key=lambda r: abs(r - 1.0))
        partial = []
        for r in order:
            self.move_to(r)
            partial.append(partial_sums())
        return dict(zip(order, self.engine.all_reduce_sum(torch.stack(partial)), strict=True))
