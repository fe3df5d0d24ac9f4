"""TOFU evaluation of a model: per-question records and the benchmark's aggregate numbers.

Per question (as TOFU's `get_all_evals`): greedy generation scored by ROUGE recall against the gold
answer, the gold answer's loss, the paraphrased answer's loss and each perturbed answer's loss. Prompts
use the training format (`ngdiff.data.tokenize`, with the run's `data.prompt_template`), so what is
evaluated is what was trained.
TOFU's four evaluation sets: the forget split's `*_perturbed` file, `retain_perturbed`, `real_authors`
and `world_facts` (the latter two compare the gold answer itself with the perturbed ones).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ngdiff import TOFU_DIR
from ngdiff.data.records import looks_like_local_path
from ngdiff.data.tokenize import prompt_ids, qa_ids
from ngdiff.errors import UserError
from ngdiff.eval.generation import generate_greedy_ids
from ngdiff.eval.likelihood import answer_losses
from ngdiff.eval.rouge import rouge_scores
from ngdiff.eval.sharding import ONE_PROCESS, EvalDist, gather_in_order, local_slice
from ngdiff.eval.tofu_metrics import (
    forget_quality,
    forget_truth_ratio_stat,
    model_utility,
    normalised_probability,
    retain_truth_ratio_stat,
    truth_ratio,
)


@dataclass(frozen=True)
class TofuSet:
    """One TOFU evaluation set: which file, which answer the truth ratio compares against."""

    name: str  # metric prefix: forget, retain, real_authors, world_facts
    file: str
    base_key: str  # TOFU's base_answer_key
    normalise_prob: bool  # TOFU normalises the probability over gold + perturbed answers


FORGET_SPLITS = ("forget01", "forget05", "forget10")
DS_SIZE = 300  # TOFU's eval_everything.yaml `ds_size`: the published logs score the first 300 items of each set
MAX_NEW_TOKENS = 200  # TOFU's eval generation length (`generation.max_length: 200`)


def tofu_split_of(source: str) -> str | None:
    """The TOFU forget split a training source names: file stem `forget10` or hub `locuslab/TOFU:forget10`."""
    name = Path(source).stem if looks_like_local_path(source) else [*source.split(":"), ""][1]
    return name if name in FORGET_SPLITS else None


UTILITY_SETS = (
    TofuSet("retain", "retain_perturbed.jsonl", "paraphrased_answer", False),
    TofuSet("real_authors", "real_authors_perturbed.jsonl", "answer", True),
    TofuSet("world_facts", "world_facts_perturbed.jsonl", "answer", True),
)


def tofu_sets(split: str) -> list[TofuSet]:
    if split not in FORGET_SPLITS:
        raise UserError(f"unknown TOFU split {split!r}; choose one of: {', '.join(FORGET_SPLITS)}")
    return [TofuSet("forget", f"{split}_perturbed.jsonl", "paraphrased_answer", False), *UTILITY_SETS]


def load_rows(tofu_set: TofuSet, data_dir: str | Path | None = None, max_items: int = 0) -> list[dict[str, Any]]:
    """Rows of one evaluation file from `data_dir` (else the bundled copy), the first `max_items` if > 0."""
    folder = Path(data_dir) if data_dir else TOFU_DIR
    path = folder / tofu_set.file
    if not path.is_file():
        raise UserError(
            f"TOFU file {tofu_set.file} not found in {folder} "
            "(leave --data-dir / eval.data_dir empty for the bundled forget01/05/10 and utility sets)"
        )
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:max_items] if max_items > 0 else rows


def evaluate_rows(
    model,
    tokenizer,
    rows: Sequence[dict[str, Any]],
    base_key: str = "paraphrased_answer",
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 16,
    ed: EvalDist = ONE_PROCESS,
    autocast: Callable | None = None,
    generate: bool = True,
    prompt_template: str = "",
) -> list[dict[str, Any]]:
    """Per-question TOFU records for `rows` (question, answer [, base_key, perturbed_answer]).

    Every rank calls this with the same rows and gets every record back (rank r computes slice r).
    Rows without perturbed answers get ROUGE and answer loss only.
    """
    local, indices = local_slice(list(rows), ed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [prompt_ids(tokenizer, r["question"], prompt_template) for r in local]
    records: list[dict[str, Any]] = [{"question": r["question"], "answer": r["answer"]} for r in local]

    if generate:
        outputs = generate_greedy_ids(model, tokenizer, prompts, max_new_tokens, batch_size, ed.synced)
        for rec, out in zip(records, outputs, strict=True):
            rec["generated_text"] = tokenizer.decode(out, skip_special_tokens=True)
            scores = rouge_scores(rec["generated_text"], rec["answer"], stemmer=True)
            rec["rouge1_recall"], rec["rougeL_recall"] = scores["rouge1_recall"], scores["rougeL_recall"]

    def losses(answers: list[str], questions: list[str]):
        pairs = [qa_ids(tokenizer, q, a, prompt_template) for q, a in zip(questions, answers, strict=True)]
        return answer_losses(model, [p for p, _ in pairs], [t for _, t in pairs], pad_id, batch_size, autocast)

    questions = [r["question"] for r in local]
    for rec, loss in zip(records, losses([r["answer"] for r in local], questions), strict=True):
        rec.update(gt_loss=loss.loss, num_token_gt=loss.tokens, avg_gt_loss=loss.mean)

    has_perturbed = bool(local) and all("perturbed_answer" in r for r in local)
    if has_perturbed:
        for rec, loss in zip(records, losses([r.get(base_key, r["answer"]) for r in local], questions), strict=True):
            rec.update(paraphrased_loss=loss.loss, num_token_paraphrased=loss.tokens, avg_paraphrased_loss=loss.mean)
        flat_answers = [a for r in local for a in r["perturbed_answer"]]
        flat_questions = [r["question"] for r in local for _ in r["perturbed_answer"]]
        flat = iter(losses(flat_answers, flat_questions))
        for rec, row in zip(records, local, strict=True):
            mine = [next(flat) for _ in row["perturbed_answer"]]
            rec["perturb_loss"] = [x.loss for x in mine]
            rec["num_token_perturb"] = [x.tokens for x in mine]
            rec["average_perturb_loss"] = [x.mean for x in mine]
            rec["truth_ratio"] = truth_ratio(rec["avg_paraphrased_loss"], rec["average_perturb_loss"])
    return gather_in_order(records, indices, ed)


def set_metrics(name: str, records: Sequence[dict[str, Any]], normalise_prob: bool) -> dict[str, float]:
    """One evaluation set's aggregate numbers, keyed `<set>_<metric>`."""
    if not records:
        return {}

    def mean(key: str) -> float:
        return sum(r[key] for r in records) / len(records)

    out = {f"{name}_answer_loss": mean("avg_gt_loss")}
    if "rougeL_recall" in records[0]:
        out[f"{name}_rougeL_recall"] = mean("rougeL_recall")
        out[f"{name}_rouge1_recall"] = mean("rouge1_recall")
    if normalise_prob:
        probs = [normalised_probability(r["avg_gt_loss"], r["average_perturb_loss"]) for r in records]
    else:
        probs = [math.exp(-r["avg_gt_loss"]) for r in records]
    out[f"{name}_prob"] = sum(probs) / len(probs)
    if "truth_ratio" in records[0]:
        ratios = [r["truth_ratio"] for r in records]
        stat = forget_truth_ratio_stat if name == "forget" else retain_truth_ratio_stat
        out[f"{name}_truth_ratio"] = stat(ratios)
    return out


