"""The study's verdicts, computed, never written: paired differences, hierarchical bootstrap, Holm, MDE.

A comparison asks whether `method` beats `reference` on one endpoint (see ngdiff.study.endpoints), with a
declared direction: `greater` when method - reference > 0 means the claim holds (G, area, log10 forget
quality), `less` when < 0 does (D). Runs are paired by (world, seed): the two methods saw the same world and
the same seed, so world and seed effects cancel in the difference.

- Estimate: the mean of the paired differences over every pair.
- Hierarchical bootstrap (Saravanan, Berman & Sober 2020, "Application of the hierarchical bootstrap to
  multi-level data in neuroscience", NBDC 3(5)): each replicate draws the worlds with replacement, then,
  inside every drawn world, that world's seeds with replacement, and takes the mean over the drawn pairs.
  The world level is resampled because a fresh world is what a confirmation must generalise to; a bootstrap
  over pooled pairs would ignore the between-world variance and give intervals too narrow. With few worlds
  it is still too narrow when the effect differs between worlds: every replicate lies within the range of
  the world means, which holds the true mean with probability 1 - 2^(1-K) for K worlds (1/2 for 2, 3/4 for
  3). Simulated 95% coverage, seed sd 1, world sd 0 / 0.25 / 0.5 / 1: 3 worlds x 5 seeds 95 / 94 / 90 / 82%,
  2 worlds x 4 seeds 92 / 88 / 84 / 75% (a pooled bootstrap: 91 / 88 / 81 / 65% and 89 / 84 / 76 / 62%).
- Bootstrap p-value (two-sided, from the resampled distribution of the mean, b_1..b_B):
  p = min(1, 2 (1 + min(#{b <= 0}, #{b >= 0})) / (B + 1)).
- Holm's step-down correction (Holm 1979, "A simple sequentially rejective multiple test procedure", Scand.
  J. Statist. 6) across the comparisons of one family: the adjusted p-values
  p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)) for the p-values sorted ascending.
- Adjusted CI: the percentile interval at level 1 - alpha / c, c = max_{j <= i} (m - j + 1) p_(j) / p_(i)
  (p~ before clipping at 1, divided by p): the level at which Holm tests the comparison, alpha / (m - i + 1)
  at step i, smaller when an earlier step holds it back. So the interval excludes 0 exactly when p~ < alpha
  (up to the 1/B graininess of the bootstrap), and every level is at least 1 - alpha.
- Verdict (mechanical): `supported` when the adjusted CI excludes 0 on the claim's side, `contradicted`
  when it excludes 0 on the other side, else `inconclusive`; also `inconclusive` (with a note) when the
  design is below the minimum a verdict needs (DESIGN: >= 2 worlds x >= 4 seeds).
- MDE (minimum detectable effect of the design at the given power, 80% by default):
  (z_{1 - alpha / (2m)} + z_{power}) x SE, SE = the standard deviation of the bootstrap distribution; alpha/m
  is Holm's strictest level, so the MDE is conservative for every comparison of the family.

End-point spread (claim 2): the Brown-Forsythe test (Brown & Forsythe 1974, "Robust tests for the equality
of variances", JASA 69), Levene's test on absolute deviations from the group medians.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
from scipy import stats

from ngdiff.study.endpoints import DEFAULT_RULE, PVALUE_FIELDS, Endpoint, EndpointRule, Row, endpoints, of_stage
from ngdiff.study.spec import StudyError

DIRECTIONS = {"greater": 1.0, "less": -1.0}
LABELS = {
    "best_gap": "G",
    "best_distance": "D",
    "best_log10_quality": "log10 forget quality",
    "best_utility": "utility",
    "best_tr_distance": "paired truth-ratio distance",
    "area": "area",
    "end_gap": "end-point G",
    "end_distance": "end-point D",
    "end_log10_quality": "end-point log10 forget quality",
    "end_utility": "end-point utility",
}
MIN_WORLDS, MIN_SEEDS = 2, 4  # DESIGN: >= 4 seeds x >= 2 worlds for every method a verdict names
_CHUNK = 4_000_000  # bootstrap draws held in memory at once


class PairedPoint(Protocol):
    """What the paired comparison reads of a run: its method, lr, world and seed, and a numeric endpoint by
    name. The study's `Endpoint` is one; so is a sequence's (ngdiff.sequence.compare)."""

    method: str
    lr: float
    world: Any
    seed: int

    @property
    def pair_key(self) -> tuple[Any, int]: ...

    def value(self, field: str) -> float: ...


@dataclass(frozen=True)
class Comparison:
    """`method` against `reference` on endpoint `field`; `direction` is the sign of method - reference that
    means the claim holds. The lrs pick each method's cell (None: the method must have run one lr only)."""

    method: str
    reference: str
    field: str = "best_gap"
    direction: str = "greater"
    method_lr: float | None = None
    reference_lr: float | None = None

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise StudyError(f"comparison direction '{self.direction}': choose 'greater' or 'less'")
        if self.field in PVALUE_FIELDS:
            raise StudyError(
                f"'{self.field}' holds p-values, whose differences are not effects: compare "
                f"'{self.field.replace('quality', 'log10_quality')}' instead"
            )

    @property
    def label(self) -> str:
        return f"{self.method} vs {self.reference} on {LABELS.get(self.field, self.field)}"


