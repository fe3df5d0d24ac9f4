"""Each combiner against its definition, computed on explicit vectors."""

from __future__ import annotations

import math

import pytest
import torch

from ngdiff.combiners import COMBINERS, CombinerOptions, TaskStats, Weights, direction_norm_sq, get_combiner

OPTS = CombinerOptions(gdiff_coefficient=0.3, seed=7)


def stats_of(
    g_r: torch.Tensor, g_f: torch.Tensor, loss_r: float = 1.5, loss_f: float = 0.7, step: int = 0
) -> TaskStats:
    return TaskStats.two(float(g_r @ g_r), float(g_f @ g_f), float(g_r @ g_f), loss_r, loss_f, step)


def direction(w: Weights, g_r: torch.Tensor, g_f: torch.Tensor) -> torch.Tensor:
    return w[0] * g_r + w[1] * g_f


def vectors(seed: int, n: int = 17) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64) * 3


def test_registry_names():
    ours = {"ga", "gdiff", "ngdiff", "lossnorm", "rlw", "mgda", "pcgrad", "imtlg", "blur", "gru"}
    torchjd = {"upgrad", "dualproj", "cagrad", "aligned_mtl", "fairgrad", "krum", "gradvac", "pcd"}
    assert set(COMBINERS) == ours | torchjd | {"torchjd_mgda", "torchjd_pcgrad", "torchjd_imtlg"}
    with pytest.raises(ValueError, match="unknown combiner 'ngdif'"):
        get_combiner("ngdif")


@pytest.mark.parametrize("seed", range(5))
def test_simple_combiners_match_their_formulas(seed):
    g_r, g_f = vectors(seed)
    s = stats_of(g_r, g_f)
    expected = {
        "ga": -g_f,
        "gdiff": 0.3 * g_r - 0.7 * g_f,
        "ngdiff": g_r / g_r.norm() - g_f / g_f.norm(),
        "lossnorm": g_r / 1.5 - g_f / 0.7,
    }
    for name, want in expected.items():
        got = direction(COMBINERS[name](s, OPTS), g_r, g_f)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("seed", range(5))
def test_mgda_is_the_min_norm_point_of_the_segment(seed):
    g_r, g_f = vectors(seed)
    g1, g2 = g_r, -g_f
    grid = torch.linspace(0, 1, 100001, dtype=torch.float64)
    norms = ((grid[:, None] * g1 + (1 - grid[:, None]) * g2) ** 2).sum(1)
    best = grid[norms.argmin()]
    w = COMBINERS["mgda"](stats_of(g_r, g_f), OPTS)
    assert w[0] == pytest.approx(float(best), abs=2e-5)
    assert w[0] - w[1] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(8))
def test_pcgrad_matches_the_projection_algorithm(seed):
    g_r, g_f = vectors(seed)
    g1, g2 = g_r.clone(), -g_f
    p1, p2 = g1.clone(), g2.clone()
    if g1 @ g2 < 0:  # conflicting: project each onto the other's normal plane
        p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
        p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    got = direction(COMBINERS["pcgrad"](stats_of(g_r, g_f), OPTS), g_r, g_f)
    torch.testing.assert_close(got, p1 + p2, rtol=1e-12, atol=1e-12)


def test_pcgrad_conflicting_case_is_exercised():
    g_r = torch.tensor([1.0, 0.0], dtype=torch.float64)
    g_f = torch.tensor([1.0, 1.0], dtype=torch.float64)  # c = 1 > 0: g_R and -g_F conflict
    w = COMBINERS["pcgrad"](stats_of(g_r, g_f), OPTS)
    assert (w[0], w[1]) == (pytest.approx(2.0), pytest.approx(-1.5))


@pytest.mark.parametrize("seed", range(5))
def test_imtlg_projects_equally_on_both_unit_task_gradients(seed):
    g_r, g_f = vectors(seed)
    g1, g2 = g_r, -g_f
    w = COMBINERS["imtlg"](stats_of(g_r, g_f), OPTS)
    d = direction(w, g_r, g_f)
    assert float(d @ (g1 / g1.norm())) == pytest.approx(float(d @ (g2 / g2.norm())), rel=1e-9)
    assert w[0] - w[1] == pytest.approx(1.0)  # the task weights sum to one


def test_rlw_is_a_seeded_softmax_shared_by_all_ranks():
    s = stats_of(*vectors(0))
    w1, w2 = COMBINERS["rlw"](s, OPTS), COMBINERS["rlw"](s, OPTS)
    assert w1 == w2
    assert w1[0] > 0 > w1[1] and w1[0] - w1[1] == pytest.approx(1.0)
    gen = torch.Generator().manual_seed(7 * 1_000_003 + 0)
    soft = torch.softmax(torch.randn(2, generator=gen, dtype=torch.float64), 0)
    assert (w1[0], w1[1]) == (pytest.approx(float(soft[0])), pytest.approx(-float(soft[1])))
    later = COMBINERS["rlw"](TaskStats(s.gram, (1.0, 1.0), s.roles, step=1), OPTS)
    assert later != w1


