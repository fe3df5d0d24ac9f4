"""What every attack measures on forget rows before and after: TOFU's forget-set numbers (greedy ROUGE-L /
ROUGE-1 recall against the gold answer, answer loss, probability, truth ratio when perturbed answers
exist), from `ngdiff.eval.tofu.evaluate_rows` and `set_metrics`, so they equal `ngdiff eval`'s."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ngdiff.eval.sharding import ONE_PROCESS, EvalDist


@dataclass(frozen=True)
class Scoring:
    max_new_tokens: int = 200
    batch_size: int = 16
    prompt_template: str = ""
    ed: EvalDist = ONE_PROCESS


def forget_scores(
    model, tokenizer, rows: Sequence[dict[str, Any]], how: Scoring, template: str | None = None
) -> dict[str, float]:
    """The forget-set numbers of `rows` (keys without the `forget_` prefix), on every rank."""
    from ngdiff.eval.tofu import evaluate_rows, set_metrics

    records = evaluate_rows(
        model,
        tokenizer,
        rows,
        max_new_tokens=how.max_new_tokens,
        batch_size=how.batch_size,
        ed=how.ed,
        prompt_template=how.prompt_template if template is None else template,
    )
    return {k.removeprefix("forget_"): v for k, v in set_metrics("forget", records, False).items()}
