"""The study's analysis and `summary.md`, computed from the result rows alone (results.jsonl) and the study's
declarations (stages, comparisons, claim 2), so committed rows can be re-analysed by anyone.

- Every run's end points (ngdiff.study.endpoints): the best point above the utility floor by KS distance
  D, its gap G to the target, log10 forget quality, the utility-constrained area and the end point.
- Per cell (stage, method, lr): medians and the geometric mean of forget quality, and every seed's value;
  forget quality is a p-value and is never averaged arithmetically.
- Each method's lr is picked by `select_lrs` on the declared endpoint (`summary.select_on`, default the
  median G) over the selection stage's runs; the verdicts (ngdiff.study.inference) use the confirmation
  stage's runs only, each method at its selected lr, Holm-corrected as one family, each with its CI and
  minimum detectable effect, at every floor of `summary.floors`. A study without stages selects and
  confirms on the same runs, and its verdict lines say so.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ngdiff.study.endpoints import (
    DISTANCE_METRIC,
    Endpoint,
    EndpointRule,
    cell_summaries,
    endpoints,
    lr_widths,
    of_stage,
    select_lrs,
)
from ngdiff.study.inference import (
    LABELS,
    Comparison,
    FloorSensitivity,
    SpreadTest,
    Verdict,
    end_spread_test,
    floor_sensitivity,
    verdicts,
)
from ngdiff.study.muse_world import DISTANCE_WORDS, MUSE_DISTANCE
from ngdiff.study.results import Row, _number
from ngdiff.study.spec import StudyError, StudySpec

LOWER_IS_BETTER = frozenset({"best_distance", "end_distance", "best_tr_distance"})
TABLE_FIELDS = ("best_gap", "best_distance", "best_tr_distance", "best_quality", "best_utility", "area", "end_gap")
TABLE_FIELDS += ("end_quality",)
TABLE_FIELDS += ("end_utility",)
SAME_RUNS_NOTE = "lr selected on the same runs: no separate confirmation stage"


@dataclass(frozen=True)
class Claim2Result:
    """Claim 2 on the `claim2` stage's runs: per method the lr widths (decades) of every (world, seed), and
    the Brown-Forsythe test of end-point G (with vs without) per world."""

    with_method: str
    without: str
    target_gap: float
    widths: dict[str, dict[tuple[Any, int], float]]
    spread: dict[Any, SpreadTest | str]  # world -> the test, or why there is none


@dataclass
class Analysis:
    spec: StudySpec
    rule: EndpointRule
    points: list[Endpoint]
    selection_stage: str
    verdict_stage: str
    selected: dict[str, float]
    verdicts: list[Verdict] = field(default_factory=list)
    not_compared: list[tuple[Comparison, str]] = field(default_factory=list)
    sensitivity: FloorSensitivity | None = None
    claim2: Claim2Result | None = None
    problem: str = ""  # why no end points could be computed (then nothing else is)

    def stage_points(self, stage: str) -> list[Endpoint]:
        return of_stage(self.points, stage)

    def declared_comparisons(self) -> list[Comparison]:
        """The study's comparisons, each method at its selected lr (None where it has none yet)."""
        return [
            Comparison(
                c.method,
                c.reference,
                c.endpoint,
                c.direction,
                self.selected.get(c.method),
                self.selected.get(c.reference),
            )
            for c in self.spec.comparisons
        ]


def rule_of(spec: StudySpec, fraction: float | None = None) -> EndpointRule:
    """The study's endpoint rule; a MUSE world's D is its VerbMem distance (no truth ratios, no KS test)."""
    distance = MUSE_DISTANCE if spec.world.kind == "muse" else DISTANCE_METRIC
    return EndpointRule(
        spec.summary.utility_fraction if fraction is None else fraction,
        distance_metric=distance,
        utility_metric=spec.summary.utility_metric,
    )


def selected_lrs(points: Sequence[Endpoint], spec: StudySpec) -> dict[str, float]:
    """Each method's lr by the study's declared endpoint (`summary.select_on`) over `points`."""
    field = spec.summary.select_on
    return select_lrs(points, field, field not in LOWER_IS_BETTER)


