"""Per-run end points of the study and their per-cell descriptions (what one run, one cell, one lr grid scored).

Forget quality is TOFU's (Maini et al. 2024, github.com/locuslab/tofu): the p-value of a two-sample KS test
between the forget split's truth ratios under the unlearned model and under the retain model. A p-value is
not an effect size (it moves with the split size), so the study's endpoints are built on the KS distance D
itself, and p-values are only ever summarised by their median or geometric mean (the mean of log10 p),
never by an arithmetic mean.

Definitions, per run (one method at one initial lr, one seed, one world, one stage), with the target being
the run's step-0 row (the fine-tuned model before any unlearning):

- floor = `fraction` x the target's utility; a point qualifies when its utility >= floor; step 0 always
  qualifies, so every run has a best point.
- G_t = (D_target - D_t) / D_target, the share of the target's KS distance that unlearning has closed at
  point t (1 = indistinguishable from the retain model, 0 = no better than the target, < 0 = worse).
- best point: the qualifying point with the smallest D (ties: the earlier step); reported with its D, G,
  log10 forget quality, utility and the paired truth-ratio distance to the retain model (mean over the
  forget questions of |ln TR - ln TR_retain|, `forget_tr_distance`; secondary: question by question
  where D compares distributions; nan when the evaluation has none).
- area: the mean over the evaluation points after step 0 of max(0, G_t) x [utility_t >= floor], i.e. the
  area under the clipped G curve normalised by the budget (every method is evaluated at the same cadence,
  so the mean over points is the rectangle rule); in [0, 1]; a point below the floor, or with D or utility
  missing, scores 0.
- end point: the last evaluation (the whole budget spent), with its D, G, log10 forget quality, utility and
  whether it keeps the floor (claim 2 is about end points). A run stopped at a non-finite number (its lr
  too large) is `diverged`: its end point has no D, G or utility and does not keep the floor; its best
  point and area come from the evaluations it made, the divergence counting as a point that scores 0.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ngdiff.study.results import _number
from ngdiff.study.spec import StudyError

Row = dict[str, Any]

DISTANCE_METRIC = "forget_ks_statistic"  # the KS distance D the evaluation writes beside forget_quality
PAIRED_METRIC = "forget_tr_distance"  # the paired truth-ratio distance to the retain model
QUALITY_METRIC = "forget_quality"
UTILITY_METRIC = "model_utility"

# Endpoint fields holding p-values: summarised by median / geometric mean only, never averaged arithmetically.
PVALUE_FIELDS = frozenset({"best_quality", "end_quality"})
NUMERIC_FIELDS = frozenset(
    {
        "best_step",
        "best_distance",
        "best_gap",
        "best_quality",
        "best_log10_quality",
        "best_utility",
        "best_tr_distance",
        "area",
        "end_distance",
        "end_gap",
        "end_quality",
        "end_log10_quality",
        "end_utility",
    }
)


@dataclass(frozen=True)
class EndpointRule:
    """Which row keys hold D, forget quality and utility, and the utility floor as a fraction of the target's."""

    fraction: float = 0.95
    distance_metric: str = DISTANCE_METRIC
    quality_metric: str = QUALITY_METRIC
    utility_metric: str = UTILITY_METRIC

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise StudyError(f"a utility floor is a fraction of the target's utility in (0, 1], got {self.fraction}")


@dataclass(frozen=True)
class Endpoint:
    """One run's end points under one floor (see the module docstring for every definition)."""

    stage: str | None
    world: Any
    method: str
    lr: float
    seed: int
    fraction: float
    floor: float
    target_distance: float
    target_utility: float
    points: int  # evaluation points after step 0
    best_step: int
    best_distance: float
    best_gap: float
    best_quality: float  # nan when the row has none
    best_log10_quality: float
    best_utility: float
    area: float
    end_step: int
    end_distance: float
    end_gap: float
    end_quality: float
    end_log10_quality: float
    end_utility: float
    end_meets_floor: bool
    best_tr_distance: float = math.nan  # the best point's paired truth-ratio distance; nan when none
    diverged: bool = False  # stopped at a non-finite number before the budget was spent

    @property
    def pair_key(self) -> tuple[Any, int]:
        return (self.world, self.seed)

    def value(self, field: str) -> float:
        if field not in NUMERIC_FIELDS:
            raise StudyError(f"unknown endpoint '{field}': choose one of {', '.join(sorted(NUMERIC_FIELDS))}")
        return float(getattr(self, field))


DEFAULT_RULE = EndpointRule()


def run_key(row: Row) -> tuple[Any, Any, str, float, int]:
    """(stage, world, method, lr, seed): rows without a `world` or `stage` key (a one-world study) get None."""
    return (row.get("stage"), row.get("world"), row["method"], float(row["lr"]), int(row["seed"]))


