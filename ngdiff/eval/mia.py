"""Membership inference of the forget set against a holdout set, as open-unlearning computes it
(src/evals/metrics/mia/: loss.py, zlib.py, min_k.py, min_k_plus_plus.py, gradnorm.py, reference.py,
utils.py `mia_auc`; k = 0.4 and p = 2 as in configs/eval/tofu_metrics/mia_*.yaml).

Each attack gives every item a score signed like a loss (higher: less likely a member); the AUC is
`sklearn.metrics.roc_auc_score` with forget labelled 0 and holdout 1, so 1 means the forget answers look
far more like training data than the holdout ones, and about 0.5 means the attack cannot tell them apart
(what a model never trained on either scores). Items are question/answer pairs scored on the answer
tokens, prompted as in training (`ngdiff.data.tokenize.qa_ids`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ngdiff.errors import UserError
from ngdiff.eval.likelihood import answer_grad_norms, answer_token_stats
from ngdiff.eval.memorization import exact_memorization, extraction_strength
from ngdiff.eval.muse import min_k_score
from ngdiff.eval.privacy import DEFAULT_REFERENCE_AUC, tofu_privleak
from ngdiff.eval.sharding import ONE_PROCESS, EvalDist, gather_in_order, local_slice

MIN_K = 0.4  # configs/eval/tofu_metrics/mia_min_k.yaml and mia_min_k_plus_plus.yaml `k`
GRADNORM_P = 2.0  # configs/eval/tofu_metrics/mia_gradnorm.yaml `p`
ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus", "gradnorm", "reference")
METRIC_KEYS = {  # attack -> key in the evaluation metrics
    "loss": "mia_loss_auc",
    "zlib": "mia_zlib_auc",
    "min_k": "mia_mink_auc",
    "min_k_plus_plus": "mia_minkpp_auc",
    "gradnorm": "mia_gradnorm_auc",
    "reference": "mia_reference_auc",
}


def zlib_score(avg_loss: float, text: str) -> float:
    """zlib.py: the answer's mean loss over its zlib-compressed length in bytes (Carlini et al. 2021)."""
    return avg_loss / len(zlib.compress(text.encode("utf-8")))


def min_k_plus_plus_score(
    token_logprobs: Sequence[float], mu: Sequence[float], sigma: Sequence[float], ratio: float = MIN_K
) -> float:
    """min_k_plus_plus.py: Min-K% of the token log-probabilities standardised by the model's own
    distribution at each position, (log p(x_t) - mu_t) / sqrt(sigma_t), sigma clamped at 1e-6."""
    if len(token_logprobs) == 0:
        return 0.0
    lp, m = np.asarray(token_logprobs, dtype=np.float64), np.asarray(mu, dtype=np.float64)
    s = np.sqrt(np.maximum(np.asarray(sigma, dtype=np.float64), 1e-6))
    return min_k_score((lp - m) / s, ratio)


def mink_score(token_logprobs: Sequence[float], ratio: float = MIN_K) -> float:
    """min_k.py: minus the mean of the lowest max(1, int(n k)) token log-probabilities; 0 without tokens
    (the same definition as MUSE's Min-K%, so it reuses `ngdiff.eval.muse.min_k_score`)."""
    return min_k_score(token_logprobs, ratio) if len(token_logprobs) else 0.0


def mia_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """utils.py `mia_auc`: ROC AUC with forget labelled 0, holdout 1, on the loss-signed scores."""
    from sklearn.metrics import roc_auc_score

    if not forget_scores or not holdout_scores:
        raise UserError("membership inference needs both forget and holdout items")
    labels = np.asarray([0] * len(forget_scores) + [1] * len(holdout_scores))
    return float(roc_auc_score(labels, np.asarray([*forget_scores, *holdout_scores], dtype=np.float64)))


def mia_records(
    model,
    tokenizer,
    rows: Sequence[dict[str, Any]],
    *,
    prompt_template: str = "",
    batch_size: int = 16,
    ed: EvalDist = ONE_PROCESS,
    autocast: Callable | None = None,
    gradnorm: bool = True,
    reference_model=None,
) -> list[dict[str, Any]]:
    """Per item (question, answer): every attack's score, and exact memorisation / extraction strength.

    Every rank calls this with the same rows and gets every record back. `gradnorm` needs a backward
    pass per item on an unsharded model (leave it off under sharded engines and inside training, where
    it would clobber the gradients: open-unlearning's gradnorm.py warns the same). With a
    `reference_model`, its loss gives the Reference attack and its own Min-K% score (`ref_min_k`), from
    which the retain model's AUC for PrivLeak follows.
    """
    from ngdiff.data.tokenize import qa_ids

    local, indices = local_slice(list(rows), ed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs = [qa_ids(tokenizer, r["question"], r["answer"], prompt_template) for r in local]
    prompts, answers = [p for p, _ in pairs], [a for _, a in pairs]
    stats = answer_token_stats(model, prompts, answers, pad_id, batch_size, autocast)
    records = []
    for st, answer in zip(stats, answers, strict=True):
        text = tokenizer.decode(answer, skip_special_tokens=True)
        records.append(
            {
                "avg_loss": st.avg_loss,
                "loss": st.avg_loss,
                "zlib": zlib_score(st.avg_loss, text),
                "min_k": mink_score(st.token_logprobs),
                "min_k_plus_plus": min_k_plus_plus_score(st.token_logprobs, st.mu, st.sigma),
                "exact_memorization": exact_memorization(st.preds, st.labels),
                "extraction_strength": extraction_strength(st.preds, st.labels),
            }
        )
    if gradnorm:
        for rec, norm in zip(records, answer_grad_norms(model, prompts, answers, pad_id, GRADNORM_P), strict=True):
            rec["gradnorm"] = norm
    if reference_model is not None:
        ref_stats = answer_token_stats(reference_model, prompts, answers, pad_id, batch_size, autocast)
        for rec, ref in zip(records, ref_stats, strict=True):
            rec["reference"] = rec["avg_loss"] - ref.avg_loss  # reference.py: target loss - reference loss
            rec["ref_min_k"] = mink_score(ref.token_logprobs)
    return gather_in_order(records, indices, ed)


def mia_metrics(
    forget: Sequence[dict[str, Any]], holdout: Sequence[dict[str, Any]], reference_auc: float | None = None
) -> dict[str, float]:
    """The AUC of every attack both sides scored, PrivLeak, and the forget set's memorisation means.

    PrivLeak's reference is, in this order: `reference_auc` (a retain model's logged Min-K% AUC), the
    reference model's own Min-K% AUC on these items, else open-unlearning's default 0.5.
    """
    if not forget or not holdout:
        return {}
    out = {}
    for attack in ATTACKS:
        if attack in forget[0] and attack in holdout[0]:
            out[METRIC_KEYS[attack]] = mia_auc([r[attack] for r in forget], [r[attack] for r in holdout])
    if reference_auc is None and "ref_min_k" in forget[0] and "ref_min_k" in holdout[0]:
        reference_auc = mia_auc([r["ref_min_k"] for r in forget], [r["ref_min_k"] for r in holdout])
    out["privleak_reference_auc"] = DEFAULT_REFERENCE_AUC if reference_auc is None else reference_auc
    out["privleak"] = tofu_privleak(out["mia_mink_auc"], out["privleak_reference_auc"])
    em = [r["exact_memorization"] for r in forget if r["exact_memorization"] is not None]
    out["exact_memorization"] = float(np.mean(em)) if em else 0.0
    out["extraction_strength"] = float(np.mean([r["extraction_strength"] for r in forget]))
    return out
