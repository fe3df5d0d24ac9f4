"""AutoLR: the quadratic fit, the GeN update, and one real AutoLR step on a known quadratic loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ngdiff.autolr import AutoLR, QuadraticFit, fit_quadratic, horizon_scale, next_lr
from ngdiff.config import AutoLRConfig, OptimConfig
from parallel.base import DistContext
from parallel.single import SingleBackend


@pytest.mark.parametrize("points", [(-1.0, 0.0, 1.0), (0.0, 1.0, 2.0), (-1.0, -0.5, 0.0, 0.5, 1.0)])
def test_fit_recovers_an_exact_quadratic(points):
    a_true, b_true = 2.0, 0.5
    losses = [3.0 + a_true * r * r / 2 - b_true * r for r in points]
    fit = fit_quadratic(points, losses)
    assert pytest.approx(a_true) == fit.A
    assert pytest.approx(b_true) == fit.B
    assert fit.accepted and fit.optimal_multiple == pytest.approx(0.25)
    assert fit.r2 == pytest.approx(1.0)


def test_fit_rejects_negative_curvature_and_a_poor_fit():
    assert not fit_quadratic((-1.0, 0.0, 1.0), [1.0, 1.2, 1.0]).accepted  # concave: A < 0
    assert not fit_quadratic((-1.0, 0.0, 1.0), [0.5, 1.0, 1.5]).accepted  # rising along u: B < 0
    noisy = fit_quadratic((-1.0, -0.5, 0.0, 0.5, 1.0), [2.0, 0.0, 1.0, 0.1, 1.9], min_r2=0.99)
    assert noisy.A > 0 and noisy.B != 0 and not noisy.accepted
    assert not fit_quadratic((-1.0, 0.0, 1.0), [1.0, math.nan, 1.0]).accepted


def test_next_lr_is_the_clipped_moving_average():
    fit = QuadraticFit(A=1.0, B=1.5, r2=1.0, accepted=True)  # optimum 1.5 x lr, inside the clip
    assert next_lr(0.1, fit) == pytest.approx(0.9 * 0.1 + 0.1 * 0.15)
    far = QuadraticFit(A=1.0, B=10.0, r2=1.0, accepted=True)  # clipped to 2 lr
    assert next_lr(0.1, far) == pytest.approx(0.9 * 0.1 + 0.1 * 0.2)
    assert next_lr(0.1, far, momentum=0.0, scale=0.5) == pytest.approx(0.1)
    rejected = QuadraticFit(A=-1.0, B=1.0, r2=1.0, accepted=False)
    assert next_lr(0.1, rejected) == 0.1


def test_horizon_scale():
    assert horizon_scale("none", 5, 10) == 1.0
    assert horizon_scale("linear", 5, 10) == pytest.approx(0.5)
    assert horizon_scale("cosine", 10, 10) == pytest.approx(0.0)


class Quadratic(nn.Module):
    """L(theta) = 0.5 (theta - t)^T H (theta - t), H diagonal."""

    def __init__(self, start: torch.Tensor, target: torch.Tensor, curvature: torch.Tensor):
        super().__init__()
        self.theta = nn.Parameter(start.clone())
        self.register_buffer("target", target)
        self.register_buffer("curvature", curvature)

    def loss(self) -> torch.Tensor:
        diff = self.theta - self.target
        return 0.5 * (self.curvature * diff * diff).sum()


def make_backend(model: nn.Module, optim: OptimConfig) -> SingleBackend:
    backend = SingleBackend(DistContext(), None, optim, "fp32")
    backend.prepare(lambda: model)
    return backend


def autolr_step(backend: SingleBackend, lr: float, cfg: AutoLRConfig):
    model = backend.model
    backend.zero_grad()
    model.loss().backward()
    return AutoLR(cfg, backend, max_steps=10).step(
        lr,
        0,
        probe_sums=lambda: torch.tensor([float(model.loss()), 1.0], dtype=torch.float64),
        probe_loss=lambda row: float(row[0] / row[1]),
    )


def test_autolr_step_finds_the_analytic_optimum_of_a_quadratic():
    torch.manual_seed(0)
    start, target = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    curvature = torch.rand(6, dtype=torch.float64) + 0.5
    model = Quadratic(start, target, curvature).double()
    grad = curvature * (start - target)
    optimum = float(grad @ grad / (grad @ (curvature * grad)))  # exact line search along -grad
    lr = optimum * 0.8
    cfg = AutoLRConfig(enabled=True, momentum=0.0)
    record = autolr_step(make_backend(model, OptimConfig(name="sgd", lr=lr)), lr, cfg)
    assert record.accepted
    assert record.lr_after == pytest.approx(optimum, rel=1e-9)
    torch.testing.assert_close(model.theta.detach(), start - optimum * grad, rtol=1e-12, atol=1e-12)


def test_autolr_keeps_the_lr_when_the_fit_is_rejected():
    model = Quadratic(torch.ones(3), torch.zeros(3), -torch.ones(3))  # concave: negative curvature
    lr = 0.1
    cfg = AutoLRConfig(enabled=True, on_reject="keep")
    record = autolr_step(make_backend(model, OptimConfig(name="sgd", lr=lr)), lr, cfg)
    assert not record.accepted and record.lr_after == lr
    torch.testing.assert_close(model.theta.detach(), torch.ones(3) - lr * -torch.ones(3))  # the plain step


def test_adamw_state_after_autolr_equals_a_plain_step():
    """The moments are updated once; only the applied step is rescaled."""
    torch.manual_seed(1)
    start, target, curvature = torch.randn(5), torch.randn(5), torch.rand(5) + 0.5
    optim = OptimConfig(name="adamw", lr=0.05, weight_decay=0.01)
    plain_model, auto_model = Quadratic(start, target, curvature), Quadratic(start, target, curvature)
    plain, auto = make_backend(plain_model, optim), make_backend(auto_model, optim)
    for _ in range(3):  # a few steps so the state is not trivial
        for backend in (plain, auto):
            backend.zero_grad()
            backend.model.loss().backward()
            backend.step(0.05)
    before = auto_model.theta.detach().clone()
    plain.zero_grad()
    plain_model.loss().backward()
    plain.step(0.05)
    record = autolr_step(auto, 0.05, AutoLRConfig(enabled=True, momentum=0.0))
    state_plain = plain.optimizer.state[plain_model.theta]
    state_auto = auto.optimizer.state[auto_model.theta]
    for key in ("exp_avg", "exp_avg_sq", "step"):
        torch.testing.assert_close(state_auto[key], state_plain[key], rtol=0, atol=0)
    u = plain_model.theta.detach() - before
    torch.testing.assert_close(auto_model.theta.detach(), before + record.lr_after / 0.05 * u, rtol=1e-5, atol=1e-6)


def test_next_lr_wider_clip_and_the_reject_rules():
    far = QuadraticFit(A=1.0, B=10.0, r2=1.0, accepted=True)  # optimum 10 x lr
    assert next_lr(0.1, far, momentum=0.0, max_change=4.0) == pytest.approx(0.4)  # clipped to 4 lr
    near = QuadraticFit(A=1.0, B=0.01, r2=1.0, accepted=True)  # optimum lr / 100
    assert next_lr(0.1, near, momentum=0.5, max_change=4.0) == pytest.approx(0.5 * 0.1 + 0.5 * 0.025)
    rejected = QuadraticFit(A=1.0, B=-1.0, r2=1.0, accepted=False)
    assert next_lr(0.1, rejected, on_reject="keep") == 0.1
    assert next_lr(0.1, rejected, momentum=0.9, scale=0.5, on_reject="halve") == 0.05  # no averaging, no scale
    with pytest.raises(ValueError, match="on_reject"):
        next_lr(0.1, rejected, on_reject="double")


def test_a_rejected_fit_halves_the_lr_and_rescales_the_step():
    model = Quadratic(torch.ones(3), torch.zeros(3), -torch.ones(3))  # concave: the fit is rejected
    lr = 0.1
    cfg = AutoLRConfig(enabled=True, on_reject="halve")
    record = autolr_step(make_backend(model, OptimConfig(name="sgd", lr=lr)), lr, cfg)
    assert not record.accepted and record.lr_after == 0.05
    # grad = H (theta - t) = -1 per coordinate; the step taken is the one at lr / 2
    torch.testing.assert_close(model.theta.detach(), torch.ones(3) + 0.05 * torch.ones(3))
    assert record.acceptance_rate == 0.0


def test_a_known_loss_at_zero_is_not_probed_and_gives_the_same_fit():
    torch.manual_seed(2)
    start, target = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    curvature = torch.rand(4, dtype=torch.float64) + 0.5
    cfg = AutoLRConfig(enabled=True, momentum=0.0)
    records, calls = [], []
    for known in (False, True):
        model = Quadratic(start, target, curvature).double()
        backend = make_backend(model, OptimConfig(name="sgd", lr=0.1))
        backend.zero_grad()
        model.loss().backward()
        at_zero = torch.tensor([float(model.loss().detach()) + (0.25 if known else 0.0), 1.0], dtype=torch.float64)
        count = []

        def probe_sums(model=model, count=count):
            count.append(1)
            return torch.tensor([float(model.loss()), 1.0], dtype=torch.float64)

        record = AutoLR(cfg, backend, 10).step(
            0.1, 0, probe_sums, lambda row: float(row[0] / row[1]), at_zero if known else None
        )
        records.append(record)
        calls.append(len(count))
    assert calls == [3, 2]  # r = 0 comes from `at_zero`: one forward fewer
    fresh, known = records
    assert known.probe_losses[1] == pytest.approx(fresh.probe_losses[1] + 0.25)  # the given value is the one used
    assert known.probe_losses[0] == fresh.probe_losses[0] and known.probe_losses[2] == fresh.probe_losses[2]


def test_acceptance_rate_is_the_running_fraction_of_accepted_fits():
    model = Quadratic(torch.ones(2), torch.zeros(2), torch.ones(2)).double()
    backend = make_backend(model, OptimConfig(name="sgd", lr=0.1))
    autolr = AutoLR(AutoLRConfig(enabled=True), backend, 10)
    convex, rising = (1.0, 0.5, 0.5), (0.5, 1.0, 1.5)  # losses at r = -1, 0, 1: accepted; B < 0, rejected
    rates = []
    for step, losses in enumerate((convex, rising, rising, convex)):
        backend.zero_grad()
        model.loss().backward()
        before, u = model.theta.detach().clone(), -0.1 * model.theta.grad.clone()  # the SGD step at lr 0.1

        def probe_sums(before=before, u=u, losses=losses):
            r = round(float((model.theta.detach() - before)[0] / u[0]))  # where along the step we are
            return torch.tensor([losses[r + 1], 1.0], dtype=torch.float64)

        record = autolr.step(0.1, step, probe_sums, lambda row: float(row[0]))
        rates.append(record.as_metrics()["autolr/acceptance_rate"])
    assert rates == [1.0, 0.5, pytest.approx(1 / 3), 0.5]
    assert autolr.state_dict() == {"fits": 4, "accepted": 2}


@pytest.mark.parametrize("probe_loss", ["retain", "combined"])
def test_probing_the_steps_batch_reuses_its_loss_at_zero_and_saves_a_forward(
    tiny_model_dir, tofu_split, tmp_path, probe_loss
):
    from ngdiff.pipeline import run_training
    from parallel.base import DistContext as Ctx
    from tests.test_trainer_single import config

    forwards, rows = {}, {}
    for batch in ("fresh", "step"):
        cfg = config(
            tiny_model_dir,
            tofu_split,
            tmp_path / batch,
            "train.max_steps=1",
            "optim.name=sgd",
            "optim.lr=0.01",
            "autolr.enabled=true",
            f"autolr.probe_loss={probe_loss}",
            f"autolr.probe_batch={batch}",
        )
        count = []

        def hook(trainer, count=count):
            trainer.backend.model.register_forward_hook(lambda *_: count.append(1))

        rows[batch] = run_training(cfg, Ctx(), on_trainer=hook).results[0].metrics()
        forwards[batch] = len(count)
    tasks = 2 if probe_loss == "combined" else 1  # forwards per probe point
    assert forwards == {"fresh": 2 + 3 * tasks, "step": 2 + 2 * tasks}
    step = rows["step"]
    at_zero = step["loss_retain"]
    if probe_loss == "combined":
        at_zero = step["w_retain"] * step["loss_retain"] + step["w_forget"] * step["loss_forget"]
    assert step["autolr/probe_loss_+0"] == pytest.approx(at_zero, rel=1e-12)
    assert rows["fresh"]["autolr/probe_loss_+0"] != pytest.approx(at_zero, rel=1e-6)  # another batch
    # along the step's own SGD direction the combined objective falls to first order: B > 0
    if probe_loss == "combined":
        assert step["autolr/B"] > 0
