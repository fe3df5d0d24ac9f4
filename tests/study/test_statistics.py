"""The study's statistics on hand-made numbers: endpoints, cell summaries, Holm, the hierarchical bootstrap's
coverage, verdicts and their MDE, floor sensitivity, the Brown-Forsythe test and the lr-width helper."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats

from ngdiff.study.endpoints import (
    Endpoint,
    EndpointRule,
    arithmetic_mean,
    cell_summaries,
    endpoints,
    geometric_mean,
    lr_width_decades,
    lr_widths,
    median,
    run_endpoint,
    select_lrs,
)
from ngdiff.study.inference import (
    Comparison,
    Verdict,
    bootstrap_pvalue,
    brown_forsythe,
    end_spread_test,
    floor_sensitivity,
    hierarchical_bootstrap,
    holm,
    paired_differences,
    verdicts,
)
from ngdiff.study.spec import StudyError


def row(step, d, u, fq=0.01, method="m", lr=1e-3, seed=0, **extra) -> dict:
    return {
        "method": method, "lr": lr, "seed": seed, "step": step,
        "forget_ks_statistic": d, "model_utility": u, "forget_quality": fq, **extra,
    }  # fmt: skip


# --------------------------------------------------------------------------- endpoints


def test_endpoints_of_a_hand_trajectory():
    # target D 0.8, utility 1.0; floor 0.9 x 1.0 = 0.9. G_t = (0.8 - D_t) / 0.8.
    rows = [
        row(15, 0.4, 0.92, fq=0.01),  # G 0.5, qualifies: the best point (smallest qualifying D)
        row(0, 0.8, 1.00, fq=1e-4),  # the target, G 0
        row(5, 0.6, 0.95, fq=1e-3),  # G 0.25, qualifies
        row(10, 0.2, 0.89, fq=0.5),  # G 0.75 but below the floor: neither best nor counted in the area
        row(20, 0.9, 0.90, fq=1e-5),  # G -0.125, on the floor (qualifies), clipped to 0 in the area
    ]
    e = run_endpoint(rows, EndpointRule(fraction=0.9))
    assert e.floor == pytest.approx(0.9) and e.target_distance == 0.8 and e.points == 4
    assert e.best_step == 15 and e.best_distance == 0.4 and e.best_utility == 0.92
    assert e.best_gap == pytest.approx(0.5) and e.best_log10_quality == pytest.approx(-2.0)
    assert e.area == pytest.approx((0.25 + 0 + 0.5 + 0) / 4)
    assert e.end_step == 20 and e.end_gap == pytest.approx(-0.125) and e.end_meets_floor
    assert e.end_log10_quality == pytest.approx(-5.0)
    assert math.isnan(e.best_tr_distance)  # the rows carry no paired truth-ratio distance
    paired = [{**r, "forget_tr_distance": r["step"] / 100} for r in rows]
    assert run_endpoint(paired, EndpointRule(fraction=0.9)).best_tr_distance == pytest.approx(0.15)  # step 15's
    # a stricter floor (0.95): step 15 (0.92) drops out, step 5 is the best; only step 5 scores in the area
    strict = run_endpoint(rows, EndpointRule(fraction=0.95))
    assert strict.best_step == 5 and strict.best_gap == pytest.approx(0.25)
    assert strict.area == pytest.approx(0.25 / 4) and not strict.end_meets_floor


def test_step_zero_qualifies_when_every_later_point_breaks_the_floor_and_ties_go_early():
    collapsed = [row(0, 0.5, 1.0), row(5, 0.1, 0.5), row(10, 0.05, 0.2)]
    e = run_endpoint(collapsed)
    assert e.best_step == 0 and e.best_gap == 0.0 and e.area == 0.0 and not e.end_meets_floor
    assert e.end_gap == pytest.approx(0.9)  # the end point is reported whatever its utility
    tie = [row(0, 0.5, 1.0), row(5, 0.25, 1.0), row(10, 0.25, 1.0)]
    assert run_endpoint(tie).best_step == 5
    missing = [row(0, 0.5, 1.0), row(5, 0.1, None), row(10, None, 1.0), row(15, 0.3, 1.0)]
    e = run_endpoint(missing)  # a point without utility does not qualify, one without D cannot be best
    assert e.best_step == 15 and e.area == pytest.approx(0.4 / 3)


def test_a_run_without_its_target_row_is_refused_and_worlds_and_stages_are_separate_runs():
    with pytest.raises(StudyError, match="no step-0 row"):
        run_endpoint([row(5, 0.1, 1.0)])
    with pytest.raises(StudyError, match=r"in \(0, 1\], got 1.5"):
        EndpointRule(fraction=1.5)
    rows = [
        row(s, d, 1.0, world=w, stage=st)
        for w in (0, 1)
        for st in ("selection", "confirmation")
        for s, d in ((0, 0.5), (5, 0.25 if w else 0.4))
    ]
    eps = endpoints(rows)
    assert len(eps) == 4
    gaps = {(e.world, e.stage): e.best_gap for e in eps}
    assert gaps[(1, "confirmation")] == pytest.approx(0.5) and gaps[(0, "selection")] == pytest.approx(0.2)


# --------------------------------------------------------------------------- cell summaries


def make_endpoint(method="m", world=0, seed=0, lr=1e-3, gap=0.0, quality=0.1, end_gap=None, meets=True) -> Endpoint:
    end_gap = gap if end_gap is None else end_gap
    return Endpoint(
        stage=None, world=world, method=method, lr=lr, seed=seed, fraction=0.95, floor=0.95,
        target_distance=1.0, target_utility=1.0, points=10, best_step=5, best_distance=1 - gap, best_gap=gap,
        best_quality=quality, best_log10_quality=math.log10(quality), best_utility=1.0, area=max(gap, 0) / 2,
        end_step=10, end_distance=1 - end_gap, end_gap=end_gap, end_quality=quality,
        end_log10_quality=math.log10(quality), end_utility=1.0 if meets else 0.5, end_meets_floor=meets,
    )  # fmt: skip


def test_median_and_geometric_mean_on_known_numbers_and_no_arithmetic_mean_of_p_values():
    assert median([3.0, 1.0, 2.0, 10.0]) == 2.5
    assert geometric_mean([1e-4, 1e-2, 1.0]) == pytest.approx(1e-2)
    assert geometric_mean([2.0, 8.0]) == pytest.approx(4.0)
    with pytest.raises(StudyError, match="positive"):
        geometric_mean([0.1, 0.0])
    with pytest.raises(StudyError, match="never averaged arithmetically"):
        arithmetic_mean([0.1, 0.2], "best_quality")
    assert arithmetic_mean([0.1, 0.2, 0.6], "best_gap") == pytest.approx(0.3)
    cells = [make_endpoint(seed=s, quality=q, gap=g) for s, q, g in ((0, 1e-4, 0.1), (1, 1e-2, 0.2), (2, 1.0, 0.6))]
    (quality,) = cell_summaries(cells, "best_quality")
    assert quality.mean is None and quality.geometric_mean == pytest.approx(1e-2) and quality.median == 1e-2
    assert [v for _, _, v in quality.values] == [1e-4, 1e-2, 1.0] and quality.n == 3
    (gap,) = cell_summaries(cells, "best_gap")
    assert gap.mean == pytest.approx(0.3) and gap.median == 0.2
    with pytest.raises(StudyError, match="unknown endpoint"):
        cell_summaries(cells, "gap")


def test_select_lrs_takes_the_best_median_and_the_smaller_lr_on_a_tie():
    medians = {1e-4: (0.1, 0.5, 0.2), 1e-3: (0.3, 0.3, 0.0)}  # medians 0.2 and 0.3
    eps = [make_endpoint(lr=lr, seed=s, gap=g) for lr, gs in medians.items() for s, g in enumerate(gs)]
    assert select_lrs(eps) == {"m": 1e-3}
    eps += [make_endpoint(method="n", lr=lr, gap=0.4) for lr in (1e-2, 1e-3)]
    assert select_lrs(eps)["n"] == 1e-3


# --------------------------------------------------------------------------- Holm and the bootstrap p-value


def test_holm_on_the_textbook_example():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([0.04]) == [0.04]


def test_bootstrap_pvalue_counts_the_far_side():
    assert bootstrap_pvalue(np.array([1.0, 2.0, 3.0, -1.0])) == pytest.approx(2 * 2 / 5)
    assert bootstrap_pvalue(np.ones(99)) == pytest.approx(2 / 100)
    assert bootstrap_pvalue(np.zeros(10)) == 1.0


# --------------------------------------------------------------------------- hierarchical bootstrap


def coverage(worlds: int, seeds: int, world_sd: float, reps: int, flat: bool, seed: int) -> float:
    """Share of `reps` synthetic designs (true mean 0.3, world effects N(0, world_sd), seed noise N(0, 1))
    whose 95% hierarchical-bootstrap percentile interval (B = 500) covers 0.3; `flat` pools every pair
    into one group, i.e. the broken bootstrap that ignores the world level."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(reps):
        effects = rng.normal(0.0, world_sd, worlds)
        groups = [0.3 + effects[w] + rng.normal(0.0, 1.0, seeds) for w in range(worlds)]
        boot = hierarchical_bootstrap([np.concatenate(groups)] if flat else groups, 500, rng)
        low, high = np.quantile(boot, [0.025, 0.975])
        hits += low <= 0.3 <= high
    return hits / reps


