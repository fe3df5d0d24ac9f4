"""The study's bookkeeping on hand-made rows: the summary rule, seed statistics, trajectory rows."""

from __future__ import annotations

import math

import pytest

from ngdiff.study.results import Stat, best_cells, best_point, lr_cells, lr_spread, run_rows, summary_markdown
from ngdiff.study.spec import SummaryRule

RULE = SummaryRule()  # highest forget_quality with model_utility >= 0.95 x the target's


def point(step: int, fq: float, mu: float, method: str = "m", lr: float = 1e-3, seed: int = 0) -> dict:
    return {"method": method, "lr": lr, "seed": seed, "step": step, "forget_quality": fq, "model_utility": mu}


def test_best_point_takes_the_highest_forget_quality_above_the_utility_floor():
    points = [point(0, 1e-5, 0.60), point(5, 1e-3, 0.58), point(10, 0.5, 0.56), point(15, 0.9, 0.40)]
    # floor 0.95 * 0.6 = 0.57: steps 0 and 5 qualify; 10 (0.56) and 15 do not, whatever their forget quality
    assert best_point(points, RULE, 0.60)["step"] == 5


def test_step_zero_always_qualifies_and_wins_when_unlearning_only_hurts():
    points = [point(0, 0.01, 0.60), point(5, 0.5, 0.10), point(10, 0.001, 0.59)]
    assert best_point(points, RULE, 0.60)["step"] == 0


def test_ties_go_to_the_earlier_step_and_min_mode_flips_the_order():
    points = [point(0, 0.2, 1.0), point(5, 0.3, 1.0), point(10, 0.3, 1.0)]
    assert best_point(points, RULE, 1.0)["step"] == 5
    rule = SummaryRule(forget_metric="forget_quality", forget_mode="min")
    assert best_point(points, rule, 1.0)["step"] == 0


def test_seed_statistics_and_the_best_lr_by_hand():
    rows = [
        # lr 1e-3: best points 0.4 and 0.2 (seed 1's step 10 is below the floor); end points 0.1 and 0.3
        point(0, 0.01, 1.0, seed=0), point(5, 0.4, 0.99, seed=0), point(10, 0.1, 0.97, seed=0),
        point(0, 0.01, 1.0, seed=1), point(5, 0.2, 0.98, seed=1), point(10, 0.3, 0.94, seed=1),
        # lr 1e-2: utility collapses at once; only step 0 qualifies
        point(0, 0.01, 1.0, lr=1e-2), point(5, 0.9, 0.5, lr=1e-2), point(10, 0.8, 0.4, lr=1e-2),
    ]  # fmt: skip
    cells = {c.lr: c for c in lr_cells(rows, RULE, 1.0)}
    low = cells[1e-3]
    assert low.seeds == 2
    assert low.best_forget.mean == pytest.approx(0.3) and low.best_forget.std == pytest.approx(math.sqrt(0.02))
    assert low.best_utility.mean == pytest.approx(0.985)
    assert low.end_forget.mean == pytest.approx(0.2) and low.end_utility.mean == pytest.approx(0.955)
    assert cells[1e-2].best_forget.mean == pytest.approx(0.01) and cells[1e-2].end_forget.mean == pytest.approx(0.8)
    assert best_cells(list(cells.values()), RULE)["m"].lr == 1e-3
    spread = lr_spread(list(cells.values()), "m", RULE)
    assert spread["log10_forget_spread"] == pytest.approx(math.log10(0.8) - math.log10(0.2))
    assert spread["utility_spread"] == pytest.approx(0.955 - 0.4)


def test_stat_of_one_value_has_zero_std_and_of_none_is_empty():
    assert Stat.of([0.5]) == Stat(0.5, 0.0, 1)
    assert Stat.of([]).n == 0 and Stat.of([]).text() == "n/a"


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
        "method": "ngdiff+autolr", "lr": 1e-3, "seed": 7, "step": 0, "epoch": 0.0,
        "forget_quality": 1e-4, "model_utility": 0.6, "lr_now": 1e-3,
    }  # fmt: skip
    assert rows[1]["epoch"] == 1.0 and rows[1]["loss_forget"] == 2.5 and rows[1]["lr_now"] == 1.1e-3
    assert rows[1]["autolr_accept_rate"] == 1.0  # one fit, accepted
    assert rows[2]["autolr_accept_rate"] == 0.5  # two fits by step 4, one accepted
    assert rows[2]["loss_forget"] is None  # a non-finite loss becomes null, never NaN in JSON
    assert rows[2]["forget_quality"] == 0.3 and "eval_seconds" in rows[2]


def test_summary_names_the_rule_every_method_and_the_unfinished_runs():
    rows = [point(0, 0.01, 1.0, "a"), point(5, 0.2, 0.99, "a"), point(0, 0.01, 1.0, "b"), point(5, 0.9, 0.2, "b")]
    text = summary_markdown(rows, RULE, {"forget_quality": 0.01, "model_utility": 1.0}, {}, ["a", "b", "c"], ["c__x"])
    assert "model_utility` >= 0.95 x the target's (0.95)" in text
    assert "| a | 0.001 | 1 | 0.2 | 0.99 | 5 |" in text
    assert "| b | 0.001 | 1 | 0.01 | 1 | 0 |" in text  # b's only move broke utility: its best point is the target
    assert "| c | not run |" in text and "c__x" in text


def test_when_no_lr_beats_the_target_the_better_end_point_breaks_the_tie():
    rows = [
        point(0, 1e-9, 1.0, lr=1e-4), point(5, 1e-9, 0.99, lr=1e-4),  # nothing happens
        point(0, 1e-9, 1.0, lr=1e-3), point(5, 0.1, 0.30, lr=1e-3),  # forgets, but below the floor
    ]  # fmt: skip
    cells = lr_cells(rows, RULE, 1.0)
    assert [c.best_forget.mean for c in cells] == [1e-9, 1e-9]
    assert best_cells(cells, RULE)["m"].lr == 1e-3
