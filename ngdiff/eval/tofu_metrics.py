"""TOFU's statistics, exactly as `locuslab/tofu` computes them (`evaluate_util.py`, `aggregate_eval_stat.py`).

Definitions matched:
- truth ratio per question (`eval_perturbation_ratio`): `exp(avg_paraphrased_loss - mean(avg_perturb_loss))`,
  losses length-normalised per answer (summed NLL / answer tokens);
- forget-side statistic: `mean(min(TR, 1/TR))`; retain-side: `mean(max(0, 1 - TR))` (the code writes both
  with `1/TR`, the same numbers);
- probability: `mean(exp(-avg_gt_loss))` on retain/forget, normalised over gold and perturbed answers,
  `p_gold / (p_gold + sum p_perturbed)`, on real authors and world facts;
- forget quality: `scipy.stats.ks_2samp` p-value of the two models' forget-set truth ratios;
- paired truth-ratio distance (ours, not TOFU's): mean over questions of |ln TR - ln TR_retain|, each
  question against the retain model's ratio on the same question; where the KS test compares the two
  distributions, this compares question by question (0: every answer is judged as the retain model does);
- model utility: `scipy.stats.hmean` of the nine retain / real-authors / world-facts numbers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ngdiff.errors import UserError

# A diverged model's losses can differ by thousands of nats: its ratio saturates at e^±700 (finite, so JSON and
# the paired log distance stay defined) where TOFU's numpy code would give inf or 0. Every TOFU statistic is
# unchanged by this (min(TR, 1/TR) and max(0, 1 - TR) are 0 either way, the KS test uses ranks only).
LOG_TRUTH_RATIO_BOUND = 700.0


def truth_ratio(paraphrased_mean_loss: float, perturbed_mean_losses: Sequence[float]) -> float:
    """P(perturbed) / P(paraphrased) with geometric-mean token probabilities; < 1 means the model prefers
    the true (paraphrased) answer."""
    log_ratio = paraphrased_mean_loss - float(np.mean(perturbed_mean_losses))
    return math.exp(min(max(log_ratio, -LOG_TRUTH_RATIO_BOUND), LOG_TRUTH_RATIO_BOUND))


def forget_truth_ratio_stat(ratios: Sequence[float]) -> float:
    """Forget side: 1 when the model cannot tell true from false, near 0 when it strongly prefers either."""
    r = np.asarray(ratios, dtype=np.float64)
    return float(np.mean(np.minimum(r, 1.0 / r)))


def retain_truth_ratio_stat(ratios: Sequence[float]) -> float:
    """Retain side: how strongly the true answer is preferred (0 when not at all)."""
    r = np.asarray(ratios, dtype=np.float64)
    return float(np.mean(np.maximum(0.0, 1.0 - r)))


def normalised_probability(gold_mean_loss: float, perturbed_mean_losses: Sequence[float]) -> float:
    """Probability of the gold answer among gold + perturbed ones (per-token geometric means), as a softmax
    over negative losses: the same number as `p_gold / (p_gold + sum p_perturbed)`, and defined when every
    probability underflows (a diverged model)."""
    from scipy.special import softmax

    return float(softmax(-np.asarray([gold_mean_loss, *perturbed_mean_losses], dtype=np.float64))[0])


def forget_quality(unlearned_ratios: Sequence[float], reference_ratios: Sequence[float]) -> tuple[float, float]:
    """(p-value, KS statistic) of the two-sample KS test; a high p-value means indistinguishable from the
    reference (retain-only) model."""
    from scipy.stats import ks_2samp

    if len(unlearned_ratios) == 0 or len(reference_ratios) == 0:
        raise UserError("forget quality needs truth ratios from both models; one side has none")
    result = ks_2samp(np.asarray(unlearned_ratios), np.asarray(reference_ratios))
    return float(result.pvalue), float(result.statistic)


def paired_truth_ratio_distance(unlearned_ratios: Sequence[float], reference_ratios: Sequence[float]) -> float:
    """Mean |ln TR_i - ln TR_ref_i| over the same questions in the same order (log: a ratio twice too high
    and one half too low are as far off)."""
    if len(unlearned_ratios) != len(reference_ratios) or not unlearned_ratios:
        raise UserError(
            f"a paired truth-ratio distance needs the same questions on both sides, got {len(unlearned_ratios)} "
            f"and {len(reference_ratios)}"
        )
    a, b = np.asarray(unlearned_ratios, dtype=np.float64), np.asarray(reference_ratios, dtype=np.float64)
    return float(np.mean(np.abs(np.log(a) - np.log(b))))


def model_utility(values: Sequence[float]) -> float:
    """Harmonic mean (0 when any component is 0, which scipy's hmean also returns)."""
    from scipy.stats import hmean

    arr = np.asarray(values, dtype=np.float64)
    if np.any(arr <= 0):
        return 0.0
    return float(hmean(arr))


# ---------------------------------------------------------------------- reading truth ratios back


def legacy_truth_ratios(log: dict) -> list[float]:
    """Per-question truth ratios recomputed from a legacy TOFU `eval_log_forget.json` (keys sorted as ints)."""
    keys = sorted(log["paraphrased_loss"], key=int)
    ratios = []
    for k in keys:
        para = log["paraphrased_loss"][k] / log["num_token_paraphrased"][k]
        perturbed = np.asarray(log["perturb_loss"][k], dtype=np.float64) / np.asarray(log["num_token_perturb"][k])
        ratios.append(truth_ratio(para, perturbed))
    return ratios


def load_forget_truth_ratios(path: str | Path) -> list[float]:
    """Forget-set truth ratios from an evaluation output of ours (the folder or its `items.json`), a legacy
    TOFU `eval_log_forget.json`, TOFU's combined `eval_log_aggregated.json`-style file, or an
    open-unlearning `TOFU_EVAL.json` (its retain models' published logs)."""
    path = Path(path)
    if path.is_dir():
        path = path / (
            "items.json"
            if (path / "items.json").is_file() or not (path / "TOFU_EVAL.json").is_file()
            else "TOFU_EVAL.json"
        )
    if not path.is_file():
        raise UserError(f"evaluation output not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON: {err}") from err
    if isinstance(data, dict) and "eval_log_forget.json" in data:
        data = data["eval_log_forget.json"]
    if isinstance(data, dict) and "paraphrased_loss" in data:
        return legacy_truth_ratios(data)
    if isinstance(data, dict) and isinstance(data.get("forget"), list):
        return [float(item["truth_ratio"]) for item in data["forget"]]
    from ngdiff.eval.open_unlearning_format import is_open_unlearning_log, reference_truth_ratios

    if is_open_unlearning_log(data):
        return reference_truth_ratios(data, str(path))
    raise UserError(
        f"{path}: neither an `ngdiff eval --benchmark tofu` output (items.json with a forget list), "
        "a legacy TOFU eval_log_forget.json, nor an open-unlearning TOFU_EVAL.json"
    )
