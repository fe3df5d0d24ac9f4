"""Each metric on cases worked out by hand."""

from __future__ import annotations

import json
import math

import pytest

from ngdiff.errors import UserError
from ngdiff.eval.muse import knowmem_prompt, membership_auc, min_k_score, muse_aggregate, prefix_before, privleak
from ngdiff.eval.rouge import rouge_scores
from ngdiff.eval.sharding import EvalDist, gather_in_order, local_slice
from ngdiff.eval.tofu import aggregate, set_metrics
from ngdiff.eval.tofu_metrics import (
    forget_quality,
    forget_truth_ratio_stat,
    load_forget_truth_ratios,
    model_utility,
    normalised_probability,
    paired_truth_ratio_distance,
    retain_truth_ratio_stat,
    truth_ratio,
)


def test_truth_ratio_is_exp_of_paraphrased_minus_mean_perturbed_loss():
    assert truth_ratio(1.0, [2.0, 3.0, 4.0]) == pytest.approx(math.exp(-2.0))
    assert truth_ratio(2.0, [2.0]) == pytest.approx(1.0)


def test_a_diverged_models_truth_ratio_saturates_and_its_statistics_are_tofus():
    # a 5000-nat gap overflowed math.exp; the ratio is e^700 (or e^-700) and every statistic is what inf gives
    high, low = truth_ratio(5000.0, [1.0]), truth_ratio(1.0, [5000.0])
    assert high == pytest.approx(math.exp(700.0)) and low == pytest.approx(math.exp(-700.0))
    assert forget_truth_ratio_stat([high, low]) == pytest.approx(0.0, abs=1e-300)
    assert retain_truth_ratio_stat([high]) == 0.0
    assert paired_truth_ratio_distance([high], [1.0]) == pytest.approx(700.0)


def test_truth_ratio_statistics_forget_and_retain_sides():
    # forget: mean(min(TR, 1/TR)) = mean(0.5, 0.5)
    assert forget_truth_ratio_stat([0.5, 2.0]) == pytest.approx(0.5)
    # retain: mean(max(0, 1 - TR)) = mean(0.75, 0)
    assert retain_truth_ratio_stat([0.25, 2.0]) == pytest.approx(0.375)


def test_normalised_probability_over_gold_and_perturbed():
    # p_gold = 1/2, perturbed 1/2 and 1/4: 0.5 / 1.25
    assert normalised_probability(math.log(2), [math.log(2), math.log(4)]) == pytest.approx(0.4)
    # every probability underflows (losses of 2000 nats): the ratio is still the softmax's 1/3
    assert normalised_probability(2000.0, [2000.0, 2000.0]) == pytest.approx(1 / 3)


def test_model_utility_is_the_harmonic_mean_and_zero_with_a_zero():
    assert model_utility([1.0, 0.5, 0.25]) == pytest.approx(3 / 7)
    assert model_utility([1.0, 0.0]) == 0.0