@dataclass(frozen=True)
class Pairs:
    """The paired differences (method - reference) of one comparison, with each pair's world and seed."""

    worlds: tuple[Any, ...]
    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    unpaired: tuple[tuple[str, Any, int], ...]  # (method, world, seed) that ran without its partner

    def by_world(self) -> list[np.ndarray]:
        groups: dict[Any, list[float]] = defaultdict(list)
        for world, d in zip(self.worlds, self.differences, strict=True):
            groups[world].append(d)
        return [np.asarray(groups[w], dtype=float) for w in sorted(groups, key=str)]


def _cell(points: Sequence[PairedPoint], method: str, lr: float | None) -> dict[tuple[Any, int], PairedPoint]:
    mine = [e for e in points if e.method == method and (lr is None or e.lr == lr)]
    if not mine:
        raise StudyError(f"no end points of method '{method}'" + (f" at lr {lr:g}" if lr is not None else ""))
    lrs = sorted({e.lr for e in mine})
    if len(lrs) > 1:
        raise StudyError(f"method '{method}' ran lrs {lrs}: name the comparison's lr")
    out: dict[tuple[Any, int], PairedPoint] = {}
    for e in mine:
        if e.pair_key in out:
            raise StudyError(f"{method} world={e.world} seed={e.seed} appears twice: pass the end points of one stage")
        out[e.pair_key] = e
    return out


def paired_differences(points: Iterable[PairedPoint], comparison: Comparison) -> Pairs:
    """method - reference on `comparison.field` for every (world, seed) both ran; runs without a partner
    are listed in `unpaired`, a non-finite value is refused."""
    points = list(points)
    a = _cell(points, comparison.method, comparison.method_lr)
    b = _cell(points, comparison.reference, comparison.reference_lr)
    keys = sorted(set(a) & set(b), key=lambda k: (str(k[0]), k[1]))
    if not keys:
        raise StudyError(f"{comparison.label}: no (world, seed) ran both methods")
    differences = []
    for key in keys:
        x, y = a[key].value(comparison.field), b[key].value(comparison.field)
        if not (math.isfinite(x) and math.isfinite(y)):
            raise StudyError(f"{comparison.label}: world={key[0]} seed={key[1]} has a non-finite value ({x}, {y})")
        differences.append(x - y)
    unpaired = [(comparison.method, *k) for k in a if k not in b]
    unpaired += [(comparison.reference, *k) for k in b if k not in a]
    return Pairs(
        worlds=tuple(k[0] for k in keys),
        seeds=tuple(k[1] for k in keys),
        differences=tuple(differences),
        unpaired=tuple(sorted(unpaired, key=str)),
    )


