"""Golden fixtures: the legacy TOFU logs' truth ratios and the published forget-quality values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ngdiff.eval.tofu_metrics import forget_quality, legacy_truth_ratios, load_forget_truth_ratios

LOGS = Path(__file__).parents[1] / "fixtures" / "tofu_reference_eval_logs"


@pytest.mark.parametrize("name", ["llama2-7b_full", "llama2-7b_retain90", "phi_full", "phi_retain90"])
def test_truth_ratio_per_question_reproduces_the_logged_value(name):
    log = json.loads((LOGS / f"{name}_wd0.01_eval_log_forget.json").read_text())
    ours = legacy_truth_ratios(log)
    logged = [log["truth_ratio"][k] for k in sorted(log["truth_ratio"], key=int)]
    assert len(ours) == len(logged) == 300
    assert ours == pytest.approx(logged, rel=1e-5)


@pytest.mark.parametrize(("model", "expected"), [("llama2-7b", 1.834e-21), ("phi", 2.194e-16)])
def test_forget_quality_of_full_against_retain90_matches_the_published_value(model, expected):
    full = load_forget_truth_ratios(LOGS / f"{model}_full_wd0.01_eval_log_forget.json")
    retain = load_forget_truth_ratios(LOGS / f"{model}_retain90_wd0.01_eval_log_forget.json")
    pvalue, _ = forget_quality(full, retain)
    assert pvalue == pytest.approx(expected, rel=1e-3)
