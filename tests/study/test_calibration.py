"""The world's calibration: bounds on hand-made figures, and a tokenizer that knows only training text."""

from __future__ import annotations

import pytest
import yaml

from launcher.study_cli import CONFIG_DIR
from ngdiff.study.calibration import (
    assert_calibrated,
    calibration_errors,
    train_world_tokenizer,
    training_token_ids,
    unseen_token_share,
)
from ngdiff.study.spec import CalibrationBounds, StudyError, parse_study
from ngdiff.study.world import cpu_world_data

FIGURES = {"d_target_retain": 0.7, "retain_forget_rougeL": 0.4, "utility_gap": 0.05, "unseen_token_share": 0.0,
           "truncated_share": 0.2}  # fmt: skip
BOUNDS = CalibrationBounds((0.3, 0.5), (0.25, 0.5), 0.03, 0.01, 0.05)


def test_each_figure_outside_its_bound_is_named():
    assert calibration_errors(FIGURES, BOUNDS) == [
        "d_target_retain = 0.7 outside [0.3, 0.5]",
        "utility_gap = 0.05 above 0.03",
        "truncated_share = 0.2 above 0.05",
    ]
    assert calibration_errors(FIGURES, CalibrationBounds()) == []  # nothing declared: nothing checked
    with pytest.raises(StudyError, match=r"world\.json: .*d_target_retain = 0\.7 .*truncated_share"):
        assert_calibrated(FIGURES, BOUNDS, "world.json")
    assert calibration_errors({}, CalibrationBounds(utility_gap_max=0.1)) == [
        "utility_gap unknown (bound utility_gap_max)"
    ]


def test_the_quick_worlds_tokenizer_knows_every_evaluation_answer_token():
    world = parse_study(yaml.safe_load((CONFIG_DIR / "quick.yaml").read_text())).world
    sets = cpu_world_data(world)
    tokenizer = train_world_tokenizer(sets["target_train"], world.model.vocab_size)
    seen = training_token_ids(tokenizer, sets["target_train"])
    forget_eval = sets[f"{world.forget_split}_perturbed.jsonl"]
    assert unseen_token_share(tokenizer, seen, forget_eval) <= 0.01