def analyse(rows: Sequence[Row], spec: StudySpec, n_boot: int = 10_000) -> Analysis:
    """Everything summary.md and the plots report, from the rows and the study's declarations."""
    rule = rule_of(spec)
    selection_stage = "selection" if spec.staged else "grid"
    verdict_stage = "confirmation" if spec.staged else "grid"
    try:
        points = endpoints(rows, rule)
    except StudyError as err:
        return Analysis(spec, rule, [], selection_stage, verdict_stage, {}, problem=str(err))
    selected = selected_lrs(of_stage(points, selection_stage), spec)
    analysis = Analysis(spec, rule, points, selection_stage, verdict_stage, selected)
    confirmed = of_stage(points, verdict_stage)
    ran = {e.method for e in confirmed}
    family: list[Comparison] = []
    for comparison in analysis.declared_comparisons():
        missing = [m for m in (comparison.method, comparison.reference) if m not in ran or m not in selected]
        if missing:
            analysis.not_compared.append((comparison, f"no {verdict_stage} runs of {', '.join(missing)} yet"))
        else:
            family.append(comparison)
    if family:
        try:
            analysis.sensitivity = floor_sensitivity(
                rows, family, spec.summary.floors, rule, stage=verdict_stage, n_boot=n_boot
            )
            primary = rule.fraction
            analysis.verdicts = (
                analysis.sensitivity.verdicts[primary]
                if primary in analysis.sensitivity.verdicts
                else verdicts(confirmed, family, n_boot=n_boot)
            )
        except StudyError as err:
            analysis.not_compared += [(c, str(err)) for c in family]
    if spec.claim2 is not None:
        analysis.claim2 = _claim2(analysis.stage_points("claim2"), spec)
    return analysis


def _claim2(points: list[Endpoint], spec: StudySpec) -> Claim2Result | None:
    c = spec.claim2
    assert c is not None
    widths: dict[str, dict[tuple[Any, int], float]] = {}
    for method in (c.with_method, c.without):
        try:
            found = lr_widths(points, method, c.target_gap)
            widths[method] = {k: w.decades if w.points else math.nan for k, w in found.items()}
        except StudyError:
            widths[method] = {}
    spread: dict[Any, SpreadTest | str] = {}
    for world in sorted({e.world for e in points}, key=str):
        try:
            spread[world] = end_spread_test(points, c.with_method, c.without, "end_gap", world=world)
        except StudyError as err:
            spread[world] = str(err)
    return Claim2Result(c.with_method, c.without, c.target_gap, widths, spread)


# --------------------------------------------------------------------------- summary.md


def _g(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}g}"


def _runs_label(values: Sequence[tuple[Any, int, float]], worlds: int) -> str:
    """Every run's value: `s0 1.2e-05, s1 0.003` (with `world/` before the seed when there are several)."""
    return ", ".join((f"{w}/" if worlds > 1 else "") + f"s{s} {_g(v, 2)}" for w, s, v in values)


def cell_rows(points: Sequence[Endpoint], stage: str) -> list[dict[str, Any]]:
    """Per (method, lr) of one stage: the numbers of one table row (medians, geometric mean, every run)."""
    mine = of_stage(points, stage)
    if not mine:
        return []
    fields = TABLE_FIELDS
    by_field = {f: {(c.method, c.lr): c for c in cell_summaries(mine, f)} for f in fields}
    out = []
    for key, quality in by_field["best_quality"].items():
        worlds = len({w for w, _, _ in quality.values})
        out.append(
            {
                "method": key[0],
                "lr": key[1],
                "runs": quality.n,
                "worlds": worlds,
                "seeds_per_world": min(
                    sum(1 for w2, _, _ in quality.values if w2 == w) for w in {w for w, _, _ in quality.values}
                ),
                **{f"{f}_median": by_field[f][key].median for f in fields},
                "best_quality_geomean": quality.geometric_mean,
                "end_quality_geomean": by_field["end_quality"][key].geometric_mean,
                "best_quality_runs": _runs_label(quality.values, worlds),
                "best_gap_runs": _runs_label(by_field["best_gap"][key].values, worlds),
            }
        )
    return out


