"""Sequences compared under the study's statistics: end points after the last request, paired by seed.

An arm is one way of serving the same requests (a mode x a method, e.g. `ngdiff-replay`); each (arm, seed)
is one `ngdiff sequence` whose `sequence.json` this module reads. Per run, after the last request:

- `forget_mean`: the mean forget score over every requested set (lower = more forgotten);
- `forget_worst`: the largest of those (the set that was forgotten least);
- `relapse`: set 1's score after the last request minus after request 1 (> 0: later requests undid part
  of request 1; lower is better);
- `retain`: the retain score (higher = more kept).

The scores are the cells' (`evaluation.benchmark` in sequence.json): ROUGE-L recall of the greedy answers
on each forget set and on the retain set for question/answer cells, VerbMem on each forget set and KnowMem
on the retain QA for MUSE cells.

A comparison is `arm` against `reference` on one end point, its direction the end point's better side, so
`supported` means "arm is better than reference on it". The pairing (by seed: both arms ran the same
world, sets and seed), the bootstrap CI, Holm over the family, the verdict and the MDE are
ngdiff.study.inference's, unchanged; the runs share one world, so the bootstrap is over seeds only and the
design minimum is one world x `MIN_SEEDS` seeds.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ngdiff.errors import UserError
from ngdiff.sequence.muse_cells import FORGET_METRIC
from ngdiff.sequence.results import SEQUENCE_FILE
from ngdiff.study.inference import MIN_SEEDS, Comparison, Verdict, paired_differences, verdicts


@dataclass(frozen=True)
class Scores:
    """What a sequence's cells score: the matrix metric of the forget sets and the utility key, and their names."""

    forget: str
    retain: str
    forget_label: str
    retain_label: str


SCORES = {
    "tofu": Scores("forget_rougeL_recall", "retain_rougeL_recall", "ROUGE-L", "ROUGE-L"),
    "muse": Scores(FORGET_METRIC, "retain_knowmem", "VerbMem", "KnowMem"),
}
RUN_NAME = re.compile(r"^(?P<arm>.+)_seed(?P<seed>\d+)$")  # <arm>_seed<k>/sequence.json or <arm>_seed<k>.json


@dataclass(frozen=True)
class EndpointDef:
    template: str  # its name, {forget} / {retain} the scores' names
    direction: str  # the better side of arm - reference: "less" or "greater"
    compute: Callable[[list[list[float]], list[float], float], float]  # (forget matrix, its last row, retain)

    def label(self, benchmark: str = "tofu") -> str:
        scores = SCORES[benchmark]
        return self.template.format(forget=scores.forget_label, retain=scores.retain_label)


ENDPOINTS: dict[str, EndpointDef] = {
    "forget_mean": EndpointDef("mean forget {forget}", "less", lambda m, last, r: statistics.fmean(last)),
    "forget_worst": EndpointDef("worst set's forget {forget}", "less", lambda m, last, r: max(last)),
    "relapse": EndpointDef("set 1 relapse ({forget})", "less", lambda m, last, r: last[0] - m[0][0]),
    "retain": EndpointDef("retain {retain}", "greater", lambda m, last, r: r),
}


def benchmark_of(record: Mapping[str, Any]) -> str:
    """The cells' kind of a sequence.json (files written before MUSE cells existed are question/answer ones)."""
    return str((record.get("evaluation") or {}).get("benchmark", "tofu"))


def scores_of(record: Mapping[str, Any]) -> Scores:
    return SCORES[benchmark_of(record)]


@dataclass(frozen=True)
class SequenceEndpoint:
    """One sequence's end points; `method` is the arm and `world` None (one world), so that
    ngdiff.study.inference pairs it by seed. `lr` is a constant: an arm is one cell, not an lr grid."""

    method: str
    seed: int
    values: Mapping[str, float]
    source: Path
    lr: float = 0.0
    world: Any = None
    benchmark: str = "tofu"  # the cells' kind: which scores the values are

    @property
    def pair_key(self) -> tuple[Any, int]:
        return (self.world, self.seed)

    def value(self, field: str) -> float:
        if field not in self.values:
            raise UserError(f"unknown sequence end point '{field}': choose one of {', '.join(ENDPOINTS)}")
        return float(self.values[field])


