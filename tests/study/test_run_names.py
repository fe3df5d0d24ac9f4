"""Run folder names: distinct lrs give distinct folders, typical lrs keep short names, two runs that would
share a folder are named, and a study begun under one-digit names still resumes from its folders."""

from __future__ import annotations

import json

import pytest
import yaml

from launcher.study_cli import CONFIG_DIR
from ngdiff.study.runner import DONE, plan_study
from ngdiff.study.spec import RunSpec, StudyError, lr_label, parse_study


def quick_raw(**changes) -> dict:
    raw = yaml.safe_load((CONFIG_DIR / "quick.yaml").read_text())
    raw.update(changes)
    return raw


@pytest.mark.parametrize(
    ("lr", "label"),
    [(1e-2, "1e-02"), (3e-5, "3e-05"), (1.5e-4, "1.5e-04"), (0.046, "4.6e-02"), (0.22, "2.2e-01"), (1.0, "1e+00")],
)
def test_typical_lrs_keep_short_names(lr, label):
    assert lr_label(lr) == label and float(label) == lr


def test_close_lrs_get_their_own_folders(tmp_path):
    raw = quick_raw(lrs=[1.6e-4, 1.7e-4], methods={"gdiff": ["method.combiner=gdiff"]})
    plan = plan_study(parse_study(raw, "study.yaml"), tmp_path / "s")
    assert [plan.run_dir(r).name for r in plan.runs] == ["gdiff__lr1.6e-04__s0", "gdiff__lr1.7e-04__s0"]
    assert lr_label(0.1 + 0.2) == "3.0000000000000004e-01"  # never rounded onto another lr


def test_two_runs_that_would_share_a_folder_are_both_named(tmp_path):
    methods = {"my gdiff": ["method.combiner=gdiff"], "my-gdiff": ["method.combiner=gdiff"]}
    with pytest.raises(StudyError) as caught:
        plan_study(parse_study(quick_raw(lrs=[1e-3], methods=methods), "study.yaml"), tmp_path / "s")
    assert str(caught.value) == (
        "study.yaml: runs 'my gdiff' and 'my-gdiff' (lr 0.001, seed 0) would share the folder "
        "runs/my-gdiff__lr1e-03__s0: a folder name keeps only letters, digits and +-_. of a method name; "
        "rename one of the methods"
    )


def test_a_study_begun_under_one_digit_names_resumes_from_its_folders(tmp_path):
    raw = quick_raw(lrs=[1.5e-4, 7e-4], methods={"gdiff": ["method.combiner=gdiff"]})
    plan = plan_study(parse_study(raw, "study.yaml"), tmp_path / "s")
    old = tmp_path / "s" / "runs" / "gdiff__lr1e-04__s0"  # 1.5e-4 as the earlier name wrote it
    old.mkdir(parents=True)
    (old / "config.yaml").write_text(yaml.safe_dump({"optim": {"lr": 1.5e-4}}))
    (old / DONE).write_text(json.dumps({"method": "gdiff", "lr": 1.5e-4, "seed": 0}))
    first, second = plan.runs
    assert plan.run_dir(first) == old and plan.pending() == [second]
    assert plan.run_dir(second).name == "gdiff__lr7e-04__s0"  # one digit: the same name as before
    with pytest.raises(StudyError, match=f"{old} holds the run of lr 0.00015 .*not lr 0.0001; rename it to .*1.5e-04"):
        plan.run_dir(RunSpec("gdiff", 1e-4, 0, ()))  # now 1e-4's name, but not 1e-4's run: never cleared
    assert plan.run_dir(RunSpec("gdiff", 1.6e-4, 0, ())).name == "gdiff__lr1.6e-04__s0"
