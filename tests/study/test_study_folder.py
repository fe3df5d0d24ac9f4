"""A study folder holds one study: study.json refuses another world, budget or cadence, but not a record
written before a spec key existed, when that key now holds its default (the runs are the same)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ngdiff.study.runner import STUDY_FILE, claim_study_dir, plan_study
from ngdiff.study.spec import StudyError, parse_study

QUICK = Path(__file__).resolve().parents[2] / "configs" / "study" / "quick.yaml"


def plan(tmp_path: Path, **world_changes):
    raw = yaml.safe_load(QUICK.read_text())
    raw["world"].update(world_changes)
    return plan_study(parse_study(raw, "quick.yaml"), tmp_path / "study")


def test_the_same_study_is_claimed_again_and_another_world_is_refused(tmp_path):
    claim_study_dir(plan(tmp_path))
    claim_study_dir(plan(tmp_path))
    with pytest.raises(StudyError, match="different world"):
        claim_study_dir(plan(tmp_path, retain_authors=3))


def saved_without(tmp_path: Path, key: str) -> Path:
    claim_study_dir(plan(tmp_path))
    path = tmp_path / "study" / STUDY_FILE
    record = json.loads(path.read_text())
    del record["world"][key]  # as written before the spec had this key
    path.write_text(json.dumps(record))
    return path


def test_a_record_older_than_a_world_key_matches_that_keys_default_and_is_brought_up_to_date(tmp_path):
    path = saved_without(tmp_path, "muse")
    claim_study_dir(plan(tmp_path))
    assert "muse" in json.loads(path.read_text())["world"]


def test_a_record_older_than_a_world_key_does_not_match_another_value_of_it(tmp_path):
    saved_without(tmp_path, "second_retain_seed")
    with pytest.raises(StudyError, match="different world"):
        claim_study_dir(plan(tmp_path, second_retain_seed=3))