@dataclass(frozen=True)
class SequenceComparison(Comparison):
    """A Comparison labelled with the sequence end point's name (the study's labels name its own)."""

    benchmark: str = "tofu"

    @property
    def label(self) -> str:
        return f"{self.method} vs {self.reference} on {ENDPOINTS[self.field].label(self.benchmark)}"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_sequence(path: Path) -> dict[str, Any]:
    """sequence.json, checked for what the end points need: every request evaluated, the last row and
    set 1's request-1 cell of the forget matrix, the retain score after the last request."""
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (did that sequence run to its end?)") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable sequence.json ({err})") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}: not a sequence.json (a JSON object with requests, matrix, utility)")
    requests = record.get("requests")
    if not isinstance(requests, list) or len(requests) < 2:
        raise UserError(f"{path}: 'requests' must list two or more requests")
    t = len(requests)
    unfinished = [
        r.get("index", i + 1) for i, r in enumerate(requests) if not (isinstance(r, dict) and r.get("evaluated"))
    ]
    if unfinished:
        raise UserError(f"{path}: request(s) {unfinished} not evaluated yet; finish the sequence (train.resume=auto)")
    if benchmark_of(record) not in SCORES:
        raise UserError(f"{path}: evaluation.benchmark {benchmark_of(record)!r} is none of {', '.join(SCORES)}")
    forget, retain = scores_of(record).forget, scores_of(record).retain
    matrix = (record.get("matrix") or {}).get(forget)
    if not (
        isinstance(matrix, list) and len(matrix) == t and all(isinstance(row, list) and len(row) == t for row in matrix)
    ):
        raise UserError(f"{path}: matrix.{forget} must be a {t} x {t} list (one row per request)")
    if not (all(_number(v) for v in matrix[-1]) and _number(matrix[0][0])):
        raise UserError(f"{path}: matrix.{forget} has a missing or non-finite cell in the last row or at [0][0]")
    utility = record.get("utility")
    last = utility[-1] if isinstance(utility, list) and len(utility) == t else None
    if not (isinstance(last, dict) and _number(last.get(retain))):
        raise UserError(f"{path}: utility[{t - 1}] has no finite {retain} (one retain file is expected)")
    return record


def sequence_endpoint(arm: str, seed: int, path: Path) -> SequenceEndpoint:
    record = read_sequence(path)
    scores = scores_of(record)
    matrix = [[float(v) if _number(v) else math.nan for v in row] for row in record["matrix"][scores.forget]]
    retain = float(record["utility"][-1][scores.retain])
    values = {name: d.compute(matrix, matrix[-1], retain) for name, d in ENDPOINTS.items()}
    return SequenceEndpoint(arm, seed, values, Path(path), benchmark=benchmark_of(record))


def find_runs(folder: Path) -> dict[tuple[str, int], Path]:
    """Every `<arm>_seed<k>/sequence.json` (a benchmark's output) or `<arm>_seed<k>.json` (a copy) in `folder`."""
    runs: dict[tuple[str, int], Path] = {}
    candidates = [*Path(folder).glob(f"*/{SEQUENCE_FILE}"), *Path(folder).glob("*.json")]
    for path in sorted(candidates):
        match = RUN_NAME.match(path.parent.name if path.name == SEQUENCE_FILE else path.stem)
        if not match:
            continue
        key = (match["arm"], int(match["seed"]))
        if key in runs:
            raise UserError(f"{folder}: arm {key[0]} seed {key[1]} twice ({runs[key]} and {path})")
        runs[key] = path
    if not runs:
        raise UserError(f"{folder}: no <arm>_seed<k>/sequence.json or <arm>_seed<k>.json")
    return runs