def _log10(p: float | None) -> float:
    if p is None:
        return math.nan
    return math.log10(p) if p > 0 else -math.inf


def run_endpoint(points: Sequence[Row], rule: EndpointRule = DEFAULT_RULE) -> Endpoint:
    """The end points of one run from its rows (one per evaluation, the target's as step 0)."""
    if not points:
        raise StudyError("a run without evaluation rows has no end points")
    points = sorted(points, key=lambda r: int(r["step"]))
    stage, world, method, lr, seed = run_key(points[0])
    name = f"run {method} lr={lr:g} seed={seed}" + (f" world={world}" if world is not None else "")
    if int(points[0]["step"]) != 0:
        raise StudyError(f"{name}: no step-0 row (the target's evaluation), so no floor and no G")
    target = points[0]
    d_target = _number(target.get(rule.distance_metric))
    u_target = _number(target.get(rule.utility_metric))
    if d_target is None or d_target <= 0:
        raise StudyError(f"{name}: the target's '{rule.distance_metric}' is {target.get(rule.distance_metric)!r}")
    if u_target is None:
        raise StudyError(f"{name}: the target's '{rule.utility_metric}' is missing, so there is no utility floor")
    floor = rule.fraction * u_target

    def gap(row: Row) -> float:
        d = _number(row.get(rule.distance_metric))
        return math.nan if d is None else (d_target - d) / d_target

    def qualifies(row: Row) -> bool:
        u = _number(row.get(rule.utility_metric))
        return int(row["step"]) == 0 or (u is not None and u >= floor)

    best = target
    for row in points[1:]:
        d = _number(row.get(rule.distance_metric))
        if qualifies(row) and d is not None and d < _number(best.get(rule.distance_metric)):
            best = row
    after = points[1:]
    scores = [max(0.0, gap(r)) if qualifies(r) and not math.isnan(gap(r)) else 0.0 for r in after]
    area = statistics.fmean(scores) if scores else 0.0
    end = points[-1]

    def metric(row: Row, key: str) -> float:
        value = _number(row.get(key))
        return math.nan if value is None else value

    return Endpoint(
        stage=stage,
        world=world,
        method=method,
        lr=lr,
        seed=seed,
        fraction=rule.fraction,
        floor=floor,
        target_distance=d_target,
        target_utility=u_target,
        points=len(after),
        best_step=int(best["step"]),
        best_distance=metric(best, rule.distance_metric),
        best_gap=gap(best),
        best_quality=metric(best, rule.quality_metric),
        best_log10_quality=_log10(_number(best.get(rule.quality_metric))),
        best_utility=metric(best, rule.utility_metric),
        best_tr_distance=metric(best, PAIRED_METRIC),
        area=area,
        end_step=int(end["step"]),
        end_distance=metric(end, rule.distance_metric),
        end_gap=gap(end),
        end_quality=metric(end, rule.quality_metric),
        end_log10_quality=_log10(_number(end.get(rule.quality_metric))),
        end_utility=metric(end, rule.utility_metric),
        end_meets_floor=qualifies(end) and not end.get("diverged"),
        diverged=bool(end.get("diverged")),
    )


def endpoints(rows: Iterable[Row], rule: EndpointRule = DEFAULT_RULE) -> list[Endpoint]:
    """Every run's end points (runs told apart by stage, world, method, lr and seed), in a stable order."""
    runs: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        runs[run_key(row)].append(row)
    ordered = sorted(runs, key=lambda k: tuple(str(part) for part in k[:3]) + k[3:])
    return [run_endpoint(runs[key], rule) for key in ordered]


def of_stage(points: Iterable[Endpoint], stage: str | None) -> list[Endpoint]:
    """The end points of one stage (`selection` or `confirmation`); None keeps every stage."""
    return [e for e in points if stage is None or e.stage == stage]


# --------------------------------------------------------------------------- per-cell descriptions


def median(values: Sequence[float]) -> float:
    if not values:
        raise StudyError("the median of no values")
    return float(statistics.median(values))


def geometric_mean(values: Sequence[float]) -> float:
    """exp(mean(log x)) of positive values: the way to average p-values (10 ** mean log10 p)."""
    if not values:
        raise StudyError("the geometric mean of no values")
    if any(not v > 0 for v in values):
        raise StudyError(f"a geometric mean needs positive values, got {min(values)!r}")
    return math.exp(statistics.fmean(math.log(v) for v in values))


def arithmetic_mean(values: Sequence[float], field: str) -> float:
    """The arithmetic mean of an endpoint that is not a p-value; p-values are refused (use the median or
    `geometric_mean`, or average `best_log10_quality`)."""
    if field in PVALUE_FIELDS:
        raise StudyError(f"'{field}' holds p-values, which are never averaged arithmetically: use its median or "
                         "geometric mean, or the mean of its log10")  # fmt: skip
    if not values:
        raise StudyError("the mean of no values")
    return statistics.fmean(values)


