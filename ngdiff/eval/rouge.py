"""ROUGE scores as TOFU and MUSE compute them (package rouge-score, Porter stemming)."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def rouge_scores(prediction: str, reference: str) -> dict[str, float]:
    """rouge1/rougeL recall (TOFU) and F1 (MUSE) of one prediction against its reference."""
    scores = _scorer().score(reference, prediction)
    return {
        "rouge1_recall": scores["rouge1"].recall,
        "rougeL_recall": scores["rougeL"].recall,
        "rouge1_f1": scores["rouge1"].fmeasure,
        "rougeL_f1": scores["rougeL"].fmeasure,
    }