def test_the_hierarchical_bootstrap_covers_the_true_mean_and_a_flat_one_does_not():
    # 8 worlds x 4 seeds, world sd 0.8: a long simulation (4000 designs) puts the coverage at 0.936 for the
    # hierarchical interval and 0.787 for the flat one; with 400 designs each is >= 4.4 standard errors
    # away from the bound 0.88, so neither assertion fails by chance.
    hierarchical = coverage(8, 4, 0.8, 400, flat=False, seed=1)
    assert 0.88 <= hierarchical <= 0.99
    assert coverage(8, 4, 0.8, 400, flat=True, seed=2) < 0.88
    # the study's own scale, 3 worlds x 5 seeds, with a small world effect (sd 0.25): 0.939 in the long run.
    # With few worlds and large world effects no bootstrap can cover (3 worlds: the interval lies within
    # the range of the world means, which holds the true mean with probability 3/4).
    assert 0.88 <= coverage(3, 5, 0.25, 400, flat=False, seed=3) <= 0.99


def test_the_hierarchical_bootstrap_resamples_worlds_then_seeds():
    # two worlds of one value each: a replicate draws (a, a), (a, b), (b, a) or (b, b), so the means are
    # 0, 0.5 and 1 with probabilities 1/4, 1/2, 1/4
    boot = hierarchical_bootstrap([[0.0], [1.0]], 20_000, 5)
    assert set(np.unique(boot)) == {0.0, 0.5, 1.0}
    assert np.mean(boot == 0.5) == pytest.approx(0.5, abs=0.02)
    # unequal worlds: the mean is over the drawn pairs (world 0 has 3 seeds, world 1 one)
    assert np.mean(hierarchical_bootstrap([[1.0, 1.0, 1.0], [5.0]], 20_000, 6)) == pytest.approx(
        (0.25 * 1 + 0.25 * 5 + 0.5 * (3 * 1 + 5) / 4), abs=0.05
    )
    same = hierarchical_bootstrap([[1.0, 2.0], [3.0]], 100, 7)
    assert np.array_equal(same, hierarchical_bootstrap([[1.0, 2.0], [3.0]], 100, 7))
    # a draw of 0.1, 0.2 and -0.3 sums to 5.6e-17 in floating point; its mean is 0, and counts as 0
    lattice = hierarchical_bootstrap([[0.1, 0.2, -0.3]], 2_000, 8)
    assert np.any(lattice == 0.0) and not np.any((lattice != 0) & (np.abs(lattice) < 1e-12))


