"""Format-shift attack: the forget questions asked with their paraphrases (`paraphrased_question`, as
open-unlearning's `question_key: paraphrased_question`) and in the other prompt formats the project
knows (`ngdiff.data.tokenize.PROMPT_PRESETS`): knowledge suppressed only for the trained wording or
template shows up again under another."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ngdiff.attacks.scoring import Scoring, forget_scores


def format_variants(tokenizer, rows: Sequence[dict[str, Any]], trained_template: str) -> dict[str, tuple[list, str]]:
    """name -> (rows, prompt template) of every variant, the trained format first."""
    from ngdiff.data.tokenize import PROMPT_PRESETS
    from ngdiff.eval.tofu import paraphrased_rows

    variants: dict[str, tuple[list, str]] = {"trained format": (list(rows), trained_template)}
    if para := paraphrased_rows(rows):
        variants["paraphrased questions"] = (para, trained_template)
    for template in PROMPT_PRESETS:
        if template == trained_template or (template == "chat" and not tokenizer.chat_template):
            continue
        variants[f"template {template or 'default'}"] = (list(rows), template)
    return variants


def format_shift(model, tokenizer, rows: Sequence[dict[str, Any]], how: Scoring) -> dict[str, dict[str, float]]:
    return {
        name: forget_scores(model, tokenizer, variant_rows, how, template)
        for name, (variant_rows, template) in format_variants(tokenizer, rows, how.prompt_template).items()
    }
