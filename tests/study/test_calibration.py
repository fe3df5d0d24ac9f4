"""The world's calibration: bounds on hand-made figures, and a tokenizer that knows only training text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from launcher.study_cli import CONFIG_DIR
from ngdiff.config import load_config
from ngdiff.study.calibration import (
    assert_calibrated,
    calibration_errors,
    check_bounds,
    train_world_tokenizer,
    training_token_ids,
    unseen_token_share,
)
from ngdiff.study.spec import CalibrationBounds, StudyError, parse_study
from ngdiff.study.world import cpu_world_data, load_or_build, placeholder_overrides, world_recipe

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


def test_the_default_world_declares_tofus_regime_as_its_bounds():
    # retain_forget_rougeL starts at 0.05, below TOFU's 0.25: the default world's retain model reaches 0.10
    # (docs/study.md); every other bound is TOFU's regime
    world = parse_study(yaml.safe_load((CONFIG_DIR / "default.yaml").read_text())).world
    assert world.calibration == CalibrationBounds((0.3, 0.5), (0.05, 0.5), 0.03, 0.01, 0.05)


def write_world(folder: Path, spec, data_cfg, figures: dict) -> Path:
    """A hand-made world.json: the spec's recipe, the given calibration figures, no models."""
    folder.mkdir(parents=True)
    record = {"recipe": world_recipe(spec, data_cfg), "overrides": [], "target_metrics": {}, "calibration": figures}
    (folder / "world.json").write_text(json.dumps(record))
    return folder / "world.json"


def test_a_world_outside_its_bounds_fails_to_load_naming_each_figure_its_value_and_bound(tmp_path):
    raw = yaml.safe_load((CONFIG_DIR / "quick.yaml").read_text())
    raw["world"]["calibration"] = {"d_target_retain": [0.3, 0.5], "retain_forget_rougeL": [0.25, 0.5],
                                   "utility_gap_max": 0.03, "unseen_token_share_max": 0.01,
                                   "truncated_share_max": 0.05}  # fmt: skip
    spec = parse_study(raw, "study.yaml")
    data_cfg = load_config(None, [*placeholder_overrides(spec), *spec.common], check_sources=False).data
    marker = write_world(tmp_path / "world", spec, data_cfg, FIGURES)
    with pytest.raises(StudyError) as failed:
        load_or_build(spec, tmp_path, data_cfg, progress=False)
    assert str(failed.value).startswith(f"{marker}: the world is outside its declared bounds (world.calibration): ")
    assert (
        "d_target_retain = 0.7 outside [0.3, 0.5]; utility_gap = 0.05 above 0.03; truncated_share = 0.2 above 0.05"
        in str(failed.value)
    )
    # the same world inside its bounds loads (the bounds are no part of the recipe: nothing is rebuilt)
    inside = {**FIGURES, "d_target_retain": 0.4, "utility_gap": 0.02, "truncated_share": 0.0}
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "calibration": inside}))
    assert load_or_build(spec, tmp_path, data_cfg, progress=False).folder == tmp_path / "world"


@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        (CalibrationBounds(d_target_retain=(0.5, 0.3)), r"d_target_retain must be \[low, high\] with low <= high"),
        (CalibrationBounds(retain_forget_rougeL=(0.3,)), r"retain_forget_rougeL must be \[low, high\]"),
        (CalibrationBounds(utility_gap_max="small"), r"utility_gap_max must be a number >= 0, got 'small'"),
        (CalibrationBounds(truncated_share_max=-0.1), r"truncated_share_max must be a number >= 0, got -0.1"),
    ],
)
def test_a_malformed_bound_is_named(bounds, message):
    with pytest.raises(StudyError, match=rf"world\.calibration\.{message}"):
        check_bounds(bounds)
