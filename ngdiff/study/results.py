"""From finished run folders to `results.jsonl`: one row per run x evaluation point, each with its
`world`, `stage`, `method`, `lr`, `seed`, `step`, `ks_d` (the KS distance D), `forget_quality`,
`model_utility` and every other evaluation and training number of that step. The rows are the study's
whole result: `ngdiff study report` rebuilds the summary and the plots from them alone
(ngdiff.study.summary, ngdiff.study.plots).
"""

from __future__ import annotations

import gzip
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ngdiff.metrics_log import read_jsonl
from ngdiff.study.spec import BASE_WORLD

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
    metrics: Sequence[Row],
    method: str,
    lr: float,
    seed: int,
    steps_per_epoch: float,
    start: Row | None = None,
    stage: str = "grid",
    world: str = BASE_WORLD,
    diverged_at: int | None = None,
) -> list[Row]:
    """Rows of one run from its metrics.jsonl records: one per evaluation, joined with the training
    record of the same step (losses, current lr) and the AutoLR acceptance rate so far. `start` is the
    target's evaluation, written as step 0. A run stopped at a non-finite number ends with a row at that
    step marked `diverged` and without metrics: its end point keeps no utility floor and has no G."""
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
    base = {"world": world, "stage": stage, "method": method, "lr": lr, "seed": seed}
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
    if diverged_at is not None:
        epoch = diverged_at / steps_per_epoch if steps_per_epoch else None
        rows.append({**base, "step": diverged_at, "epoch": epoch, "diverged": True})
    return rows


DISTANCE_KEYS = ("ks_d", "forget_ks_statistic")  # the row's name for D, and the evaluation's


def _metrics(record: Row) -> Row:
    out = {k: _number(v) for k, v in record.items() if k not in ("step",) and not isinstance(v, (list, dict))}
    if "forget_ks_statistic" in out:
        out["ks_d"] = out["forget_ks_statistic"]
    return out


def with_distance(row: Row) -> Row:
    """A row read back from results.jsonl: both names of D filled from whichever it has."""
    for key, other in (DISTANCE_KEYS, DISTANCE_KEYS[::-1]):
        if row.get(key) is None and row.get(other) is not None:
            row = {**row, key: row[other]}
    return row


def collect(study_dir: Path, starts: Mapping[str, Row] | Row | None = None) -> list[Row]:
    """Rows of every finished run under `study_dir/runs` (folders with done.json), in a stable order.
    `starts[world]` is that world's target evaluation (each run's step 0); one mapping of metrics is the
    start of every run (a one-world study)."""
    rows: list[Row] = []
    for done in sorted((study_dir / "runs").glob("*/done.json")):
        info = json.loads(done.read_text())
        metrics = read_jsonl(done.parent / "metrics.jsonl")
        steps = max(int(info["steps"]), 1)
        per_epoch = steps / info["budget_epochs"] if info.get("budget_epochs") else 0.0
        world = info.get("world", BASE_WORLD)
        start = _start(starts, world)
        diverged_at = info["diverged"]["step"] if info.get("diverged") else None
        rows += run_rows(
            metrics, info["method"], float(info["lr"]), int(info["seed"]), per_epoch, start,
            info.get("stage", "grid"), world, diverged_at,
        )  # fmt: skip
    return rows


def _start(starts: Mapping[str, Row] | Row | None, world: str) -> Row | None:
    if not starts:
        return None
    if all(isinstance(v, Mapping) for v in starts.values()):
        return starts.get(world) or None
    return starts  # type: ignore[return-value]


def write_results(rows: Iterable[Row], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_results(path: Path) -> list[Row]:
    """The rows of a results.jsonl (as written by `write_results`, or committed with a study); a name ending
    in .gz is read through gzip (a large grid's rows are committed compressed)."""
    from ngdiff.study.spec import StudyError

    if not path.is_file():
        raise StudyError(f"{path}: no such results file")
    try:
        text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise StudyError(f"{path}: not a readable results file ({err})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise StudyError(f"{path}:{number}: not a JSON row ({err.msg})") from None
        missing = [k for k in ("method", "lr", "seed", "step") if k not in row]
        if missing:
            raise StudyError(f"{path}:{number}: the row has no {', '.join(missing)}")
        rows.append(with_distance({"world": BASE_WORLD, "stage": "grid", **row}))
    return rows


def by_run(rows: Iterable[Row]) -> dict[tuple[str, str, str, float, int], list[Row]]:
    """(stage, world, method, lr, seed) -> that run's rows by step."""
    runs: dict[tuple[str, str, str, float, int], list[Row]] = defaultdict(list)
    for row in rows:
        key = (
            row.get("stage", "grid"),
            row.get("world", BASE_WORLD),
            row["method"],
            float(row["lr"]),
            int(row["seed"]),
        )
        runs[key].append(row)
    return {k: sorted(v, key=lambda r: r["step"]) for k, v in runs.items()}