def hierarchical_bootstrap(
    groups: Sequence[Sequence[float]], n_boot: int = 10_000, rng: np.random.Generator | int | None = 0
) -> np.ndarray:
    """B bootstrap means: worlds (the groups) drawn with replacement, then each drawn world's values drawn
    with replacement, the mean taken over every drawn value. One group is a plain (flat) bootstrap. The
    means are rounded to 12 decimals: differences of KS distances sit on a lattice (multiples of 1/n), and
    a mean that is 0 in exact arithmetic must count as 0 (p-value, CI bound), not as +-1e-17."""
    if n_boot < 1:
        raise StudyError(f"the bootstrap needs at least one replicate, got B = {n_boot}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    sizes = np.array([len(g) for g in groups])
    if len(sizes) == 0 or sizes.min() == 0:
        raise StudyError("the hierarchical bootstrap needs at least one value in every world")
    k, n_max = len(sizes), int(sizes.max())
    table = np.zeros((k, n_max))
    for i, g in enumerate(groups):
        table[i, : len(g)] = np.asarray(g, dtype=float)
    out = np.empty(n_boot)
    chunk = max(1, _CHUNK // (k * n_max))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        worlds = rng.integers(0, k, size=(b, k))
        n = sizes[worlds]  # (b, k): seeds of each drawn world
        draws = (rng.random((b, k, n_max)) * n[..., None]).astype(np.int64)  # uniform in [0, n)
        used = np.arange(n_max) < n[..., None]
        values = table[worlds[..., None], draws]
        out[start : start + b] = np.where(used, values, 0.0).sum(axis=(1, 2)) / n.sum(axis=1)
    return np.round(out, 12)


def bootstrap_pvalue(distribution: np.ndarray) -> float:
    """Two-sided: min(1, 2 (1 + min(#{b <= 0}, #{b >= 0})) / (B + 1))."""
    below, above = int(np.sum(distribution <= 0)), int(np.sum(distribution >= 0))
    return min(1.0, 2.0 * (1 + min(below, above)) / (len(distribution) + 1))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's (1979) step-down adjusted p-values, in the order given."""
    return [min(1.0, p) for p in _step_down(pvalues)]


def _step_down(pvalues: Sequence[float]) -> list[float]:
    """max_{j <= i} (m - j + 1) p_(j), not clipped at 1: divided by p it gives the level multiplier."""
    m = len(pvalues)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: pvalues[i])):
        running = max(running, (m - rank) * pvalues[i])
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class Verdict:
    comparison: Comparison
    verdict: str  # supported / contradicted / inconclusive
    estimate: float  # mean paired difference, method - reference
    ci_low: float
    ci_high: float
    ci_level: float  # the Holm-adjusted level of the interval
    p: float  # bootstrap p-value, unadjusted
    p_holm: float
    se: float  # bootstrap standard error
    mde: float
    n_worlds: int
    n_pairs: int
    seeds_per_world: tuple[int, ...]
    note: str = ""

    def sentence(self) -> str:
        """One line, e.g. `NGDiff vs NPO on G: +0.12 [0.03, 0.21] (97.5% CI), Holm p = 0.01, MDE 0.08,
        2 worlds x 4 seeds: supported`."""
        seeds = set(self.seeds_per_world)
        design = (
            f"{self.n_worlds} world{'s' * (self.n_worlds != 1)} x {seeds.pop()} seeds"
            if len(seeds) == 1
            else f"{self.n_worlds} worlds, {self.n_pairs} pairs"
        )
        note = f" ({self.note})" if self.note else ""
        return (
            f"{self.comparison.label}: {self.estimate:+.3g} [{self.ci_low:.3g}, {self.ci_high:.3g}] "
            f"({_percent(self.ci_level)} CI), Holm p = {self.p_holm:.2g}, MDE {self.mde:.2g}, {design}: "
            f"{self.verdict}{note}"
        )


def _percent(level: float) -> str:
    text = f"{100 * level:.2f}".rstrip("0").rstrip(".")
    return f"{text}%"


def verdicts(
    points: Iterable[PairedPoint],
    comparisons: Sequence[Comparison],
    *,
    alpha: float = 0.05,
    n_boot: int = 10_000,
    seed: int = 0,
    power: float = 0.8,
    min_worlds: int = MIN_WORLDS,
    min_seeds: int = MIN_SEEDS,
) -> list[Verdict]:
    """One verdict per comparison; the comparisons form one Holm family. Comparison i draws its bootstrap
    from the stream (seed, i), so a verdict does not move when another comparison is added after it."""
    if not comparisons:
        return []
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise StudyError(f"alpha and power must lie in (0, 1), got {alpha} and {power}")
    points = list(points)
    m = len(comparisons)
    pairs = [paired_differences(points, c) for c in comparisons]
    boots, estimates = [], []
    for i, p in enumerate(pairs):
        boots.append(hierarchical_bootstrap(p.by_world(), n_boot, np.random.default_rng([seed, i])))
        estimates.append(float(np.mean(p.differences)))
    raw = [bootstrap_pvalue(b) for b in boots]
    stepped = _step_down(raw)
    adjusted = [min(1.0, p) for p in stepped]
    z = stats.norm.ppf(1 - alpha / (2 * m)) + stats.norm.ppf(power)
    out = []
    for c, p, boot, estimate, p_raw, p_adj, p_step in zip(
        comparisons, pairs, boots, estimates, raw, adjusted, stepped, strict=True
    ):
        level_alpha = alpha * p_raw / p_step
        low, high = (float(q) for q in np.quantile(boot, [level_alpha / 2, 1 - level_alpha / 2]))
        sign = DIRECTIONS[c.direction]
        if (sign > 0 and low > 0) or (sign < 0 and high < 0):
            verdict = "supported"
        elif (sign > 0 and high < 0) or (sign < 0 and low > 0):
            verdict = "contradicted"
        else:
            verdict = "inconclusive"
        groups = p.by_world()
        seeds_per_world = tuple(len(g) for g in groups)
        note = ""
        if len(groups) < min_worlds or min(seeds_per_world) < min_seeds:
            note = f"below the design minimum of {min_worlds} world{'s' * (min_worlds != 1)} x {min_seeds} seeds"
            verdict = "inconclusive"
        se = float(np.std(boot, ddof=1)) if len(boot) > 1 else 0.0
        out.append(
            Verdict(
                comparison=c,
                verdict=verdict,
                estimate=estimate,
                ci_low=low,
                ci_high=high,
                ci_level=1 - level_alpha,
                p=p_raw,
                p_holm=p_adj,
                se=se,
                mde=z * se,
                n_worlds=len(groups),
                n_pairs=len(p.differences),
                seeds_per_world=seeds_per_world,
                note=note,
            )
        )
    return out