def summary_markdown(
    analysis: Analysis,
    missing: Sequence[str] = (),
    reference_utility: float | Mapping[Any, float] | None = None,
    retrain: Mapping[Any, Retrain] | None = None,
) -> str:
    """`reference_utility`: the retain model's utility, or per world (`reference_utilities_of`)."""
    spec, rule = analysis.spec, analysis.rule
    lines = ["# Study summary", ""]
    if analysis.problem:
        return "\n".join([*lines, f"No end points: {analysis.problem}.", *_missing(missing)]) + "\n"
    select_on = LABELS.get(spec.summary.select_on, spec.summary.select_on)
    distance, quality = (
        DISTANCE_WORDS
        if rule.distance_metric == MUSE_DISTANCE
        else (
            "KS distance D",
            "Forget quality is TOFU's KS p-value: per cell its median and geometric mean, never an arithmetic mean.",
        )
    )
    lines += [
        f"Per run, the best point is the evaluation with the smallest {distance} among those whose "
        f"`{rule.utility_metric}` is at least {rule.fraction:g} x the target's (the utility floor); step 0 (the "
        "target) always qualifies. G = (D_target - D) / D_target is the share of the target's distance to the "
        f"retain model that unlearning closed (1: indistinguishable from the retain model). {quality}",
        "",
        f"Each method's lr: the best median {select_on} over the `{analysis.selection_stage}` runs. "
        + (
            "Verdicts use the `confirmation` runs only (fresh seeds / worlds, each method at its selected lr)."
            if spec.staged
            else "This study has no separate confirmation stage: its verdicts use the same runs that picked the lr."
        ),
        "",
    ]
    lines += _targets(analysis.points, reference_utility, retrain)
    selected = analysis.selected
    for stage, title in (
        (analysis.selection_stage, "Selection: every lr" if spec.staged else "Every lr"),
        ("confirmation", "Confirmation: each method at its selected lr"),
    ):
        if stage == "confirmation" and not spec.staged:
            continue
        lines += ["", f"## {title} (`{stage}` runs)", ""]
        cells = cell_rows(analysis.points, stage)
        if not cells:
            lines.append("No finished runs yet.")
            continue
        lines += [
            "| method | lr | runs | G median | D median | forget quality median | geometric mean | every run's "
            "forget quality | utility median | area median | end G median | end forget quality median | paired "
            "truth-ratio distance median |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for method in _ordered(spec, {c["method"] for c in cells}):
            for c in (c for c in cells if c["method"] == method):
                mark = " ✓" if selected.get(method) == c["lr"] and stage == analysis.selection_stage else ""
                name = method + (" (exploratory)" if method in spec.exploratory else "")
                lines.append(
                    f"| {name} | {c['lr']:g}{mark} | {c['runs']} | {_g(c['best_gap_median'])} | "
                    f"{_g(c['best_distance_median'])} | {_g(c['best_quality_median'])} | "
                    f"{_g(c['best_quality_geomean'])} | {c['best_quality_runs']} | {_g(c['best_utility_median'])} | "
                    f"{_g(c['area_median'])} | {_g(c['end_gap_median'])} | {_g(c['end_quality_median'])} | "
                    f"{_g(c['best_tr_distance_median'])} |"
                )
        if stage == analysis.selection_stage:
            lines += ["", f"✓: the selected lr (best median {select_on})."]
    lines += _verdict_lines(analysis)
    lines += _sensitivity_lines(analysis)
    lines += _claim2_lines(analysis)
    if spec.exploratory:
        lines += ["", "Exploratory methods (no verdict uses them): " + ", ".join(spec.exploratory) + "."]
    return "\n".join([*lines, *_missing(missing)]) + "\n"


def _ordered(spec: StudySpec, names: set[str]) -> list[str]:
    order = [m.name for m in spec.methods]
    return [n for n in order if n in names] + sorted(names - set(order))


def _targets(
    points: Sequence[Endpoint],
    reference_utility: float | Mapping[Any, float] | None,
    retrain: Mapping[Any, Retrain] | None = None,
) -> list[str]:
    targets = {}
    for e in points:
        targets.setdefault(e.world, (e.target_distance, e.target_utility, e.floor))
    lines = []
    for world, (d, u, floor) in sorted(targets.items(), key=lambda kv: str(kv[0])):
        line = f"Target (world `{world}`): D = {_g(d, 4)}, utility = {_g(u, 4)}, floor = {_g(floor, 4)}."
        floor_of_d = (retrain or {}).get(world)
        if floor_of_d is not None and d:
            line += (
                f" A second retain model (a retrain): D = {_g(floor_of_d.distance, 4)}, forget quality = "
                f"{_g(floor_of_d.quality, 4)}; G above {_g(1 - floor_of_d.distance / d, 3)} is within retraining noise."
            )
        lines.append(line)
    per_world = dict(reference_utility) if isinstance(reference_utility, Mapping) else {None: reference_utility}
    per_world = {world: utility for world, utility in per_world.items() if utility is not None}
    if len(set(per_world.values())) > 1:  # each world has its own retain model, and they differ
        for world, utility in sorted(per_world.items(), key=lambda kv: str(kv[0])):
            lines.append(f"Retain model (gold standard, world `{world}`): utility = {_g(utility, 4)}.")
    elif per_world:
        lines.append(f"Retain model (gold standard): utility = {_g(next(iter(per_world.values())), 4)}.")
    return lines


def _verdict_lines(analysis: Analysis) -> list[str]:
    if not analysis.spec.comparisons:
        return []
    n = len(analysis.verdicts)
    lines = ["", f"## Verdicts (`{analysis.verdict_stage}` runs, Holm over {n} comparison{'s' * (n != 1)})", ""]
    for v in analysis.verdicts:
        extra = [] if analysis.spec.staged else [SAME_RUNS_NOTE]
        lr = f" (lrs {v.comparison.method_lr:g} vs {v.comparison.reference_lr:g})"
        lines.append(f"- {v.sentence()}{lr}" + "".join(f" ({note})" for note in extra))
    for comparison, why in analysis.not_compared:
        lines.append(f"- {comparison.label}: not tested ({why})")
    lines += [
        "",
        "Estimate: mean paired difference (method - reference, paired by world and seed); CI: hierarchical "
        "bootstrap (worlds, then seeds) at the Holm-adjusted level; MDE: the smallest true difference the design "
        "detects with 80% power. A verdict needs at least 2 worlds x 4 seeds; a thinner design is `inconclusive` "
        "whatever its interval, and says so.",
    ]
    return lines


def _sensitivity_lines(analysis: Analysis) -> list[str]:
    s = analysis.sensitivity
    if s is None:
        return []
    lines = ["", "## Floor sensitivity", "", "| comparison | " + " | ".join(f"floor {f:g}" for f in s.fractions) + " |"]
    lines.append("|---|" + "---|" * len(s.fractions))
    for (comparison, row), stable in zip(s.side_by_side(), s.stable(), strict=True):
        cells = [f"{v.verdict} ({v.estimate:+.3g} [{v.ci_low:.3g}, {v.ci_high:.3g}])" for v in row]
        lines.append(
            f"| {comparison.label}{'' if stable else ' (changes with the floor)'} | " + " | ".join(cells) + " |"
        )
    return lines


def _claim2_lines(analysis: Analysis) -> list[str]:
    c = analysis.claim2
    if c is None:
        return []
    lines = [
        "",
        f"## Claim 2: lr robustness (`claim2` runs: {c.with_method} vs {c.without})",
        "",
        f"Width: per (world, seed), the longest run of neighbouring initial lrs whose end point keeps the floor "
        f"and reaches G >= {c.target_gap:g}, in decades (0: one lr; n/a: none).",
        "",
        "| method | median width (decades) | every run |",
        "|---|---|---|",
    ]
    for method in (c.with_method, c.without):
        widths = c.widths.get(method, {})
        if not widths:
            lines.append(f"| {method} | no runs | |")
            continue
        finite = [w if math.isfinite(w) else 0.0 for w in widths.values()]
        runs = ", ".join(f"{w}/s{s} {_g(v, 2)}" for (w, s), v in sorted(widths.items(), key=lambda kv: str(kv[0])))
        lines.append(f"| {method} | {_g(statistics.median(finite))} | {runs} |")
    lines += ["", "End-point spread of G over every lr and seed (Brown-Forsythe, per world):", ""]
    for world, test in c.spread.items():
        if isinstance(test, str):
            lines.append(f"- world `{world}`: not tested ({test})")
        else:
            lines.append(
                f"- world `{world}`: median absolute deviation {test.spread_a:.3g} ({c.with_method}, "
                f"n = {test.n_a}) vs "
                f"{test.spread_b:.3g} ({c.without}, n = {test.n_b}); Brown-Forsythe F = {test.statistic:.3g}, "
                f"p = {test.pvalue:.2g}" + _diverged_note(test, c.with_method, c.without)
            )
    if not c.spread:
        lines.append("- no `claim2` runs yet")
    return lines


def _diverged_note(test: SpreadTest, with_method: str, without: str) -> str:
    if not (test.diverged_a or test.diverged_b):
        return ""
    return f" (left out, diverged: {test.diverged_a} {with_method}, {test.diverged_b} {without})"


def _missing(missing: Sequence[str]) -> list[str]:
    return ["", f"Runs not finished ({len(missing)}): " + ", ".join(missing)] if missing else []


@dataclass(frozen=True)
class Retrain:
    """A world's second retain model, scored against the first: the noise floor of D, the ceiling of quality."""

    distance: float
    quality: float | None


def retrain_of(rows: Sequence[Row]) -> dict[Any, Retrain]:
    """Per world, its second retain model's figures, if the rows carry them (step-0 rows of a study report)."""
    out = {}
    for row in rows:
        distance = _number(row.get("retrain_ks_d"))
        if distance is not None:
            out.setdefault(row.get("world"), Retrain(distance, _number(row.get("retrain_forget_quality"))))
    return out


def reference_utilities_of(rows: Sequence[Row]) -> dict[Any, float]:
    """Per world, its retain model's utility, if the rows carry it (step-0 rows of a study report)."""
    out = {}
    for row in rows:
        value = _number(row.get("retain_model_utility"))
        if value is not None:
            out.setdefault(row.get("world"), value)
    return out