def test_ngdiff_stays_in_the_green_area():
    """<d, g_R> >= 0, <d, g_F> <= 0 and |d| <= 2 whatever the angle between the task gradients."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = 2 + trial % 7
        g_r = torch.randn(n, generator=gen, dtype=torch.float64) * 10 ** (trial % 5 - 2)
        g_f = torch.randn(n, generator=gen, dtype=torch.float64)
        if trial % 10 == 0:
            g_f = -g_r * 2  # exactly opposed
        if trial % 10 == 1:
            g_f = g_r * 0.5  # exactly aligned
        d = direction(COMBINERS["ngdiff"](stats_of(g_r, g_f), OPTS), g_r, g_f)
        assert float(d @ g_r) >= -1e-9 * float(g_r.norm())
        assert float(d @ g_f) <= 1e-9 * float(g_f.norm())
        assert float(d.norm()) <= 2 + 1e-12


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("gamma", [1.0, 0.3])
def test_blur_matches_the_reference_update(seed, gamma):
    """BLUR's `BLO_forget_lower`: grad = remain_grad + xi forget_grad, xi = gama - <remain, forget>/|forget|^2,
    forget_grad the gradient of the forget objective (-g_F); so <d, -g_F> = gamma |g_F|^2 exactly."""
    g_r, g_f = vectors(seed)
    forget_grad = -g_f
    xi = gamma - (g_r @ forget_grad) / (forget_grad @ forget_grad)
    d = direction(COMBINERS["blur"](stats_of(g_r, g_f), CombinerOptions(blur_gamma=gamma)), g_r, g_f)
    torch.testing.assert_close(d, g_r + xi * forget_grad, rtol=1e-12, atol=1e-12)
    assert float(d @ forget_grad) == pytest.approx(gamma * float(g_f @ g_f), rel=1e-12)


def test_blur_with_two_forget_sets_uses_each_roles_mean_gradient():
    gen = torch.Generator().manual_seed(4)
    g_r, f1, f2 = (torch.randn(9, generator=gen, dtype=torch.float64) for _ in range(3))
    s = stats_of_rows([g_r, f1, f2], ("retain", "forget", "forget"))
    forget_grad = -(f1 + f2) / 2
    xi = 1.0 - (g_r @ forget_grad) / (forget_grad @ forget_grad)
    w = COMBINERS["blur"](s, CombinerOptions())
    torch.testing.assert_close(w[0] * g_r + w[1] * f1 + w[2] * f2, g_r + xi * forget_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_gru_matches_the_reference_projection(seed):
    """open-unlearning's GRU (EMA off): the unlearning gradient -g_F, projected onto g_R's normal plane when
    <-g_F, g_R> < 0; the retain gradient is never descended itself."""
    g_r, g_f = vectors(seed)
    objective = -g_f
    dot = objective @ g_r
    want = objective - dot / (g_r @ g_r) * g_r if dot < 0 else objective
    d = direction(COMBINERS["gru"](stats_of(g_r, g_f), OPTS), g_r, g_f)
    torch.testing.assert_close(d, want, rtol=1e-12, atol=1e-12)
    assert float(d @ g_r) >= -1e-9 * float(g_r.norm() * d.norm())  # no retain conflict left


def test_gru_conflicting_and_agreeing_cases_are_exercised():
    g_r = torch.tensor([1.0, 0.0], dtype=torch.float64)
    conflicting = COMBINERS["gru"](stats_of(g_r, torch.tensor([1.0, 1.0], dtype=torch.float64)), OPTS)
    assert conflicting == (pytest.approx(1.0), pytest.approx(-1.0))  # -g_F = (-1, -1) -> (0, -1)
    agreeing = COMBINERS["gru"](stats_of(g_r, torch.tensor([-1.0, 1.0], dtype=torch.float64)), OPTS)
    assert agreeing == (0.0, -1.0)


def stats_of_rows(grads: list[torch.Tensor], roles: tuple[str, ...], step: int = 0) -> TaskStats:
    gram = tuple(tuple(float(a @ b) for b in grads) for a in grads)
    return TaskStats(gram, tuple(1.0 for _ in grads), roles, step)


# TorchJD handles a zero Gramian itself (its norm_eps, rank and eps checks) without dividing by zero; GRU
# divides only when the two gradients conflict (<h_F, g_R> < 0), which zero gradients never do
NO_DIVISION = ("ga", "gdiff", "rlw", "gru", "upgrad", "dualproj", "cagrad", "aligned_mtl", "fairgrad", "gradvac")
NO_DIVISION += ("pcd", "torchjd_mgda", "torchjd_pcgrad", "torchjd_imtlg")


@pytest.mark.parametrize("name", sorted(set(COMBINERS) - {"krum"}))  # krum needs 3 tasks
def test_zero_norms_and_losses_give_finite_weights_and_a_warning(name):
    s = TaskStats.two(0.0, 0.0, 0.0, 0.0, 0.0)
    if name in NO_DIVISION:
        w = COMBINERS[name](s, OPTS)
    else:
        with pytest.warns(RuntimeWarning, match="dividing by zero"):
            w = COMBINERS[name](s, OPTS)
    assert math.isfinite(w[0]) and math.isfinite(w[1])


def test_direction_norm_from_the_gram_matrix():
    g_r, g_f = vectors(3)
    s = stats_of(g_r, g_f)
    w = (0.4, -1.3)
    assert direction_norm_sq(w, s) == pytest.approx(float(direction(w, g_r, g_f).norm() ** 2))
    assert s.cosine(0, 1) == pytest.approx(float(g_r @ g_f / (g_r.norm() * g_f.norm())))
