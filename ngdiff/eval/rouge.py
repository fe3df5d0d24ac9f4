"""ROUGE scores as TOFU and MUSE compute them (package rouge-score).

TOFU (`evaluate_util.eval_rouge_recall`) scores with Porter stemming and reports recall; MUSE
(`metrics/logger.py::RougeEvalLogger`) scores without stemming and reports the F-measure. Both pass
the reference first: `scorer.score(target, prediction)`.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=2)
def _scorer(stemmer: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=stemmer)


def rouge_scores(prediction: str, reference: str, stemmer: bool = True) -> dict[str, float]:
    """rouge1/rougeL recall and F1 of one prediction against its reference.

    `stemmer=True` is TOFU's setting, `False` MUSE's.
    """
    scores = _scorer(stemmer).score(reference, prediction)
    return {
        "rouge1_recall": scores["rouge1"].recall,
        "rougeL_recall": scores["rougeL"].recall,
        "rouge1_f1": scores["rouge1"].fmeasure,
        "rougeL_f1": scores["rougeL"].fmeasure,
    }
