"""`ngdiff study report DIR`: aggregate the finished runs of a study folder and draw its pictures.

Reads `study.json` (the grid and the summary rule), the world's `world.json` (the target's and the
retain model's evaluations) and every `runs/*/` folder; writes `results.jsonl`, `summary.md`,
`pareto.png`, `lr.png` and, when any run used AutoLR, `autolr.png`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ngdiff.metrics_log import read_jsonl
from ngdiff.study.health import unranked_summary, world_health
from ngdiff.study.plots import autolr_plot, lr_plot, pareto_grid_plot, pareto_plot
from ngdiff.study.results import best_cells, collect, lr_cells, summary_markdown, write_results
from ngdiff.study.runner import DONE, STUDY_FILE, run_folder
from ngdiff.study.spec import StudyError, SummaryRule
from ngdiff.study.world import WORLD_FILE

log = logging.getLogger("ngdiff.study")


@dataclass(frozen=True)
class Report:
    rows: list[dict[str, Any]]
    files: list[Path]
    finished: list[str]
    missing: list[str]


def _runs(study: dict[str, Any]) -> list:
    from ngdiff.study.spec import RunSpec

    return [
        RunSpec(m["name"], lr, seed, tuple(m["overrides"]))
        for m in study["methods"]
        for lr in m["lrs"]
        for seed in m["seeds"]
    ]


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


def make_report(study_dir: str | Path) -> Report:
    study_dir = Path(study_dir)
    path = study_dir / STUDY_FILE
    if not path.is_file():
        raise StudyError(f"{study_dir} is not a study folder ({STUDY_FILE} missing)")
    study = json.loads(path.read_text())
    world_dir = Path(study["world"]["cache_dir"]) if study["world"]["cache_dir"] else study_dir / "world"
    world_file = world_dir / WORLD_FILE
    if not world_file.is_file():
        raise StudyError(f"{world_file} missing: the study's world was never built")
    world = json.loads(world_file.read_text())
    target, reference = world["target_metrics"], world.get("reference_metrics", {})
    rule = SummaryRule(**study["summary"])
    methods = [m["name"] for m in study["methods"]]

    rows = collect(study_dir, target or None)
    expected = _runs(study)
    finished = [r.run_id for r in expected if (run_folder(study_dir / "runs", r) / DONE).is_file()]
    missing = [r.run_id for r in expected if r.run_id not in finished]
    files = [write_results(rows, study_dir / "results.jsonl")]
    health = world_health(world)  # an unhealthy world ranks nothing (ngdiff.study.health)
    if health.healthy:
        summary = summary_markdown(rows, rule, target, reference, methods, missing)
    else:
        log.warning(health.line)
        summary = unranked_summary(health, world, len(missing))
    (study_dir / "summary.md").write_text(summary)
    files.append(study_dir / "summary.md")
    if rows:
        cells = lr_cells(rows, rule, target.get(rule.utility_metric))
        best_lr = {m: c.lr for m, c in best_cells(cells, rule).items()}
        best_lr = {m: best_lr[m] for m in methods if m in best_lr}
        files.append(
            pareto_plot(
                rows,
                best_lr,
                study_dir / "pareto.png",
                target,
                reference.get(rule.utility_metric),
                rule.forget_metric,
                rule.utility_metric,
            )
        )
        target_utility = target.get(rule.utility_metric)
        files.append(
            pareto_grid_plot(
                rows,
                methods,
                study_dir / "pareto_all.png",
                target,
                reference.get(rule.utility_metric),
                rule.utility_fraction * target_utility if target_utility is not None else None,
                rule.forget_metric,
                rule.utility_metric,
            )
        )
        files.append(
            lr_plot(rows, study["lr_plot_methods"], study_dir / "lr.png", rule.forget_metric, rule.utility_metric)
        )
        paths = lr_paths(study_dir)
        if paths:
            files.append(autolr_plot(paths, study_dir / "autolr.png"))
    return Report(rows, files, finished, missing)
