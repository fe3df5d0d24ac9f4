"""TOFU PrivLeak, as open-unlearning computes it (src/evals/metrics/privacy.py `privleak`, configured in
configs/eval/tofu_metrics/privleak.yaml): the relative gap between the unlearned model's Min-K% AUC
(forget vs holdout) and the retain model's, after flipping both AUCs to MUSE's orientation.

With open-unlearning's AUC convention (`mia.mia_auc`: 1 when the forget answers look much more like
training data than the holdout ones) PrivLeak = ((1 - auc) - (1 - ref)) / (1 - ref) * 100: 0 is what a
model never trained on the forget set scores; strongly negative means the forget set still leaks
membership; positive means over-unlearning. This is MUSE's `privleak` (`ngdiff.eval.muse.privleak`) on
the flipped AUCs, so it reuses that formula.
"""

from __future__ import annotations

from ngdiff.errors import UserError

DEFAULT_REFERENCE_AUC = 0.5  # privleak.yaml `ref_value`: what open-unlearning uses without retain-model logs


def tofu_privleak(auc: float, reference_auc: float = DEFAULT_REFERENCE_AUC) -> float:
    """PrivLeak in percent of a Min-K% AUC against the retain model's (both in open-unlearning's convention)."""
    from ngdiff.eval.muse import privleak

    if reference_auc >= 1:
        raise UserError(f"PrivLeak reference AUC must be below 1, got {reference_auc}")
    return privleak(1 - auc, 1 - reference_auc)
