"""The summary refuses to rank methods on an unhealthy world (hand-made world.json files, no training)."""

from __future__ import annotations

import json
import logging

import yaml

from launcher.study_cli import CONFIG_DIR
from ngdiff.study.health import world_health
from ngdiff.study.report import RAW_FILE, make_report
from ngdiff.study.runner import BASE_WORLD, world_dir
from ngdiff.study.spec import parse_study
from ngdiff.study.world import WORLD_FILE

HEALTHY = {
    "target_metrics": {"forget_rougeL_recall": 0.8, "forget_ks_statistic": 0.6, "model_utility": 0.5},
    "reference_metrics": {"forget_rougeL_recall": 0.3, "model_utility": 0.5},
}
UNHEALTHY = {
    "target_metrics": {"forget_rougeL_recall": 0.0, "forget_ks_statistic": 0.1, "model_utility": 0.0},
    "reference_metrics": {"forget_rougeL_recall": 0.0, "model_utility": 0.0},
}


def study_folder(tmp_path, world):
    raw = (CONFIG_DIR / "quick.yaml").read_text()
    spec = parse_study(yaml.safe_load(raw), "quick.yaml")
    (tmp_path / RAW_FILE).write_text(raw)
    folder = world_dir(spec, BASE_WORLD, tmp_path)
    folder.mkdir(parents=True)
    (folder / WORLD_FILE).write_text(json.dumps({"overrides": [], **world}))
    return tmp_path


def test_health_reasons_in_words():
    assert world_health(HEALTHY).healthy
    reasons = world_health(UNHEALTHY).reasons
    assert len(reasons) == 3
    assert (
        "did not learn its forget set" in reasons[0] and "barely differ" in reasons[1] and "utility is 0" in reasons[2]
    )
    assert world_health({"target_metrics": {}, "reference_metrics": {}}).healthy  # nothing to check: MUSE


def test_a_target_with_utility_0_alone_makes_the_world_unhealthy():
    # a target that learned its forget set and differs from its retain model, but scores 0 on a utility set
    world = {**HEALTHY, "target_metrics": {**HEALTHY["target_metrics"], "model_utility": 0.0}}
    health = world_health(world)
    assert health.reasons == ("the target's model utility is 0 (the utility floor excludes nothing)",)
    assert not health.healthy
    learnt = {k: v for k, v in HEALTHY["target_metrics"].items() if k != "model_utility"}
    missing = {**HEALTHY, "target_metrics": learnt}
    assert world_health(missing).healthy  # no utility sets evaluated (e.g. MUSE): the check is skipped


def test_a_healthy_world_is_ranked(tmp_path):
    make_report(study_folder(tmp_path, HEALTHY))
    summary = (tmp_path / "summary.md").read_text()
    assert "Per run, the best point is" in summary and "World unhealthy" not in summary  # the ranking's rule


def test_an_unhealthy_world_ranks_nothing_and_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ngdiff.study"):
        make_report(study_folder(tmp_path, UNHEALTHY))
    summary = (tmp_path / "summary.md").read_text()
    line = world_health(UNHEALTHY).line
    assert line.startswith("World unhealthy: the target did not learn") and line.endswith("; methods are not ranked")
    assert f"{line}." in summary and "Per run, the best point is" not in summary
    assert line in caplog.text


def test_the_report_command_on_an_unhealthy_world_says_why_and_draws_nothing(tmp_path, capsys):
    from launcher.cli import main

    folder = study_folder(tmp_path, UNHEALTHY)
    assert main(["study", "report", str(folder)]) == 0
    out = capsys.readouterr().out
    summary = folder / "summary.md"
    assert f"  {summary}" in out.splitlines() and ".png" not in out  # the summary is written, no picture
    text = summary.read_text()
    assert "World unhealthy: the target did not learn its forget set (forget ROUGE-L 0 < 0.3)" in text
    assert "the target's model utility is 0" in text and "| target | 0 | 0 |" in text
    assert not list(folder.glob("*.png"))
