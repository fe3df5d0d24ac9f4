"""`ngdiff study attack`: the scores of one model, the rows' bookkeeping, and the summary's section with its
comparisons under the study's statistics."""

from __future__ import annotations

import json

import pytest
import torch

from ngdiff.study.attacks import (
    COMPARED,
    YARDSTICK,
    AttackSettings,
    attack_markdown,
    attack_verdicts,
    check_settings,
    score_model,
    selected_model,
)
from ngdiff.study.inference import Comparison
from ngdiff.study.spec import StudyError
from tests.conftest import tofu_rows

SMALL = AttackSettings(relearn_steps=2, relearn_lr=1e-3, relearn_batch_size=2, batch_size=8)


def _model(path):
    from transformers import AutoModelForCausalLM

    from ngdiff.modeling import load_tokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), load_tokenizer(str(path))


def test_a_model_scored_against_itself_as_retain_model_leaks_nothing_and_each_recovery_is_its_difference(
    tiny_model_dir,
):
    from ngdiff.attacks.quantize import quantized
    from ngdiff.attacks.relearn import RelearnConfig, relearning_curve
    from ngdiff.attacks.scoring import Scoring, forget_scores
    from ngdiff.eval.mia import mia_auc, mia_records

    rows = tofu_rows()
    forget, holdout = rows[:6], rows[200:206]
    model, tokenizer = _model(tiny_model_dir)
    retain, _ = _model(tiny_model_dir)
    torch.manual_seed(0)
    scores = score_model(model, tokenizer, retain, str(tiny_model_dir), forget, holdout, SMALL, max_new_tokens=6)
    # the retain model's own Min-K% AUC is the reference: the same model scores PrivLeak 0 exactly
    assert scores["privleak"] == 0.0 and scores["privleak_abs"] == 0.0
    fresh, _ = _model(tiny_model_dir)
    f, h = mia_records(fresh, tokenizer, forget, batch_size=8), mia_records(fresh, tokenizer, holdout, batch_size=8)
    assert scores["mia_loss_auc"] == pytest.approx(mia_auc([r["loss"] for r in f], [r["loss"] for r in h]))
    how = Scoring(6, 8)
    before = forget_scores(fresh, tokenizer, forget, how)["rougeL_recall"]
    with quantized(fresh, "int4"):
        int4 = forget_scores(fresh, tokenizer, forget, how)["rougeL_recall"]
    assert scores["forget_rougeL_recall"] == before
    assert scores["int4_recovery"] == pytest.approx(int4 - before)
    curve = relearning_curve(fresh, tokenizer, str(tiny_model_dir), forget, RelearnConfig(2, 1e-3, 2), how)["curve"]
    assert len(curve) == 3
    assert scores["relearn_recovery"] == pytest.approx(curve[-1]["rougeL_recall"] - curve[0]["rougeL_recall"])


def test_settings_are_checked_and_rows_of_other_settings_are_refused(tmp_path):
    with pytest.raises(StudyError, match="relearn-steps must be positive"):
        AttackSettings(relearn_steps=0)
    with pytest.raises(StudyError, match="relearn-lr must be a positive number"):
        AttackSettings(relearn_lr=float("nan"))
    rows = [{"settings": {**SMALL.__dict__, "relearn_steps": 9}}]
    with pytest.raises(StudyError, match=r"scored with .*relearn_steps': 9"):
        check_settings(rows, SMALL, tmp_path / "attacks.jsonl")
    check_settings([{"settings": dict(SMALL.__dict__)}], SMALL, tmp_path / "attacks.jsonl")


def test_the_selected_point_is_the_kept_model_or_the_target_it_names(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(StudyError, match="no kept weights"):
        selected_model(run)
    (run / "weights" / "selected").mkdir(parents=True)
    (run / "weights" / "selected" / "point.json").write_text(json.dumps({"step": 5}))
    assert selected_model(run) == run / "weights" / "selected"
    (run / "weights" / "selected" / "point.json").write_text(json.dumps({"step": 0, "target": "/w/target"}))
    assert str(selected_model(run)) == "/w/target"


def _rows() -> list[dict]:
    """Two methods x 2 worlds x 4 seeds; `a` leaks less and regains less than `b` by known amounts."""
    rows = []
    for world in ("w0", "w1"):
        rows.append({"world": world, "method": YARDSTICK, "lr": None, "seed": None, "privleak": 0.0})
        for seed in range(4):
            for method, lr, shift in (("a", 0.1, 0.0), ("b", 0.01, 1.0)):
                rows.append(
                    {
                        "world": world,
                        "stage": "confirmation",
                        "method": method,
                        "lr": lr,
                        "seed": seed,
                        "settings": dict(SMALL.__dict__),
                        "forget_items": 40,
                        "privleak": -(5.0 + 10 * shift + seed),
                        "privleak_abs": 5.0 + 10 * shift + seed,
                        "mia_mink_auc": 0.5,
                        "mia_loss_auc": 0.5,
                        "int4_recovery": 0.01 + 0.1 * shift + 0.001 * seed,
                        "relearn_recovery": 0.02 + 0.2 * shift + 0.002 * seed,
                    }
                )
    return rows


def test_the_section_reports_every_method_and_retain_model_and_one_holm_family_of_comparisons():
    rows = _rows()
    comparison = Comparison("a", "b", "best_gap", "greater", 0.1, 0.01)
    found = attack_verdicts(rows, [comparison], n_boot=2000)
    assert [v.comparison.field for v in found] == list(COMPARED)
    assert all(v.comparison.direction == "less" for v in found)
    by_field = {v.comparison.field: v for v in found}
    assert by_field["privleak_abs"].estimate == pytest.approx(-10.0)  # every pair differs by exactly 10
    assert by_field["int4_recovery"].estimate == pytest.approx(-0.1)
    assert by_field["relearn_recovery"].estimate == pytest.approx(-0.2)
    assert all(v.verdict == "supported" and v.n_worlds == 2 and v.n_pairs == 8 for v in found)
    raw = sorted(v.p for v in found)
    assert [v.p_holm for v in sorted(found, key=lambda v: v.p)] == pytest.approx(
        [min(1.0, max((3 - j) * raw[j] for j in range(i + 1))) for i in range(3)]
    )
    text = attack_markdown(rows, [comparison], n_boot=2000)
    assert "## Privacy and attacks (selected points)" in text
    # a: privleak over seeds 0..3 in two worlds = -5..-8 twice: median -6.5, range [-8, -5]
    assert "| a | 8 | -6.5 [-8, -5] | 0.5 [0.5, 0.5] |" in text
    assert f"| {YARDSTICK} (world `w0`) | 1 | 0 |" in text
    assert "Holm over 3" in text and text.count(": supported") == 3


def test_a_comparison_whose_method_was_not_scored_is_left_out():
    rows = [r for r in _rows() if r["method"] != "b"]
    assert attack_verdicts(rows, [Comparison("a", "b", "best_gap", "greater", 0.1, 0.01)]) == []
    assert "Comparisons" not in attack_markdown(rows, [Comparison("a", "b", "best_gap", "greater", 0.1, 0.01)])


def test_the_attack_picture_draws_every_run(tmp_path):
    from ngdiff.study.plots import attacks_plot

    path = attacks_plot(_rows(), tmp_path / "attacks.png", YARDSTICK)
    assert path.read_bytes()[:4] == b"\x89PNG"