def test_forget_quality_ks_pvalue():
    assert forget_quality([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx((1.0, 0.0))
    # disjoint samples of 3: D = 1, exact two-sided p = 2 / C(6, 3) = 0.1
    assert forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx((0.1, 1.0))
    with pytest.raises(UserError):
        forget_quality([], [1.0])


def test_rouge_recall_f1_and_stemming():
    s = rouge_scores("the cat sat", "the cat sat on the mat")
    assert s["rougeL_recall"] == pytest.approx(0.5)
    assert s["rouge1_recall"] == pytest.approx(0.5)
    assert s["rougeL_f1"] == pytest.approx(2 / 3)
    assert rouge_scores("cats running", "cat run", stemmer=True)["rougeL_recall"] == pytest.approx(1.0)
    assert rouge_scores("cats running", "cat run", stemmer=False)["rougeL_recall"] == 0.0
    # LCS, not bag of words: "b a" vs "a b" shares one in-order token
    assert rouge_scores("b a", "a b")["rougeL_recall"] == pytest.approx(0.5)
    assert rouge_scores("b a", "a b")["rouge1_recall"] == pytest.approx(1.0)


def test_set_metrics_by_hand():
    records = [
        {"avg_gt_loss": math.log(2), "rougeL_recall": 1.0, "rouge1_recall": 1.0, "truth_ratio": 0.5,
         "average_perturb_loss": [math.log(2), math.log(4)]},
        {"avg_gt_loss": math.log(4), "rougeL_recall": 0.0, "rouge1_recall": 0.5, "truth_ratio": 2.0,
         "average_perturb_loss": [math.log(4), math.log(4)]},
    ]  # fmt: skip
    forget = set_metrics("forget", records, normalise_prob=False)
    assert forget["forget_prob"] == pytest.approx((0.5 + 0.25) / 2)
    assert forget["forget_rougeL_recall"] == pytest.approx(0.5)
    assert forget["forget_rouge1_recall"] == pytest.approx(0.75)
    assert forget["forget_truth_ratio"] == pytest.approx(0.5)
    assert forget["forget_answer_loss"] == pytest.approx((math.log(2) + math.log(4)) / 2)
    real = set_metrics("real_authors", records, normalise_prob=True)
    assert real["real_authors_prob"] == pytest.approx((0.4 + 1 / 3) / 2)
    assert real["real_authors_truth_ratio"] == pytest.approx((0.5 + 0.0) / 2)


def test_aggregate_utility_and_forget_quality():
    rec = {"avg_gt_loss": 0.0, "rougeL_recall": 1.0, "rouge1_recall": 1.0, "truth_ratio": 0.5,
           "average_perturb_loss": [0.0]}  # fmt: skip
    items = {name: [rec] for name in ("forget", "retain", "real_authors", "world_facts")}
    out = aggregate(items, reference_ratios=[0.5])
    # retain: rouge 1, prob 1, TR 0.5; the other two: rouge 1, prob 1/2, TR 0.5 -> hmean of nine numbers
    assert out["model_utility"] == pytest.approx(9 / (1 + 1 + 2 + 1 + 2 + 2 + 1 + 2 + 2))
    assert out["forget_quality"] == pytest.approx(1.0)
    assert out["forget_tr_distance"] == pytest.approx(0.0)  # the same ratio on the same question
    assert "model_utility" not in aggregate({"forget": [rec]})
    # another question count: the distributions compare (KS), the questions cannot be paired
    assert "forget_tr_distance" not in aggregate(items, reference_ratios=[0.5, 0.25])


def test_paired_truth_ratio_distance_by_hand():
    e = math.e
    # |ln 1 - ln 1| = 0, |ln e - ln 1| = 1, |ln(1/e) - ln 1| = 1, |ln 2 - ln 4| = ln 2
    assert paired_truth_ratio_distance([1, e, 1 / e, 2], [1, 1, 1, 4]) == pytest.approx((2 + math.log(2)) / 4)
    with pytest.raises(UserError, match="same questions on both sides, got 2 and 3"):
        paired_truth_ratio_distance([1, 2], [1, 2, 3])


def test_muse_helpers_by_hand():
    assert prefix_before("Paris\n\nQuestion: next") == "Paris"
    assert prefix_before("London\nQuestion: x") == "London"
    assert (
        knowmem_prompt("q2", [{"question": "q1", "answer": "a1"}])
        == "Question: q1\nAnswer: a1\n\nQuestion: q2\nAnswer: "
    )
    # lowest int(5 * 0.4) = 2 log-probs are -5 and -4
    assert min_k_score([-1.0, -2.0, -3.0, -4.0, -5.0]) == pytest.approx(4.5)
    assert min_k_score([-2.0]) == pytest.approx(2.0)
    # forget texts with lower scores (more member-like) than every holdout text: AUC 0
    assert membership_auc([1.0, 2.0], [3.0, 4.0]) == pytest.approx(0.0)
    assert membership_auc([3.0, 4.0], [1.0, 2.0]) == pytest.approx(1.0)
    assert membership_auc([1.0, 3.0], [2.0, 4.0]) == pytest.approx(0.25)
    assert privleak(0.25, 0.5) == pytest.approx(-50.0)
    with pytest.raises(UserError):
        privleak(0.3, 0.0)
    items = {"verbmem_f": [{"rougeL_f1": 0.5}, {"rougeL_f1": 0.0}], "privleak_forget": [{"min_k": 1.0}],
             "privleak_holdout": [{"min_k": 2.0}]}  # fmt: skip
    out = muse_aggregate(items, reference_auc=0.5)
    assert out == pytest.approx({"verbmem_f": 25.0, "privleak_auc": 0.0, "privleak": -100.0})


def test_slices_are_equal_sized_and_gather_restores_order():
    items = list(range(5))
    slices = [local_slice(items, EvalDist(r, 2)) for r in range(2)]
    assert [len(s[0]) for s in slices] == [3, 3]
    assert slices[1][1] == [3, 4, None]
    assert gather_in_order([x * 10 for x in slices[0][0]], slices[0][1], EvalDist()) == [0, 10, 20]


def test_truth_ratios_read_back_from_our_output_and_bad_files(tmp_path):
    (tmp_path / "items.json").write_text(json.dumps({"forget": [{"truth_ratio": 0.5}, {"truth_ratio": 2.0}]}))
    assert load_forget_truth_ratios(tmp_path) == [0.5, 2.0]
    (tmp_path / "other.json").write_text(json.dumps({"x": 1}))
    with pytest.raises(UserError, match="neither"):
        load_forget_truth_ratios(tmp_path / "other.json")
    with pytest.raises(UserError, match="not found"):
        load_forget_truth_ratios(tmp_path / "missing.json")