# --------------------------------------------------------------------------- verdicts


def design(effect: float, worlds: int, seeds: int, rng: random.Random, noise: float = 0.05) -> list[Endpoint]:
    """NGDiff and NPO run on the same (world, seed)s; the world shifts both alike (it cancels in the pair)."""
    out = []
    for w in range(worlds):
        shift = rng.gauss(0, 0.2)
        for s in range(seeds):
            base = 0.3 + shift + rng.gauss(0, noise)
            out.append(make_endpoint("NPO", w, s, gap=base))
            out.append(make_endpoint("NGDiff", w, s, gap=base + effect + rng.gauss(0, noise)))
    return out


def test_a_large_effect_is_supported_its_opposite_contradicted_and_zero_mostly_inconclusive():
    rng = random.Random(0)
    comparison = Comparison("NGDiff", "NPO", "best_gap", "greater")
    (up,) = verdicts(design(0.3, 3, 4, rng), [comparison], n_boot=2000)
    assert up.verdict == "supported" and up.estimate == pytest.approx(0.3, abs=0.05) and up.ci_low > 0
    assert up.n_worlds == 3 and up.n_pairs == 12 and up.seeds_per_world == (4, 4, 4) and up.ci_level == 0.95
    (down,) = verdicts(design(-0.3, 3, 4, rng), [comparison], n_boot=2000)
    assert down.verdict == "contradicted" and down.ci_high < 0
    # the claim "lower D" holds when NGDiff's D is below NPO's: a gain in G is a loss in D
    (d,) = verdicts(design(0.3, 3, 4, rng), [Comparison("NGDiff", "NPO", "best_distance", "less")], n_boot=2000)
    assert d.verdict == "supported" and d.estimate < 0
    nulls = [verdicts(design(0.0, 3, 4, rng), [comparison], n_boot=1000, seed=i)[0].verdict for i in range(40)]
    assert nulls.count("inconclusive") >= 32, nulls


