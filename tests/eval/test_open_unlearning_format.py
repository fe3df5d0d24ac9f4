"""open-unlearning TOFU logs: a hand-made retain-model TOFU_EVAL.json read as a reference; ours written back."""

from __future__ import annotations

import json
import math

import pytest

from ngdiff.eval.open_unlearning_format import load_privleak_reference, summary_of, to_open_unlearning
from ngdiff.eval.tofu_metrics import load_forget_truth_ratios

# the layout src/evals/base.py writes: metric -> {agg_value, value_by_index}; MIAs with forget/holdout sides
RETAIN_LOG = {
    "forget_truth_ratio": {
        "agg_value": 0.6,
        "value_by_index": {"1": {"score": 0.5}, "0": {"score": 0.7}, "10": {"score": 0.9}},
    },
    "mia_min_k": {
        "forget": {"agg_value": 3.0, "value_by_index": {"0": {"score": 3.0}}},
        "holdout": {"agg_value": 3.1, "value_by_index": {"0": {"score": 3.1}}},
        "auc": 0.38,
        "agg_value": 0.38,
    },
    "privleak": {"agg_value": -0.5},
}


def test_retain_log_is_a_reference(tmp_path):
    path = tmp_path / "TOFU_EVAL.json"
    path.write_text(json.dumps(RETAIN_LOG))
    assert load_forget_truth_ratios(path) == [0.7, 0.5, 0.9]  # by index, numerically
    assert load_forget_truth_ratios(tmp_path) == [0.7, 0.5, 0.9]  # the folder
    assert load_privleak_reference(path) == 0.38
    (tmp_path / "TOFU_SUMMARY.json").write_text(json.dumps(summary_of(RETAIN_LOG)))
    assert load_privleak_reference(tmp_path / "TOFU_SUMMARY.json") == 0.38


def test_ours_written_in_its_layout():
    forget = [
        {
            "question": "q",
            "answer": "a",
            "generated_text": "g",
            "rougeL_recall": 0.5,
            "rouge1_recall": 0.6,
            "avg_gt_loss": 1.0,
            "avg_paraphrased_loss": 2.0,
            "average_perturb_loss": [3.0, 4.0],
            "truth_ratio": 0.25,
        }
    ]
    mia = [{"loss": 1.0, "min_k": 2.0, "exact_memorization": 0.5, "extraction_strength": 0.25}]
    metrics = {
        "forget_truth_ratio": 0.25,
        "mia_loss_auc": 0.75,
        "mia_mink_auc": 0.6,
        "privleak": -20.0,
        "exact_memorization": 0.5,
        "extraction_strength": 0.25,
    }
    log = to_open_unlearning({"forget": forget, "mia_forget": mia, "mia_holdout": mia}, metrics)
    assert log["forget_Q_A_Prob"]["value_by_index"]["0"] == {"prob": pytest.approx(math.exp(-1)), "avg_loss": 1.0}
    assert log["forget_Q_A_ROUGE"]["value_by_index"]["0"]["generation"] == "g"
    assert log["forget_truth_ratio"] == {"agg_value": 0.25, "value_by_index": {"0": {"score": 0.25}}}
    assert log["mia_min_k"]["auc"] == log["mia_min_k"]["agg_value"] == 0.6
    assert log["mia_min_k"]["forget"]["value_by_index"] == {"0": {"score": 2.0}}
    assert "mia_zlib" not in log
    assert log["privleak"] == {"agg_value": -20.0}
    assert summary_of(log)["extraction_strength"] == 0.25
    assert reference_round_trip(log) == [0.25]


def reference_round_trip(log):
    from ngdiff.eval.open_unlearning_format import reference_truth_ratios

    return reference_truth_ratios(json.loads(json.dumps(log)))
