"""The study's result rows: one per run x evaluation, joined with the training record of the same step,
read back from results.jsonl with every key the analysis needs."""

from __future__ import annotations

import gzip
import json
import math

import pytest

from ngdiff.study.endpoints import endpoints
from ngdiff.study.results import by_run, collect, read_results, run_rows, write_results
from ngdiff.study.spec import StudyError


def test_run_rows_join_evaluations_with_the_training_record_of_their_step():
    metrics = [
        {"step": 1, "loss_forget": 2.0, "loss_retain": 1.0, "lr": 1e-3, "autolr/accepted": 1.0},
        {"step": 2, "loss_forget": 2.5, "loss_retain": 1.1, "lr": 1.1e-3},
        {"step": 2, "forget_quality": 0.02, "model_utility": 0.5, "eval_seconds": 3.0},
        {"step": 3, "loss_forget": 3.0, "loss_retain": 1.2, "lr": 1.2e-3, "autolr/accepted": 0.0},
        {"step": 4, "loss_forget": "nan", "loss_retain": 1.3, "lr": 1.2e-3},
        {"step": 4, "forget_quality": 0.3, "model_utility": 0.4, "eval_seconds": 3.0},
    ]
    start = {"forget_quality": 1e-4, "model_utility": 0.6}
    rows = run_rows(metrics, "ngdiff+autolr", 1e-3, 7, steps_per_epoch=2.0, start=start)
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert rows[0] == {
        "world": "base", "stage": "grid", "method": "ngdiff+autolr", "lr": 1e-3, "seed": 7, "step": 0,
        "epoch": 0.0, "forget_quality": 1e-4, "model_utility": 0.6, "lr_now": 1e-3,
    }  # fmt: skip
    assert rows[1]["epoch"] == 1.0 and rows[1]["loss_forget"] == 2.5 and rows[1]["lr_now"] == 1.1e-3
    assert rows[1]["autolr_accept_rate"] == 1.0  # one fit, accepted
    assert rows[2]["autolr_accept_rate"] == 0.5  # two fits by step 4, one accepted
    assert rows[2]["loss_forget"] is None  # a non-finite loss becomes null, never NaN in JSON
    assert rows[2]["forget_quality"] == 0.3 and "eval_seconds" in rows[2]


def test_rows_carry_stage_world_and_both_names_of_the_ks_distance(tmp_path):
    metrics = [{"step": 5, "forget_quality": 0.2, "forget_ks_statistic": 0.3, "model_utility": 0.5, "eval_seconds": 1}]
    run = tmp_path / "runs" / "confirmation__w2__m__lr1e-03__s4"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    info = {"method": "m", "lr": 1e-3, "seed": 4, "stage": "confirmation", "world": "w2", "steps": 5,
            "budget_epochs": 1.0}  # fmt: skip
    (run / "done.json").write_text(json.dumps(info))
    starts = {"w2": {"forget_quality": 1e-4, "forget_ks_statistic": 0.6, "model_utility": 0.6}, "base": {}}
    rows = collect(tmp_path, starts)
    assert [(r["world"], r["stage"], r["step"], r["ks_d"]) for r in rows] == [
        ("w2", "confirmation", 0, 0.6), ("w2", "confirmation", 5, 0.3)
    ]  # fmt: skip
    path = write_results(rows, tmp_path / "results.jsonl")
    assert read_results(path) == rows
    assert list(by_run(rows)) == [("confirmation", "w2", "m", 1e-3, 4)]
    # a committed row that only names D as ks_d is read back with the evaluation's name too
    path.write_text(json.dumps({"method": "m", "lr": 0.1, "seed": 0, "step": 0, "ks_d": 0.5}) + "\n")
    (row,) = read_results(path)
    assert row["forget_ks_statistic"] == 0.5 and row["world"] == "base" and row["stage"] == "grid"
    path.write_text('{"method": "m", "lr": 0.1}\n')
    with pytest.raises(StudyError, match=r"results.jsonl:1: the row has no seed, step"):
        read_results(path)
    # committed compressed: the same rows through gzip; a .gz that is not gzip is named
    packed = tmp_path / "results.jsonl.gz"
    packed.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    assert read_results(packed) == rows
    packed.write_text("plain text")
    with pytest.raises(StudyError, match=r"results.jsonl.gz: not a readable results file"):
        read_results(packed)


def test_a_diverged_run_keeps_its_evaluations_and_ends_without_an_end_point(tmp_path):
    metrics = [
        {"step": 5, "forget_ks_statistic": 0.3, "forget_quality": 0.2, "model_utility": 0.58, "eval_seconds": 1},
        {"step": 10, "forget_ks_statistic": 0.1, "forget_quality": 0.5, "model_utility": 0.40, "eval_seconds": 1},
    ]
    run = tmp_path / "runs" / "selection__base__m__lr1e+00__s0"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    info = {"method": "m", "lr": 1.0, "seed": 0, "stage": "selection", "world": "base", "steps": 13,
            "budget_epochs": 1.0, "diverged": {"step": 13, "reason": "step 13: loss_forget is nan"}}  # fmt: skip
    (run / "done.json").write_text(json.dumps(info))
    start = {"forget_ks_statistic": 0.6, "forget_quality": 1e-4, "model_utility": 0.6}
    rows = collect(tmp_path, {"base": start})
    assert [(r["step"], r.get("diverged", False)) for r in rows] == [(0, False), (5, False), (10, False), (13, True)]
    assert read_results(write_results(rows, tmp_path / "results.jsonl")) == rows
    (point,) = endpoints(rows)
    # the best point is step 5 (step 10 breaks the floor 0.57); the divergence is the end, with no end point
    assert point.diverged and point.best_step == 5 and point.best_gap == pytest.approx(0.5)
    assert point.end_step == 13 and not point.end_meets_floor and math.isnan(point.end_gap)
    assert point.area == pytest.approx((0.5 + 0 + 0) / 3)
