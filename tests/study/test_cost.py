"""The study's cost section: per phase, runs, summed work, median run and wall span, from done.json files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ngdiff.study.cost import cost_markdown, study_cost
from ngdiff.study.spec import load_study

DEFAULT = Path(__file__).resolve().parents[2] / "configs" / "study" / "default.yaml"


def finished(runs: Path, name: str, method: str, stage: str, seconds: float, end: float | None) -> None:
    folder = runs / name
    folder.mkdir(parents=True)
    record = {"method": method, "stage": stage, "seconds": seconds}
    if end is not None:
        record["finished_at"] = end
    (folder / "done.json").write_text(json.dumps(record))


def test_phases_split_stages_and_exploratory_runs_with_hand_computed_spans(tmp_path):
    spec = load_study(DEFAULT)
    runs = tmp_path / "runs"
    # two workers: selection runs [0,40] [0,50] [40,70]; an exploratory one [70,100]; confirmation [200,260]
    finished(runs, "a", "ngdiff", "selection", 40, 1040)
    finished(runs, "b", "gdiff", "selection", 50, 1050)
    finished(runs, "c", "npo", "selection", 30, 1070)
    finished(runs, "d", "ga", "selection", 30, 1100)  # ga is exploratory in the default study
    finished(runs, "e", "ngdiff", "confirmation", 60, 1260)
    records = {
        "base": {"info": {"build_seconds": 900.0, "pretrain": {"build_seconds": 600.0, "built_now": True}}},
        "ft1": {"info": {"build_seconds": 200.0, "pretrain": {"build_seconds": 600.0, "built_now": False}}},
    }
    cost = study_cost(tmp_path, spec, records)
    phases = {p["phase"]: p for p in cost["phases"]}
    assert list(phases) == [
        "world base: pretraining base", "world base: fine-tuning and scoring", "world ft1: fine-tuning and scoring",
        "selection", "selection (exploratory)", "confirmation",
    ]  # fmt: skip
    assert phases["world base: pretraining base"]["wall_seconds"] == 600
    assert phases["world base: fine-tuning and scoring"]["wall_seconds"] == 300
    assert phases["world ft1: fine-tuning and scoring"]["wall_seconds"] == 200  # its base was cached
    sel = phases["selection"]
    assert (sel["runs"], sel["work_seconds"], sel["median_run_seconds"], sel["wall_seconds"]) == (3, 120, 40, 70)
    assert phases["selection (exploratory)"]["wall_seconds"] == 30
    assert phases["confirmation"]["median_run_seconds"] == 60
    assert cost["world_seconds"] == 1100
    assert cost["runs_wall_seconds"] == 260  # 1000 to 1260
    assert cost["wall_seconds"] == 1360
    text = cost_markdown(cost)
    assert "| selection | 3 | 2.0 | 40 | 1.2 |" in text
    assert "In all: 22.7 min (worlds 18.3, runs 4.3)." in text


def test_a_run_without_finished_at_ends_at_its_files_time(tmp_path):
    runs = tmp_path / "runs"
    finished(runs, "a", "ngdiff", "selection", 40, None)
    end = (runs / "a" / "done.json").stat().st_mtime
    cost = study_cost(tmp_path, load_study(DEFAULT), {})
    assert cost["runs_wall_seconds"] == pytest.approx(40)
    assert cost["phases"][0]["phase"] == "selection" and end > 0
