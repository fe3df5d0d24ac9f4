"""The CPU world's calibration: a tokenizer that knows only the training text, the figures that say
whether the world sits in TOFU's regime, and the bounds a world spec may hold them to.

Why the tokenizer matters: truth ratios compare the likelihood of paraphrased and perturbed answers,
which no model is ever trained on. A BPE trained on those answers gives their words tokens whose input
embeddings stay at their random initialisation, so the ratios partly measure untrained embeddings.
The world's BPE is therefore trained on the fine-tuning texts only, then pruned to the tokens that
fine-tuning text actually produces: a merge whose token is always absorbed into a longer one is dropped,
so an evaluation word the models never read falls back to pieces they did read (at worst to its bytes).

The figures (TOFU's released models, locuslab/tofu, for scale: target-vs-retain KS distance about
0.40 at forget01, the retain model's forget ROUGE-L about 0.41, model utility 0.63):
- `unseen_token_share`: of the forget set's paraphrased and perturbed answer tokens, the share never
  seen as a token of either model's training text;
- `d_target_retain`: KS distance of the target's forget truth ratios to the retain model's;
- `retain_forget_rougeL`: the retain model's forget ROUGE-L recall (fluent but wrong answers score > 0);
- `target_utility`, `retain_utility` and `utility_gap` = |target - retain|;
- `truncated_share`: the share of forget answers longer than the generation cap (`max_new_tokens`),
  whose ROUGE-L the cap cuts, not the model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import fields
from typing import Any

from ngdiff.data.tokenize import plain_prompt, qa_ids, tagged
from ngdiff.study.spec import CalibrationBounds, StudyError

Row = dict[str, Any]


def training_text(row: Row, template: str = "") -> str:
    """One fine-tuning pair as the text the models read (the plain or a tagged prompt, then the answer)."""
    parts = tagged(template, row["question"])
    if parts is None:
        return f"{plain_prompt(row['question'])} {row['answer']}"
    return parts[0] + parts[1] + row["answer"]


def training_token_ids(tokenizer, rows: Iterable[Row], template: str = "") -> set[int]:
    """Every token id fine-tuning on `rows` feeds the model (prompt and answer, as ngdiff.data encodes them)."""
    seen: set[int] = set()
    for row in rows:
        prompt, answer = qa_ids(tokenizer, row["question"], row["answer"], template)
        seen.update(prompt, answer)
    return seen


def train_world_tokenizer(rows: Sequence[Row], vocab_size: int, template: str = ""):
    """A byte-level BPE trained on the fine-tuning pairs `rows` only, pruned until every merged token
    occurs in their encoding (the 256 byte tokens and the special tokens stay: the fallback)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from ngdiff.modeling import train_tokenizer

    tokenizer = train_tokenizer([training_text(r, template) for r in rows], vocab_size)
    while True:
        state = json.loads(tokenizer.backend_tokenizer.to_str())
        model = state["model"]
        merged = {a + b for a, b in model["merges"]}
        by_id = {i: t for t, i in model["vocab"].items()}
        dead = {by_id[i] for i in set(by_id) - training_token_ids(tokenizer, rows, template)} & merged
        if not dead:
            return tokenizer
        base = set(model["vocab"]) - merged  # bytes and special tokens
        kept = [(a, b) for a, b in model["merges"] if a + b not in dead]
        while True:  # a merge of a dropped token can never fire: drop it too
            present = base | {a + b for a, b in kept}
            closed = [(a, b) for a, b in kept if a in present and b in present]
            if len(closed) == len(kept):
                break
            kept = closed
        tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if t in present]
        model["vocab"] = {t: i for i, t in enumerate(tokens)}
        model["merges"] = [list(m) for m in kept]
        for added in state["added_tokens"]:
            added["id"] = model["vocab"][added["content"]]
        core = Tokenizer.from_str(json.dumps(state))
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def answer_token_ids(tokenizer, question: str, answer: str, template: str = "") -> list[int]:
    """The answer's tokens as the evaluation scores them (without the closing EOS)."""
    ids = qa_ids(tokenizer, question, answer, template)[1]
    return ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id else ids