# --------------------------------------------------------------------------- floor sensitivity


@dataclass(frozen=True)
class FloorSensitivity:
    """End points and verdicts of one family recomputed at several utility floors (fractions of the
    target's utility)."""

    fractions: tuple[float, ...]
    endpoints: dict[float, list[Endpoint]]
    verdicts: dict[float, list[Verdict]]

    def side_by_side(self) -> list[tuple[Comparison, tuple[Verdict, ...]]]:
        """Per comparison, its verdict at every floor, in the order of `fractions`."""
        comparisons = [v.comparison for v in self.verdicts[self.fractions[0]]]
        return [(c, tuple(self.verdicts[f][i] for f in self.fractions)) for i, c in enumerate(comparisons)]

    def stable(self) -> list[bool]:
        """Per comparison: the same verdict at every floor."""
        return [len({v.verdict for v in row}) == 1 for _, row in self.side_by_side()]


def floor_sensitivity(
    rows: Iterable[Row],
    comparisons: Sequence[Comparison],
    fractions: Sequence[float] = (0.90, 0.95, 0.98),
    rule: EndpointRule = DEFAULT_RULE,
    stage: str | None = None,
    **verdict_options: Any,
) -> FloorSensitivity:
    """`endpoints` and `verdicts` at every floor in `fractions` (the rule's other keys kept); `stage` keeps
    one stage's rows (the confirmation's, for the verdicts). The bootstrap seed is the same at every floor,
    so a verdict changes with the floor, not with the draw."""
    if not fractions:
        raise StudyError("floor sensitivity needs at least one floor")
    rows = list(rows)
    by_floor, verdicts_by_floor = {}, {}
    for fraction in fractions:
        rule_f = EndpointRule(fraction, rule.distance_metric, rule.quality_metric, rule.utility_metric)
        points = of_stage(endpoints(rows, rule_f), stage)
        by_floor[fraction] = points
        verdicts_by_floor[fraction] = verdicts(points, comparisons, **verdict_options)
    return FloorSensitivity(tuple(fractions), by_floor, verdicts_by_floor)


# --------------------------------------------------------------------------- claim 2: end-point spread


@dataclass(frozen=True)
class SpreadTest:
    """Brown-Forsythe test of equal spread; `spread_*` = each group's median absolute deviation from its
    median (the quantity the test compares); `diverged_*` = runs left out because they have no end point."""

    statistic: float
    pvalue: float
    n_a: int
    n_b: int
    spread_a: float
    spread_b: float
    diverged_a: int = 0
    diverged_b: int = 0


def brown_forsythe(a: Sequence[float], b: Sequence[float]) -> SpreadTest:
    """Brown & Forsythe (1974): scipy.stats.levene with center='median'."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        raise StudyError(f"a spread test needs at least 2 values per group, got {len(a)} and {len(b)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise StudyError("a spread test needs finite values")
    result = stats.levene(a, b, center="median")
    return SpreadTest(
        float(result.statistic),
        float(result.pvalue),
        len(a),
        len(b),
        float(np.median(np.abs(a - np.median(a)))),
        float(np.median(np.abs(b - np.median(b)))),
    )


def end_spread_test(
    points: Iterable[Endpoint], method_a: str, method_b: str, field: str = "end_gap", world: Any = None
) -> SpreadTest:
    """Brown-Forsythe on `field` over every lr and seed of `method_a` (e.g. with AutoLR) against
    `method_b` (without); `world` keeps one world, so between-world differences do not count as spread.
    Diverged runs have no end point: they are left out of the test and counted beside it."""
    a, b = ([e for e in points if e.method == m and (world is None or e.world == world)] for m in (method_a, method_b))
    test = brown_forsythe([e.value(field) for e in a if not e.diverged], [e.value(field) for e in b if not e.diverged])
    return replace(test, diverged_a=sum(e.diverged for e in a), diverged_b=sum(e.diverged for e in b))