def test_the_mde_shrinks_as_seeds_grow_and_a_thin_design_is_inconclusive():
    comparison = Comparison("NGDiff", "NPO")
    few = verdicts(design(0.0, 2, 4, random.Random(1)), [comparison], n_boot=4000)[0]
    many = verdicts(design(0.0, 2, 16, random.Random(1)), [comparison], n_boot=4000)[0]
    assert many.mde < 0.7 * few.mde  # seed noise only: the SE halves with 4x the seeds
    assert few.mde == pytest.approx((stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * few.se)
    (thin,) = verdicts(design(1.0, 1, 4, random.Random(2)), [comparison], n_boot=2000)
    assert thin.verdict == "inconclusive" and "below the design minimum" in thin.note and thin.ci_low > 0


def test_holm_widens_the_intervals_of_a_family():
    rng = random.Random(3)
    points = design(0.3, 3, 4, rng)
    npo = [e for e in points if e.method == "NPO"]
    points += [make_endpoint("GA", e.world, e.seed, gap=e.best_gap + rng.gauss(0, 0.05)) for e in npo]
    family = [Comparison("NGDiff", "NPO"), Comparison("NGDiff", "GA"), Comparison("GA", "NPO")]
    out = verdicts(points, family, n_boot=2000)
    assert [v.p_holm for v in out] == pytest.approx(holm([v.p for v in out]))
    ranked = sorted(out, key=lambda v: v.p)  # step i is tested at alpha / (m - i + 1), or less when held back
    assert [v.ci_level >= 1 - 0.05 / k - 1e-12 for v, k in zip(ranked, (3, 2, 1), strict=True)] == [True] * 3
    assert ranked[0].ci_level == pytest.approx(1 - 0.05 / 3)
    assert out[0].mde == pytest.approx((stats.norm.ppf(1 - 0.05 / 6) + stats.norm.ppf(0.8)) * out[0].se)
    assert [v.verdict for v in out[:2]] == ["supported", "supported"]
    for v in out:  # the interval and the adjusted p agree
        assert (v.verdict != "inconclusive") == (v.p_holm < 0.05)


def test_pairs_are_matched_by_world_and_seed_and_p_values_are_never_compared():
    points = [make_endpoint("a", w, s, gap=1.0 + w) for w in (0, 1) for s in (0, 1, 2)]
    points += [make_endpoint("b", w, s, gap=0.5) for w in (0, 1) for s in (0, 1)]
    pairs = paired_differences(points, Comparison("a", "b"))
    assert pairs.differences == pytest.approx((0.5, 0.5, 1.5, 1.5)) and pairs.seeds == (0, 1, 0, 1)
    assert pairs.unpaired == (("a", 0, 2), ("a", 1, 2))
    with pytest.raises(StudyError, match="p-values"):
        Comparison("a", "b", "best_quality")
    with pytest.raises(StudyError, match="name the comparison's lr"):
        paired_differences([*points, make_endpoint("b", 0, 0, lr=1e-2)], Comparison("a", "b"))


def test_the_sentence():
    v = Verdict(
        Comparison("NGDiff", "NPO"), "supported", 0.1234, 0.0312, 0.2141, 0.975, 0.005, 0.01, 0.03, 0.0844,
        2, 8, (4, 4),
    )  # fmt: skip
    assert v.sentence() == (
        "NGDiff vs NPO on G: +0.123 [0.0312, 0.214] (97.5% CI), Holm p = 0.01, MDE 0.084, 2 worlds x 4 seeds: supported"
    )


# --------------------------------------------------------------------------- floor sensitivity


def test_floor_sensitivity_recomputes_the_verdicts_at_each_floor():
    # A's good point keeps 93% of the target's utility, B's keeps 99%: A wins at the 0.90 floor only.
    rng = random.Random(4)
    rows = []
    for w in (0, 1):
        for s in range(4):
            for method, d, u in (("A", 0.2, 0.93), ("B", 0.5, 0.99)):
                rows += [row(0, 0.8, 1.0, method=method, seed=s, world=w)]
                rows += [row(5, d + rng.gauss(0, 0.02), u, method=method, seed=s, world=w)]
    result = floor_sensitivity(rows, [Comparison("A", "B")], n_boot=2000)
    assert result.fractions == (0.90, 0.95, 0.98)
    assert [e.best_step for e in result.endpoints[0.90] if e.method == "A"] == [5] * 8
    assert [e.best_step for e in result.endpoints[0.95] if e.method == "A"] == [0] * 8
    ((comparison, row_of_verdicts),) = result.side_by_side()
    assert comparison == Comparison("A", "B")
    assert [v.verdict for v in row_of_verdicts] == ["supported", "contradicted", "contradicted"]
    assert result.stable() == [False]


# --------------------------------------------------------------------------- claim 2


def test_brown_forsythe_is_scipy_levene_at_the_median_and_an_anova_of_absolute_deviations():
    a = [1.0, 1.2, 0.9, 1.1, 1.05, 0.95]
    b = [0.2, 2.5, 1.0, 3.1, -0.4, 1.7]
    result = brown_forsythe(a, b)
    reference = stats.levene(a, b, center="median")
    assert result.statistic == pytest.approx(reference.statistic) and result.pvalue == pytest.approx(reference.pvalue)
    by_hand = stats.f_oneway(np.abs(np.subtract(a, np.median(a))), np.abs(np.subtract(b, np.median(b))))
    assert result.statistic == pytest.approx(by_hand.statistic) and result.pvalue < 0.01
    assert result.spread_a == pytest.approx(0.075) and result.spread_b == pytest.approx(1.15)
    points = [make_endpoint("auto", seed=i, end_gap=g) for i, g in enumerate(a)]
    points += [make_endpoint("fixed", seed=i, end_gap=g) for i, g in enumerate(b)]
    assert end_spread_test(points, "auto", "fixed").statistic == pytest.approx(reference.statistic)
    # a diverged run has no end point: left out of the test, counted beside it
    diverged = replace(make_endpoint("fixed", seed=9, end_gap=math.nan, meets=False), diverged=True)
    test = end_spread_test([*points, diverged], "auto", "fixed")
    assert test.statistic == pytest.approx(reference.statistic) and (test.n_b, test.diverged_b, test.diverged_a) == (
        6,
        1,
        0,
    )


def test_lr_width_in_decades_on_a_hand_grid():
    grid = [10 ** (-5 + k / 2) for k in range(7)]  # 1e-5 .. 1e-2, half-decade steps
    ok = dict(zip(grid, [True, False, True, True, True, False, True], strict=True))
    width = lr_width_decades(ok)
    assert width.points == 3 and width.decades == pytest.approx(1.0)
    assert width.first_lr == pytest.approx(1e-4) and width.last_lr == pytest.approx(1e-3)
    assert lr_width_decades(dict.fromkeys(grid, False)).points == 0
    single = lr_width_decades({1e-4: False, 1e-3: True})
    assert single.points == 1 and single.decades == 0.0
    # per (world, seed): the end point must keep the floor and reach G >= 0.3
    points = [
        make_endpoint("auto", lr=lr, end_gap=g, meets=m)
        for lr, g, m in ((1e-4, 0.5, True), (1e-3, 0.4, True), (1e-2, 0.9, False))
    ]
    points += [make_endpoint("auto", seed=1, lr=lr, end_gap=g) for lr, g in ((1e-4, 0.1), (1e-3, 0.4), (1e-2, 0.35))]
    widths = lr_widths(points, "auto", target_gap=0.3)
    assert widths[(0, 0)].decades == pytest.approx(1.0) and widths[(0, 0)].last_lr == 1e-3
    assert widths[(0, 1)].decades == pytest.approx(1.0) and widths[(0, 1)].first_lr == 1e-3