def aggregate(
    items: dict[str, list[dict[str, Any]]], reference_ratios: Sequence[float] | None = None
) -> dict[str, float]:
    """All sets' numbers, model utility (when the three utility sets are present) and forget quality
    (when reference truth ratios are given)."""
    normalise = {s.name: s.normalise_prob for s in UTILITY_SETS}
    out: dict[str, float] = {}
    for name, records in items.items():
        out.update(set_metrics(name, records, normalise.get(name, False)))
    parts = [f"{s.name}_{m}" for s in UTILITY_SETS for m in ("rougeL_recall", "prob", "truth_ratio")]
    if all(p in out for p in parts):
        out["model_utility"] = model_utility([out[p] for p in parts])
    if reference_ratios is not None and items.get("forget"):
        pvalue, statistic = forget_quality([r["truth_ratio"] for r in items["forget"]], reference_ratios)
        out["forget_quality"] = pvalue
        out["forget_ks_statistic"] = statistic
    return out


def evaluate_tofu(
    model,
    tokenizer,
    split: str = "forget01",
    *,
    data_dir: str | Path | None = None,
    max_items: int = DS_SIZE,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 16,
    ed: EvalDist = ONE_PROCESS,
    autocast: Callable | None = None,
    reference_ratios: Sequence[float] | None = None,
    prompt_template: str = "",
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, float]]:
    """(per-item records by set, aggregate metrics) for the forget split and the three utility sets."""
    items: dict[str, list[dict[str, Any]]] = {}
    for tofu_set in tofu_sets(split):
        rows = load_rows(tofu_set, data_dir, max_items)
        items[tofu_set.name] = evaluate_rows(
            model,
            tokenizer,
            rows,
            tofu_set.base_key,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            ed=ed,
            autocast=autocast,
            prompt_template=prompt_template,
        )
    return items, aggregate(items, reference_ratios)


def qa_metrics(
    model, tokenizer, rows: Sequence[dict[str, Any]], max_new_tokens: int = 64, batch_size: int = 16
) -> dict[str, float]:
    """Mean ROUGE-L / ROUGE-1 recall of greedy answers and mean length-normalised answer loss of plain
    question/answer rows (one process): what the demo reports for its forget and retain sets."""
    records = evaluate_rows(model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size)
    if not records:
        return {"rougeL_recall": 0.0, "rouge1_recall": 0.0, "answer_loss": 0.0}
    n = len(records)
    return {
        "rougeL_recall": sum(r["rougeL_recall"] for r in records) / n,
        "rouge1_recall": sum(r["rouge1_recall"] for r in records) / n,
        "answer_loss": sum(r["avg_gt_loss"] for r in records) / n,
    }
