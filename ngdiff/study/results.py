"""From finished run folders to `results.jsonl` (one row per run x evaluation point) and `summary.md`.

The summary rule (stated in summary.md): per run, the best point is the one with the highest forget
quality among the points whose model utility is at least `utility_fraction` x the target's; step 0
(the target itself, before any unlearning) always qualifies. Per method and lr, mean +- std over seeds;
a method is reported at the lr whose mean is best. The end point (the last evaluation, the whole
budget spent) is reported per lr too, which is what lr robustness is about.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ngdiff.metrics_log import read_jsonl
from ngdiff.study.spec import SummaryRule

Row = dict[str, Any]
TRAINING_KEYS = {"loss_forget": "loss_forget", "loss_retain": "loss_retain", "lr": "lr_now"}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def run_rows(
    metrics: Sequence[Row], method: str, lr: float, seed: int, steps_per_epoch: float, start: Row | None = None
) -> list[Row]:
    """Rows of one run from its metrics.jsonl records: one per evaluation, joined with the training
    record of the same step (losses, current lr) and the AutoLR acceptance rate so far. `start` is the
    target's evaluation, written as step 0."""
    training: dict[int, Row] = {}
    accepted = attempted = 0
    acceptance: dict[int, float | None] = {}
    evaluations: list[Row] = []
    for record in metrics:
        step = int(record["step"])
        if "loss_forget" in record:
            training[step] = record
            if "autolr/accepted" in record:
                attempted += 1
                accepted += int(float(record["autolr/accepted"]) > 0)
            acceptance[step] = accepted / attempted if attempted else None
        elif "eval_seconds" in record:
            evaluations.append(record)
    rows = []
    base = {"method": method, "lr": lr, "seed": seed}
    if start is not None:
        rows.append({**base, "step": 0, "epoch": 0.0, **_metrics(start), "lr_now": lr})
    for record in evaluations:
        step = int(record["step"])
        row = {**base, "step": step, "epoch": step / steps_per_epoch if steps_per_epoch else None}
        row.update(_metrics(record))
        for key, name in TRAINING_KEYS.items():
            row[name] = _number(training.get(step, {}).get(key))
        row["autolr_accept_rate"] = acceptance.get(step)
        rows.append(row)
    return rows


def _metrics(record: Row) -> Row:
    return {k: _number(v) for k, v in record.items() if k not in ("step",) and not isinstance(v, (list, dict))}


def collect(study_dir: Path, start: Row | None = None) -> list[Row]:
    """Rows of every finished run under `study_dir/runs` (folders with done.json), in a stable order."""
    rows: list[Row] = []
    for done in sorted((study_dir / "runs").glob("*/done.json")):
        info = json.loads(done.read_text())
        metrics = read_jsonl(done.parent / "metrics.jsonl")
        steps = max(int(info["steps"]), 1)
        per_epoch = steps / info["budget_epochs"] if info.get("budget_epochs") else 0.0
        rows += run_rows(metrics, info["method"], float(info["lr"]), int(info["seed"]), per_epoch, start)
    return rows


def write_results(rows: Iterable[Row], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- the summary rule


def best_point(points: Sequence[Row], rule: SummaryRule, target_utility: float | None) -> Row:
    """The point of one run that the rule picks (see the module docstring); ties go to the earlier step."""
    if not points:
        raise ValueError("a run without evaluation points has no best point")
    floor = rule.utility_fraction * target_utility if target_utility is not None else -math.inf

    def qualifies(p: Row) -> bool:
        utility = _number(p.get(rule.utility_metric))
        return p["step"] == 0 or (utility is not None and utility >= floor)

    def score(p: Row) -> float:
        value = _number(p.get(rule.forget_metric))
        if value is None:
            return -math.inf
        return value if rule.forget_mode == "max" else -value

    candidates = [p for p in sorted(points, key=lambda p: p["step"]) if qualifies(p)]
    if not candidates:
        candidates = sorted(points, key=lambda p: p["step"])[:1]
    best = candidates[0]
    for p in candidates[1:]:
        if score(p) > score(best):
            best = p
    return best


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float  # sample std over seeds (0 with one seed)
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        values = [v for v in values if v is not None]
        if not values:
            return cls(math.nan, math.nan, 0)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), std, len(values))

    def text(self, digits: int = 3) -> str:
        if self.n == 0:
            return "n/a"
        fmt = f"{{:.{digits}g}}"
        return fmt.format(self.mean) + (f" ± {fmt.format(self.std)}" if self.n > 1 else "")


def by_run(rows: Iterable[Row]) -> dict[tuple[str, float, int], list[Row]]:
    runs: dict[tuple[str, float, int], list[Row]] = defaultdict(list)
    for row in rows:
        runs[(row["method"], float(row["lr"]), int(row["seed"]))].append(row)
    return {k: sorted(v, key=lambda r: r["step"]) for k, v in runs.items()}


@dataclass(frozen=True)
class LrCell:
    """One method at one lr, over its seeds: the best point under the rule and the end point."""

    method: str
    lr: float
    seeds: int
    best_forget: Stat
    best_utility: Stat
    best_step: Stat
    end_forget: Stat
    end_utility: Stat