@dataclass(frozen=True)
class CellSummary:
    """One endpoint of one cell (a method at one lr, in one stage) over its runs: every run's value, the
    median, the geometric mean (positive values only, else None) and, for non-p-value endpoints, the mean."""

    method: str
    lr: float
    stage: str | None
    field: str
    values: tuple[tuple[Any, int, float], ...]  # (world, seed, value) of every run, sorted
    median: float
    geometric_mean: float | None
    mean: float | None  # None for p-value fields: never an arithmetic mean of p-values

    @property
    def n(self) -> int:
        return len(self.values)


def cell_summaries(points: Iterable[Endpoint], field: str) -> list[CellSummary]:
    """Per (stage, method, lr): `field` summarised over the cell's runs (non-finite values kept in `values`,
    left out of the statistics)."""
    cells: dict[tuple, list[Endpoint]] = defaultdict(list)
    for e in points:
        e.value(field)  # names an unknown field
        cells[(e.stage, e.method, e.lr)].append(e)
    out = []
    for (stage, method, lr), runs in sorted(cells.items(), key=lambda kv: (str(kv[0][0]), kv[0][1], kv[0][2])):
        values = tuple(sorted(((e.world, e.seed, e.value(field)) for e in runs), key=lambda v: (str(v[0]), v[1])))
        finite = [v for _, _, v in values if math.isfinite(v)]
        out.append(
            CellSummary(
                method=method,
                lr=lr,
                stage=stage,
                field=field,
                values=values,
                median=median(finite) if finite else math.nan,
                geometric_mean=geometric_mean(finite) if finite and all(v > 0 for v in finite) else None,
                mean=None if field in PVALUE_FIELDS or not finite else statistics.fmean(finite),
            )
        )
    return out


def select_lrs(points: Iterable[Endpoint], field: str = "best_gap", higher_is_better: bool = True) -> dict[str, float]:
    """Per method, the lr whose median `field` is best (pass the selection stage's end points); ties go to
    the smaller lr."""
    sign = 1.0 if higher_is_better else -1.0
    chosen: dict[str, tuple[float, float]] = {}
    for cell in cell_summaries(points, field):
        score = sign * cell.median if math.isfinite(cell.median) else -math.inf
        best = chosen.get(cell.method)
        if best is None or score > best[0] or (score == best[0] and cell.lr < best[1]):
            chosen[cell.method] = (score, cell.lr)
    return {method: lr for method, (_, lr) in chosen.items()}


# --------------------------------------------------------------------------- claim 2: width of the good lr range


@dataclass(frozen=True)
class LrWidth:
    """The longest run of neighbouring grid lrs that qualify: `decades` = log10(last / first) of that run
    (so (points - 1) x the grid step on a log-even grid; 0 for a single point); `points` = 0 when none."""

    decades: float
    points: int
    first_lr: float | None
    last_lr: float | None


def lr_width_decades(qualifies: Mapping[float, bool]) -> LrWidth:
    """Width in decades of the longest contiguous run of qualifying lrs of one grid ({lr: qualifies});
    contiguous means neighbours in the sorted grid, so one failing lr in between splits the run; of two
    equally long runs, the one at the lower lrs."""
    grid = sorted(qualifies)
    if any(not lr > 0 for lr in grid):
        raise StudyError(f"the lr grid must be positive, got {grid}")
    best: tuple[int, int] | None = None
    start = None
    for i, lr in enumerate([*grid, math.nan]):
        ok = i < len(grid) and bool(qualifies[lr])
        if ok and start is None:
            start = i
        if not ok and start is not None:
            if best is None or i - start > best[1] - best[0] + 1:
                best = (start, i - 1)
            start = None
    if best is None:
        return LrWidth(0.0, 0, None, None)
    first, last = grid[best[0]], grid[best[1]]
    return LrWidth(math.log10(last / first), best[1] - best[0] + 1, first, last)


def lr_widths(points: Iterable[Endpoint], method: str, target_gap: float) -> dict[tuple[Any, int], LrWidth]:
    """Per (world, seed) of `method`: the width of the initial lrs whose end point keeps utility above the
    floor and reaches G >= `target_gap` (claim 2), over the lrs that (world, seed) ran."""
    grids: dict[tuple[Any, int], dict[float, bool]] = defaultdict(dict)
    for e in points:
        if e.method != method:
            continue
        if e.lr in grids[e.pair_key]:
            raise StudyError(f"{method} lr={e.lr:g} seed={e.seed} world={e.world} appears twice: pass one stage")
        grids[e.pair_key][e.lr] = e.end_meets_floor and e.end_gap >= target_gap
    if not grids:
        raise StudyError(f"no end points of method '{method}'")
    return {key: lr_width_decades(grid) for key, grid in grids.items()}