def unseen_token_share(tokenizer, seen: set[int], eval_rows: Iterable[Row], template: str = "") -> float:
    """Share of the tokens of `eval_rows`' paraphrased and perturbed answers that are not in `seen`."""
    total = unseen = 0
    for row in eval_rows:
        answers = [row[k] for k in ("paraphrased_answer",) if k in row] + list(row.get("perturbed_answer", []))
        for answer in answers:
            ids = answer_token_ids(tokenizer, row["question"], answer, template)
            total += len(ids)
            unseen += sum(1 for i in ids if i not in seen)
    return unseen / total if total else 0.0


def answer_lengths(tokenizer, rows: Iterable[Row], template: str = "") -> list[int]:
    return [len(answer_token_ids(tokenizer, r["question"], r["answer"], template)) for r in rows]


def truncated_share(lengths: Sequence[int], max_new_tokens: int) -> float:
    """Share of answers longer than the generation cap (their greedy continuation is cut)."""
    return sum(1 for n in lengths if n > max_new_tokens) / len(lengths) if lengths else 0.0


def calibration_figures(
    target: dict[str, float], retain: dict[str, float], unseen_share: float, truncated: float
) -> dict[str, float | None]:
    """The figures world.json keeps, from the two models' evaluations and the tokenizer's two shares."""

    def number(metrics: dict[str, float], key: str) -> float | None:
        value = metrics.get(key)
        return float(value) if isinstance(value, (int, float)) else None

    target_utility, retain_utility = number(target, "model_utility"), number(retain, "model_utility")
    gap = abs(target_utility - retain_utility) if None not in (target_utility, retain_utility) else None
    return {
        "unseen_token_share": unseen_share,
        "d_target_retain": number(target, "forget_ks_statistic"),
        "retain_forget_rougeL": number(retain, "forget_rougeL_recall"),
        "target_forget_rougeL": number(target, "forget_rougeL_recall"),
        "target_utility": target_utility,
        "retain_utility": retain_utility,
        "utility_gap": gap,
        "truncated_share": truncated,
    }


# bound key -> (figure, kind): a [low, high] range or a maximum
BOUNDS = {
    "d_target_retain": ("d_target_retain", "range"),
    "retain_forget_rougeL": ("retain_forget_rougeL", "range"),
    "utility_gap_max": ("utility_gap", "max"),
    "unseen_token_share_max": ("unseen_token_share", "max"),
    "truncated_share_max": ("truncated_share", "max"),
}


def check_bounds(bounds: CalibrationBounds) -> None:
    """Each declared range is two numbers, low <= high; each maximum is a number, not negative."""

    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    for key, (_, kind) in BOUNDS.items():
        value = getattr(bounds, key)
        if kind == "range" and value and (len(value) != 2 or not all(map(number, value)) or value[0] > value[1]):
            raise StudyError(f"world.calibration.{key} must be [low, high] with low <= high, got {list(value)}")
        if kind == "max" and value is not None and (not number(value) or value < 0):
            raise StudyError(f"world.calibration.{key} must be a number >= 0, got {value!r}")


def calibration_errors(figures: dict[str, float | None], bounds: CalibrationBounds) -> list[str]:
    """One phrase per figure outside its declared bound (a figure that could not be computed fails too)."""
    errors = []
    for key in (f.name for f in fields(CalibrationBounds)):
        figure, kind = BOUNDS[key]
        bound = getattr(bounds, key)
        if (kind == "range" and not bound) or (kind == "max" and bound is None):
            continue
        value = figures.get(figure)
        if value is None:
            errors.append(f"{figure} unknown (bound {key})")
        elif kind == "range" and not bound[0] <= value <= bound[1]:
            errors.append(f"{figure} = {value:.3g} outside [{bound[0]:g}, {bound[1]:g}]")
        elif kind == "max" and value > bound:
            errors.append(f"{figure} = {value:.3g} above {bound:g}")
    return errors


def assert_calibrated(figures: dict[str, float | None], bounds: CalibrationBounds, where: str) -> None:
    errors = calibration_errors(figures, bounds)
    if errors:
        raise StudyError(
            f"{where}: the world is outside its declared bounds (world.calibration): {'; '.join(errors)} "
            "(world.json keeps every figure; widen a bound, or change the world and build it elsewhere)"
        )