def lr_cells(rows: Iterable[Row], rule: SummaryRule, target_utility: float | None) -> list[LrCell]:
    grouped: dict[tuple[str, float], list[list[Row]]] = defaultdict(list)
    for (method, lr, _seed), points in by_run(rows).items():
        grouped[(method, lr)].append(points)
    cells = []
    for (method, lr), runs in grouped.items():
        best = [best_point(points, rule, target_utility) for points in runs]
        ends = [points[-1] for points in runs]
        cells.append(
            LrCell(
                method,
                lr,
                len(runs),
                Stat.of([_number(b.get(rule.forget_metric)) for b in best]),
                Stat.of([_number(b.get(rule.utility_metric)) for b in best]),
                Stat.of([float(b["step"]) for b in best]),
                Stat.of([_number(e.get(rule.forget_metric)) for e in ends]),
                Stat.of([_number(e.get(rule.utility_metric)) for e in ends]),
            )
        )
    return sorted(cells, key=lambda c: (c.method, c.lr))


def best_cells(cells: Sequence[LrCell], rule: SummaryRule) -> dict[str, LrCell]:
    """Per method, the lr whose mean best-point forget metric is best; ties (e.g. every lr's best point is
    the target itself) go to the higher best-point utility, then to the better end-point forget metric."""
    sign = 1.0 if rule.forget_mode == "max" else -1.0

    def key(cell: LrCell) -> tuple[float, float, float]:
        return (
            sign * _nan_low(cell.best_forget.mean),
            _nan_low(cell.best_utility.mean),
            sign * _nan_low(cell.end_forget.mean),
        )

    out: dict[str, LrCell] = {}
    for cell in cells:
        if cell.method not in out or key(cell) > key(out[cell.method]):
            out[cell.method] = cell
    return out


def _nan_low(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def lr_spread(cells: Sequence[LrCell], method: str, rule: SummaryRule) -> dict[str, float]:
    """End-point spread over the lr grid: max - min of log10(forget metric) and of utility means."""
    mine = [c for c in cells if c.method == method and c.end_forget.n]
    if not mine:
        return {}
    forget = [c.end_forget.mean for c in mine]
    utility = [c.end_utility.mean for c in mine]
    logs = [math.log10(v) for v in forget if v > 0]
    out = {"utility_spread": max(utility) - min(utility), "lrs": float(len(mine))}
    if rule.forget_metric == "forget_quality" and len(logs) == len(forget):
        out["log10_forget_spread"] = max(logs) - min(logs)
    else:
        out["forget_spread"] = max(forget) - min(forget)
    return out


def summary_markdown(
    rows: Sequence[Row],
    rule: SummaryRule,
    target: Row,
    reference: Row,
    methods: Sequence[str],
    missing: Sequence[str] = (),
) -> str:
    """The study's summary: the rule, per method the best point, then every lr's best and end points."""
    target_utility = _number(target.get(rule.utility_metric))
    cells = lr_cells(rows, rule, target_utility)
    best = best_cells(cells, rule)
    f, u = rule.forget_metric, rule.utility_metric
    lines = ["# Study summary", ""]
    floor = (
        f"{rule.utility_fraction:g} x the target's ({rule.utility_fraction * target_utility:.4g})"
        if (target_utility is not None)
        else "(target utility unknown: no floor)"
    )
    lines += [
        f"Rule: per run, the evaluation point with the {'highest' if rule.forget_mode == 'max' else 'lowest'} "
        f"`{f}` among those with `{u}` >= {floor}; step 0 (the target, no unlearning) always qualifies. "
        "Per method and lr: mean ± std over seeds; each method is shown at its best lr by that mean.",
        "",
        f"Target: `{f}` = {_fmt(target.get(f))}, `{u}` = {_fmt(target.get(u))}. "
        f"Retain model (gold standard): `{u}` = {_fmt(reference.get(u))}.",
        "",
        f"| method | best lr | seeds | {f} (best point) | {u} (best point) | step | {f} (end) | {u} (end) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        cell = best.get(method)
        if cell is None:
            lines.append(f"| {method} | not run | | | | | | |")
            continue
        lines.append(
            f"| {method} | {cell.lr:g} | {cell.seeds} | {cell.best_forget.text()} | {cell.best_utility.text()} | "
            f"{cell.best_step.text(3)} | {cell.end_forget.text()} | {cell.end_utility.text()} |"
        )
    lines += ["", "## Every lr", "", f"| method | lr | seeds | {f} (best) | {u} (best) | {f} (end) | {u} (end) |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for c in cells:
        lines.append(
            f"| {c.method} | {c.lr:g} | {c.seeds} | {c.best_forget.text()} | {c.best_utility.text()} | "
            f"{c.end_forget.text()} | {c.end_utility.text()} |"
        )
    lines += ["", "## End-point spread over the lr grid (lr robustness)", ""]
    lines += ["| method | lrs | spread of log10 forget quality (or of the forget metric) | spread of utility |"]
    lines += ["|---|---|---|---|"]
    for method in methods:
        spread = lr_spread(cells, method, rule)
        if spread:
            forget_spread = spread.get("log10_forget_spread", spread.get("forget_spread"))
            lines.append(f"| {method} | {int(spread['lrs'])} | {forget_spread:.3g} | {spread['utility_spread']:.3g} |")
    if missing:
        lines += ["", f"Runs not finished ({len(missing)}): " + ", ".join(missing)]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    number = _number(value)
    return "n/a" if number is None else f"{number:.4g}"
