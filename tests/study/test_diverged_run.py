"""A study run whose lr is too large stops at its first non-finite number and is recorded as diverged (a
result of the lr grid), so the study goes on to its next runs and its confirmation stage."""

from __future__ import annotations

import json

import yaml

from launcher.study_cli import CONFIG_DIR
from ngdiff.study.results import collect
from ngdiff.study.runner import DONE, plan_study, run_one
from ngdiff.study.spec import parse_study
from ngdiff.study.world import World
from tests.conftest import tiny_run_overrides


def test_a_diverging_run_is_done_and_marked_diverged_at_its_step(tiny_model_dir, tofu_split, tmp_path):
    raw = yaml.safe_load((CONFIG_DIR / "quick.yaml").read_text())
    raw["methods"] = {"gdiff-sgd": ["method.combiner=gdiff", "optim.name=sgd"]}
    raw["lrs"], raw["budget_epochs"] = [1e6], 1
    plan = plan_study(parse_study(raw), tmp_path / "study")
    (run,) = plan.runs
    overrides = [o for o in tiny_run_overrides(tiny_model_dir, tofu_split) if "batch_size" not in o]
    world = World(tmp_path / "world", tuple(overrides), {}, {}, {})
    record = run_one(plan, world, run)
    done = json.loads((plan.run_dir(run) / DONE).read_text())
    assert done == record and done["diverged"]["step"] == done["steps"] == 2
    assert done["diverged"]["reason"].startswith("step 2: grad_norm_retain is ")
    # no end weights; the selected point is the target, named by its path
    assert not (plan.run_dir(run) / "weights" / "end").exists()
    point = json.loads((plan.run_dir(run) / "weights" / "selected" / "point.json").read_text())
    assert point == {"step": 0, "target": str(tiny_model_dir)}
    rows = collect(plan.study_dir, {"base": {"forget_ks_statistic": 0.5, "model_utility": 0.5}})
    assert [(r["step"], r.get("diverged")) for r in rows] == [(0, None), (2, True)]
    assert plan.pending() == []  # a rerun of the study does not train it again
