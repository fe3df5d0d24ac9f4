"""parallel/grads.py: the step's gradient algebra against plain torch, on a fake engine (no model); AutoLR's
step line; and the backends' `close`."""

from __future__ import annotations

import pytest
import torch

from parallel.base import DistContext
from parallel.grads import StepGradients, StepLine, gram_matrix, own_slice


class FakeEngine:
    """A `GradientEngine` whose gradients are whatever the test puts in `grads`."""

    def __init__(self, ctx: DistContext | None = None, replicates: bool = False, releases: bool = False):
        self.ctx, self.replicates_grads, self.releases_grads = ctx or DistContext(), replicates, releases
        self.grads: list[torch.Tensor] = []
        self.written: list[torch.Tensor] | None = None
        self.reduced: list[torch.Tensor] = []

    def local_grads(self) -> list[torch.Tensor]:
        return self.grads

    def set_local_grads(self, grads: list[torch.Tensor]) -> None:
        self.written = grads

    def zero_grad(self) -> None:
        self.grads = [torch.zeros_like(g) for g in self.grads]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self.reduced.append(tensor.clone())
        return tensor


def task_grads(k: int, seed: int = 0) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(3, 4, generator=generator), torch.randn(5, generator=generator)] for _ in range(k)]


@pytest.mark.parametrize(
    ("dtype", "offload", "releases"), [("fp32", False, True), ("fp32", False, False), ("bf16", True, False)]
)
def test_reduce_and_combine_equal_the_plain_formulas(dtype, offload, releases):
    k, counts, weights = 3, [4, 2, 5], (0.5, -1.5, 2.0)
    grads = task_grads(k)
    engine = FakeEngine(releases=releases)
    step = StepGradients(engine, k, dtype, offload)
    sums = [torch.tensor(float(i + 1), dtype=torch.float64) for i in range(k)]
    for g in grads:
        engine.grads = [t.clone() for t in g]
        step.take()
    reduced = step.reduce(sums, counts, [1.0, 7.0])
    assert len(engine.reduced) == 1 and engine.reduced[0].numel() == 6 + 2 * k + 2  # one packed all-reduce
    flat = [torch.cat([t.reshape(-1) for t in g]).double() for g in grads]
    rel = 1e-2 if dtype == "bf16" else 1e-6
    for i in range(k):
        for j in range(k):
            want = float(flat[i] @ flat[j]) / (counts[i] * counts[j])
            assert reduced.gram[i][j] == pytest.approx(want, rel=rel, abs=1e-6)
    assert reduced.losses == pytest.approx([(i + 1) / n for i, n in enumerate(counts)])
    assert reduced.extras == (1.0, 7.0)
    assert reduced.loss_rows.tolist() == [1.0, 4.0, 2.0, 2.0, 3.0, 5.0]
    step.combine(weights)
    combined = torch.cat([t.reshape(-1) for t in engine.written]).double()
    want = sum(w * f / n for w, f, n in zip(weights, flat, counts, strict=True))
    torch.testing.assert_close(combined, want, rtol=rel, atol=1e-3 if dtype == "bf16" else 1e-6)


def test_replicated_gradients_add_one_slice_per_rank_and_the_slices_cover_every_term():
    tensors = task_grads(1)[0]
    parts = [own_slice(FakeEngine(DistContext(rank, 3), replicates=True), tensors) for rank in range(3)]
    for index, tensor in enumerate(tensors):
        torch.testing.assert_close(torch.cat([p[index] for p in parts]), tensor.reshape(-1))
    assert own_slice(FakeEngine(DistContext(0, 3)), tensors) is tensors  # sharded: the whole local shard


def test_gram_matrix_divides_by_both_counts_and_a_misuse_is_refused():
    assert gram_matrix([8.0, 2.0, 4.0], [2.0, 1.0]) == ((2.0, 1.0), (1.0, 4.0))
    step = StepGradients(FakeEngine(), 2)
    with pytest.raises(RuntimeError):
        step.reduce([torch.zeros((), dtype=torch.float64)] * 2, [1, 1])
    with pytest.raises(RuntimeError):
        step.combine((1.0, 1.0))


class FakeStepEngine(FakeEngine):
    """A `StepEngine`: SGD on `params` with `grads`; counts the pushes of edited parameters."""

    def __init__(self, params: list[torch.Tensor], grads: list[torch.Tensor]):
        super().__init__()
        self.params, self.grads, self.changed = params, grads, 0

    def local_params(self) -> list[torch.Tensor]:
        return self.params

    def params_changed(self) -> None:
        self.changed += 1

    def step(self, lr: float) -> None:
        torch._foreach_add_(self.params, self.grads, alpha=-lr)


def test_the_step_line_probes_points_along_the_step_taken_once_in_one_all_reduce():
    before, grads = ([t.double() for t in tensors] for tensors in task_grads(2, seed=3))
    engine = FakeStepEngine([t.clone() for t in before], grads)
    line = StepLine(engine, 0.5)  # the optimizer step, taken once: u = -0.5 g
    visited = []

    def partial_sums() -> torch.Tensor:
        offset = (engine.params[1] - before[1]) / (-0.5 * grads[1])  # where along u the parameters are
        visited.append(round(float(offset.mean()), 9))
        return torch.tensor([float(offset.mean()), 1.0], dtype=torch.float64)

    rows = line.probe([-1.0, 0.0, 2.0], partial_sums)
    assert visited == [0.0, 2.0, -1.0]  # nearest to r = 1 first (where the step left them)
    assert len(engine.reduced) == 1 and engine.reduced[0].shape == (3, 2)  # one all-reduce of every probe
    assert {r: round(float(row[0]), 9) for r, row in rows.items()} == {-1.0: -1.0, 0.0: 0.0, 2.0: 2.0}
    line.move_to(0.3)  # the fitted multiple: the step at 0.3 x the lr
    for now, start, g in zip(engine.params, before, grads, strict=True):
        torch.testing.assert_close(now, start - 0.15 * g)
    changed = engine.changed
    line.move_to(0.3)  # already there: no edit, nothing pushed
    assert engine.changed == changed == 4


def test_closing_a_zero3_backend_ends_zero_init_builds():
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from ngdiff.config import OptimConfig, ParallelConfig
    from parallel.compat.transformers import zero3_init
    from parallel.zero3 import Zero3Backend

    backend = Zero3Backend(DistContext(), ParallelConfig(), OptimConfig(), "fp32")
    backend._hf_ds_config = zero3_init({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    assert is_deepspeed_zero3_enabled()
    backend.close()
    assert not is_deepspeed_zero3_enabled()  # a later from_pretrained in this process builds a whole model
