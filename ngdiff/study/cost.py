"""What a study cost, phase by phase: each world's build and each stage's runs.

A study's budget is a wall-clock promise (the default grid on the idle 2-core machine), so the report
says where the time went: the worlds (built one after another, before any run), then per stage the number
of runs, their summed run time (the work) and the wall span from the first run's start to the last one's
end (runs overlap when `--workers` > 1). A run's start is its end minus its `seconds`; its end is the
`finished_at` its `done.json` records (or, for runs finished before that field existed, the file's time).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ngdiff.study.spec import StudySpec

COST_FILE = "cost.json"


@dataclass(frozen=True)
class PhaseCost:
    phase: str
    runs: int  # 0 for a world build
    work_seconds: float  # summed over the runs (a world: its build time)
    median_run_seconds: float | None
    wall_seconds: float  # first start to last end


@dataclass(frozen=True)
class RunTime:
    phase: str
    start: float
    end: float


def run_phase(record: Mapping[str, Any], spec: StudySpec) -> str:
    """A run's phase: its stage, with the exploratory methods' selection runs apart (no verdict uses them)."""
    stage = str(record.get("stage", "grid"))
    if stage == "selection" and record.get("method") in spec.exploratory:
        return "selection (exploratory)"
    return stage


def run_times(runs_dir: Path, spec: StudySpec) -> list[RunTime]:
    """Start and end of every finished run under `runs_dir` (its `done.json`)."""
    out = []
    for done in sorted(runs_dir.glob("*/done.json")):
        record = json.loads(done.read_text())
        end = float(record.get("finished_at", done.stat().st_mtime))
        out.append(RunTime(run_phase(record, spec), end - float(record["seconds"]), end))
    return out


def world_phases(records: Mapping[str, Mapping[str, Any]]) -> list[PhaseCost]:
    """One phase per world built (and per pretraining base it built rather than found cached)."""
    out = []
    for label, record in sorted(records.items()):
        info = record.get("info") or {}
        base = info.get("pretrain") or {}
        base_seconds = float(base.get("build_seconds", 0.0)) if base.get("built_now") else 0.0
        if base_seconds:
            out.append(PhaseCost(f"world {label}: pretraining base", 0, base_seconds, None, base_seconds))
        seconds = float(info.get("build_seconds", 0.0)) - base_seconds
        if seconds > 0:
            out.append(PhaseCost(f"world {label}: fine-tuning and scoring", 0, seconds, None, seconds))
    return out


def run_phases(times: Sequence[RunTime], order: Sequence[str]) -> list[PhaseCost]:
    phases = sorted({t.phase for t in times}, key=lambda p: (order.index(p) if p in order else len(order), p))
    out = []
    for phase in phases:
        mine = [t for t in times if t.phase == phase]
        durations = [t.end - t.start for t in mine]
        wall = max(t.end for t in mine) - min(t.start for t in mine)
        out.append(PhaseCost(phase, len(mine), sum(durations), statistics.median(durations), wall))
    return out


STAGE_ORDER = ("grid", "selection", "selection (exploratory)", "claim2", "confirmation")


def study_cost(study_dir: Path, spec: StudySpec, records: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The phases, and the study's wall time: the worlds' builds plus the runs' span."""
    times = run_times(study_dir / "runs", spec)
    worlds = world_phases(records)
    runs = run_phases(times, STAGE_ORDER)
    span = max(t.end for t in times) - min(t.start for t in times) if times else 0.0
    world_seconds = sum(p.wall_seconds for p in worlds)
    return {
        "phases": [asdict(p) for p in [*worlds, *runs]],
        "world_seconds": world_seconds,
        "runs_wall_seconds": span,
        "wall_seconds": world_seconds + span,
    }


def write_cost(study_dir: Path, spec: StudySpec, records: Mapping[str, Mapping[str, Any]]) -> tuple[Path, str]:
    """`cost.json` in the study folder, and the summary's section on it."""
    cost = study_cost(study_dir, spec, records)
    path = study_dir / COST_FILE
    path.write_text(json.dumps(cost, indent=1))
    return path, cost_markdown(cost)


def cost_markdown(cost: Mapping[str, Any]) -> str:
    def minutes(seconds: float | None) -> str:
        return "" if seconds is None else f"{seconds / 60:.1f}"

    lines = [
        "",
        "## Cost",
        "",
        "Worlds are built one after another before any run; a stage's wall span runs from its first run's",
        "start to its last run's end (runs overlap with several workers).",
        "",
        "| phase | runs | work (min) | median run (s) | wall (min) |",
        "|---|---|---|---|---|",
    ]
    for p in cost["phases"]:
        median = "" if p["median_run_seconds"] is None else f"{p['median_run_seconds']:.0f}"
        runs = str(p["runs"]) if p["runs"] else ""
        lines.append(
            f"| {p['phase']} | {runs} | {minutes(p['work_seconds'])} | {median} | {minutes(p['wall_seconds'])} |"
        )
    lines += [
        "",
        f"In all: {minutes(cost['wall_seconds'])} min (worlds {minutes(cost['world_seconds'])}, "
        f"runs {minutes(cost['runs_wall_seconds'])}).",
        "",
    ]
    return "\n".join(lines)
