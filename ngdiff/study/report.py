"""`ngdiff study report DIR` (or `--results FILE --config STUDY.yaml --out DIR`): the study's results,
summary and pictures.

From a study folder: `study.yaml` (the study as given), every world's `world.json` (the target's and the
retain model's evaluations) and every `runs/*/` folder give `results.jsonl`; then, from the rows alone,
`summary.md` (ngdiff.study.summary), `pareto.png`, `pareto_all.png`, `lr.png` and, when any run used AutoLR,
`autolr.png`. From a results file (e.g. a committed one) the same files are rebuilt without the runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ngdiff.metrics_log import read_jsonl
from ngdiff.study.attacks import ATTACKS_FILE, YARDSTICK, attack_markdown, read_attack_rows
from ngdiff.study.cost import COST_FILE, cost_markdown, write_cost
from ngdiff.study.health import unranked_summary, world_health
from ngdiff.study.plots import attacks_plot, autolr_plot, lr_plot, pareto_grid_plot, pareto_plot
from ngdiff.study.results import Row, _number, by_run, read_results, write_results
from ngdiff.study.runner import DONE, current_selection, run_folder, study_rows, world_records
from ngdiff.study.spec import StudyError, StudySpec, load_study
from ngdiff.study.summary import analyse, reference_utilities_of, retrain_of, summary_markdown

RAW_FILE = "study.yaml"  # the study config as given, kept in the study folder
GRID_STAGES = ("grid", "selection", "claim2")  # the stages that run whole lr grids

log = logging.getLogger("ngdiff.study")


@dataclass(frozen=True)
class Report:
    rows: list[dict[str, Any]]
    files: list[Path]
    finished: list[str]
    missing: list[str]


def lr_paths(study_dir: Path) -> dict[tuple[str, float, int], list[tuple[int, float, float | None]]]:
    """Per finished AutoLR run: (step, lr, cumulative acceptance rate) at every step."""
    out = {}
    for done in sorted((study_dir / "runs").glob(f"*/{DONE}")):
        cfg = yaml.safe_load((done.parent / "config.yaml").read_text())
        if not cfg.get("autolr", {}).get("enabled"):
            continue
        info = json.loads(done.read_text())
        accepted = attempted = 0
        points = []
        for record in read_jsonl(done.parent / "metrics.jsonl"):
            if "loss_forget" not in record:
                continue
            if "autolr/accepted" in record:
                attempted += 1
                accepted += int(float(record["autolr/accepted"]) > 0)
            points.append((int(record["step"]), float(record["lr"]), accepted / attempted if attempted else None))
        out[(info["method"], float(info["lr"]), int(info["seed"]))] = points
    return out


def lr_paths_from_rows(rows: Sequence[Row]) -> dict[tuple[str, float, int], list[tuple[int, float, float | None]]]:
    """The same from the result rows (at the evaluation steps only): runs whose rows have an acceptance rate."""
    out = {}
    for (_stage, _world, method, lr, seed), points in by_run(rows).items():
        if not any(p.get("autolr_accept_rate") is not None for p in points):
            continue
        path = [
            (int(p["step"]), float(p["lr_now"]), _number(p.get("autolr_accept_rate")))
            for p in points
            if _number(p.get("lr_now")) is not None
        ]
        out[(method, lr, seed)] = path
    return out


def open_study(study_dir: Path) -> tuple[StudySpec, dict[str, dict[str, Any]]]:
    """A study folder's spec (its study.yaml) and the world.json of every world built, by label."""
    raw = study_dir / RAW_FILE
    if not raw.is_file():
        raise StudyError(f"{study_dir} is not a study folder ({RAW_FILE} missing)")
    spec = load_study(raw)
    records = world_records(spec, study_dir)
    if not records:
        raise StudyError(f"{study_dir}: no world.json: the study's world was never built")
    return spec, records


