"""Memorisation of the forget answers under teacher forcing, as open-unlearning defines it
(src/evals/metrics/memorization.py: `exact_memorization`, `extraction_strength`).

Both read the greedy (argmax) next token at each answer position but the last (the EOS prediction),
given the true prefix; 1 means the answer is reproduced token for token.
"""

from __future__ import annotations

from collections.abc import Sequence


def exact_memorization(preds: Sequence[int], labels: Sequence[int]) -> float | None:
    """Fraction of answer positions whose argmax is the answer token; None without any answer token
    (open-unlearning marks such an item None and leaves it out of the mean)."""
    if not labels:
        return None
    return sum(int(p == t) for p, t in zip(preds, labels, strict=True)) / len(labels)


def extraction_strength(preds: Sequence[int], labels: Sequence[int]) -> float:
    """1 - k/n for the smallest k from which every argmax matches the answer (the longest correctly
    predicted suffix, as a fraction of the answer).

    Matches open-unlearning's loop exactly, including its edge: when not even the last token matches, its
    loop ends at k = n - 1, so the score is 1/n, not 0; and an empty answer scores 0.
    """
    n = len(labels)
    if n == 0:
        return 0.0
    k = 0
    for k in range(n):
        if list(preds[k:]) == list(labels[k:]):
            break
    return 1 - k / n