def load_endpoints(runs: Mapping[tuple[str, int], Path]) -> list[SequenceEndpoint]:
    """Every run's end points; the runs must have served the same requests (the same sets, in order) and
    scored them alike (the same cells' kind)."""
    points, sets = [], {}
    for (arm, seed), path in sorted(runs.items()):
        points.append(sequence_endpoint(arm, seed, path))
        sets[(arm, seed)] = (json.loads(Path(path).read_text()).get("sets"), points[-1].benchmark)
    first = next(iter(sets.items()))
    for key, value in sets.items():
        if value != first[1]:
            raise UserError(
                f"{runs[key]} served the sets {value[0]} scored by {value[1]}, {runs[first[0]]} served {first[1][0]} "
                f"scored by {first[1][1]}: compare sequences of the same requests and cells"
            )
    return points


def family(
    pairs: Sequence[tuple[str, str]], fields: Iterable[str] = ENDPOINTS, benchmark: str = "tofu"
) -> list[SequenceComparison]:
    """One comparison per (arm, reference) pair and end point, directed to the end point's better side
    (`benchmark`: the cells' kind, which names the end points)."""
    fields = list(fields)
    for name in fields:
        if name not in ENDPOINTS:
            raise UserError(f"unknown sequence end point '{name}': choose one of {', '.join(ENDPOINTS)}")
    return [
        SequenceComparison(arm, ref, name, ENDPOINTS[name].direction, benchmark=benchmark)
        for arm, ref in pairs
        for name in fields
    ]


@dataclass(frozen=True)
class Result:
    points: list[SequenceEndpoint]
    verdicts: list[Verdict]
    unpaired: list[tuple[str, Any, int]] = field(default_factory=list)  # (arm, world, seed) left out


def compare(
    points: Sequence[SequenceEndpoint],
    comparisons: Sequence[SequenceComparison],
    min_seeds: int = MIN_SEEDS,
    **options: Any,
) -> Result:
    """The study's verdicts (one Holm family) on one world; runs without a partner are left out and listed."""
    unpaired = sorted({u for c in comparisons for u in paired_differences(points, c).unpaired}, key=str)
    found = verdicts(points, comparisons, min_worlds=1, min_seeds=min_seeds, **options)
    return Result(list(points), found, unpaired)


def _fmt(value: float) -> str:
    return f"{value:+.3f}" if value < 0 else f"{value:.3f}"


def table(points: Sequence[SequenceEndpoint], fields: Iterable[str] = ENDPOINTS) -> str:
    """Markdown: per end point and arm, every seed's value and their mean."""
    seeds = sorted({p.seed for p in points})
    arms = list(dict.fromkeys(p.method for p in points))
    by_key = {(p.method, p.seed): p for p in points}
    lines = [f"| end point | arm | {' | '.join(f'seed {s}' for s in seeds)} | mean |", "|" + "---|" * (len(seeds) + 3)]
    for name in fields:
        for arm in arms:
            values = [by_key[(arm, s)].value(name) if (arm, s) in by_key else None for s in seeds]
            known = [v for v in values if v is not None]
            cells = " | ".join("-" if v is None else _fmt(v) for v in values)
            label = ENDPOINTS[name].label(by_key[(arm, next(s for s in seeds if (arm, s) in by_key))].benchmark)
            lines.append(f"| {label} | {arm} | {cells} | {_fmt(statistics.fmean(known))} |")
    return "\n".join(lines)


def report(result: Result, fields: Iterable[str] = ENDPOINTS) -> str:
    """The table, then one verdict line per comparison (and the runs left out, if any)."""
    text = [table(result.points, fields), "", *(f"- {v.sentence()}" for v in result.verdicts)]
    if result.unpaired:
        text += [
            "",
            "Left out (no partner run of the same seed): " + ", ".join(f"{a} seed {s}" for a, _, s in result.unpaired),
        ]
    return "\n".join(text)