def make_report(study_dir: str | Path) -> Report:
    """results.jsonl from the finished runs of a study folder, then the summary and pictures from it."""
    study_dir = Path(study_dir)
    spec, records = open_study(study_dir)
    rows = study_rows(spec, study_dir, records)
    expected = spec.runs(current_selection(spec, study_dir))
    finished = [r.run_id for r in expected if (run_folder(study_dir / "runs", r) / DONE).is_file()]
    missing = [r.run_id for r in expected if r.run_id not in finished]
    files = [write_results(rows, study_dir / "results.jsonl")]
    unhealthy = [
        (label, health) for label, health in ((k, world_health(w)) for k, w in records.items()) if not health.healthy
    ]
    if unhealthy:  # a world whose target learned nothing (or equals its retain model) ranks nothing
        label, health = unhealthy[0]
        log.warning(health.line)
        summary = study_dir / "summary.md"
        summary.write_text(unranked_summary(health, records[label], len(missing)))
        return Report(rows, [*files, summary], finished, missing)
    attacks = read_attack_rows(study_dir / ATTACKS_FILE)
    cost_file, cost_section = write_cost(study_dir, spec, records)
    files += report_files(
        rows, spec, study_dir, missing, lr_paths(study_dir), attack_rows=attacks, cost_section=cost_section
    )
    return Report(rows, [*files, cost_file], finished, missing)


def report_from_results(results: Path, config: Path, out_dir: Path) -> Report:
    """The summary and pictures rebuilt from a results.jsonl alone (no run folders, no worlds)."""
    rows = read_results(results)
    spec = load_study(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    attacks = read_attack_rows(results.parent / ATTACKS_FILE)  # committed beside the results, if scored
    cost = results.parent / COST_FILE  # likewise the study's cost, when its folder wrote one
    section = cost_markdown(json.loads(cost.read_text())) if cost.is_file() else ""
    files = report_files(rows, spec, out_dir, (), lr_paths_from_rows(rows), attack_rows=attacks, cost_section=section)
    return Report(rows, files, [], [])


def report_files(
    rows: Sequence[Row],
    spec: StudySpec,
    out_dir: Path,
    missing: Sequence[str] = (),
    autolr_paths: dict | None = None,
    n_boot: int = 10_000,
    attack_rows: Sequence[Row] = (),
    cost_section: str = "",
) -> list[Path]:
    """summary.md and the pictures of `rows` under `spec`'s declarations (and the scores of `ngdiff study
    attack`, and the study's cost section, when given), written to `out_dir`."""
    analysis = analyse(rows, spec, n_boot=n_boot)
    utilities = reference_utilities_of(rows)
    reference = next(iter(utilities.values()), None)  # the pictures draw one retain model: the first world's
    summary = out_dir / "summary.md"
    attacks = attack_markdown(attack_rows, analysis.declared_comparisons(), n_boot) if attack_rows else ""
    text = summary_markdown(analysis, missing, utilities, retrain_of(rows))
    summary.write_text(text + attacks + cost_section)
    files = [summary]
    if not rows or analysis.problem:
        return files
    labels = dict(spec.plot_labels)
    confirmed = analysis.stage_points(analysis.verdict_stage)
    pareto_stages = (analysis.verdict_stage,) if confirmed and spec.staged else (analysis.selection_stage,)
    first = (confirmed or analysis.points)[0]
    target = next(
        (r for r in rows if int(r["step"]) == 0 and r.get("world", first.world) == first.world),
        None,
    )
    floor = first.floor
    selected = {m: analysis.selected[m] for m in [m.name for m in spec.methods] if m in analysis.selected}
    files.append(
        pareto_plot(
            rows,
            selected,
            out_dir / "pareto.png",
            target,
            reference,
            floor,
            pareto_stages,
            labels,
            spec.summary.forget_metric,
            spec.summary.utility_metric,
        )
    )
    methods = [m.name for m in spec.methods]
    files.append(
        pareto_grid_plot(
            rows,
            methods,
            out_dir / "pareto_all.png",
            target,
            reference,
            floor,
            GRID_STAGES,
            labels,
            spec.summary.forget_metric,
            spec.summary.utility_metric,
        )
    )
    files.append(
        lr_plot(
            rows,
            spec.lr_plot_methods,
            out_dir / "lr.png",
            floor,
            GRID_STAGES,
            labels,
            spec.summary.forget_metric,
            spec.summary.utility_metric,
        )
    )
    if autolr_paths:
        files.append(autolr_plot(autolr_paths, out_dir / "autolr.png", labels))
    if attack_rows:
        files.append(attacks_plot(attack_rows, out_dir / "attacks.png", YARDSTICK, labels))
    return files
