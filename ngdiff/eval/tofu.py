"""TOFU evaluation of a model: per-question records and the benchmark's aggregate numbers.

Per question (as TOFU's `get_all_evals`): greedy generation scored by ROUGE recall against the gold
answer, the gold answer's loss, the paraphrased answer's loss and each perturbed answer's loss. Prompts
use the training format (`ngdiff.data.tokenize`, with the run's `data.prompt_template`), so what is
evaluated is what was trained.
TOFU's four evaluation sets: the forget split's `*_perturbed` file, `retain_perturbed`, `real_authors`
and `world_facts` (the latter two compare the gold answer itself with the perturbed ones).
Beside them, as open-unlearning's TOFU suite (configs/eval/tofu.yaml): the forget set asked with its
`paraphrased_question`s (set `forget_para`: ROUGE and truth ratio, open-unlearning's `question_key:
paraphrased_question`), and membership inference / memorisation of the forget set against a holdout
set (`ngdiff.eval.mia`; sets `mia_forget`, `mia_holdout`): TOFU's matching holdout split by default.
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
    paired_truth_ratio_distance,
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


def holdout_file(split: str, data_dir: str | Path | None = None) -> Path:
    """TOFU's holdout split matching a forget split (forget01 -> holdout01: authors the TOFU models never saw)."""
    return (Path(data_dir) if data_dir else TOFU_DIR) / f"{split.replace('forget', 'holdout')}.jsonl"


def load_holdout(path: str | Path, max_items: int = 0) -> list[dict[str, Any]]:
    """Question/answer rows of a holdout file (`--holdout`), the first `max_items` if > 0."""
    from ngdiff.data import load_records

    if not Path(path).is_file():
        raise UserError(f"--holdout {path}: file not found")
    rows = load_records(str(path), ("question", "answer"), "--holdout")
    return rows[:max_items] if max_items > 0 else rows


def paraphrased_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows asked with their `paraphrased_question` (empty when any row lacks one)."""
    if not rows or not all(r.get("paraphrased_question") for r in rows):
        return []
    return [{**r, "question": r["paraphrased_question"]} for r in rows]


def tofu_split_of(source: str) -> str | None:
    """The TOFU forget split a training source names: file stem `forget10` or hub `locuslab/TOFU:forget10`."""
    name = Path(source).stem if looks_like_local_path(source) else [*source.split(":"), ""][1]
    return name if name in FORGET_SPLITS else None


UTILITY_SETS = (
    TofuSet("retain", "retain_perturbed.jsonl", "paraphrased_answer", False),
    TofuSet("real_authors", "real_authors_perturbed.jsonl", "answer", True),
    TofuSet("world_facts", "world_facts_perturbed.jsonl", "answer", True),
)
COMPANION_KEYS = ("paraphrased_answer", "perturbed_answer")  # what truth ratio and forget quality need


UTILITY_NAMES = frozenset(s.name for s in UTILITY_SETS)


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


def companion_file(path: Path) -> Path | None:
    """TOFU's naming: `forget01.jsonl`'s paraphrased and perturbed answers are in `forget01_perturbed.jsonl`."""
    candidate = path.with_name(f"{path.stem}_perturbed{path.suffix}")
    return candidate if candidate.is_file() else None


def custom_sets(forget: str | None, retain: str | None) -> list[tuple[TofuSet, Path]]:
    """The user's own splits (question/answer JSON or JSONL), each read from its `*_perturbed` companion
    when one sits beside it (then truth ratio, and with a reference forget quality, can be computed)."""
    sets = []
    for name, file in (("forget", forget), ("retain", retain)):
        if not file:
            continue
        path = Path(file).expanduser()
        if not path.is_file():
            raise UserError(f"--{name} {file}: file not found")
        source = companion_file(path) or path
        sets.append((TofuSet(name, source.name, "paraphrased_answer", False), source))
    return sets


def read_custom_rows(tofu_set: TofuSet, path: Path, max_items: int = 0) -> list[dict[str, Any]]:
    from ngdiff.data import load_records

    rows = load_records(str(path), ("question", "answer"), f"--{tofu_set.name}")
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
    progress: str = "",
) -> list[dict[str, Any]]:
    """Per-question TOFU records for `rows` (question, answer [, base_key, perturbed_answer]).

    Every rank calls this with the same rows and gets every record back (rank r computes slice r).
    Rows without perturbed answers get ROUGE and answer loss only. A non-empty `progress` names a
    progress bar (rank 0) over this rank's items.
    """
    local, indices = local_slice(list(rows), ed)
    has_perturbed = bool(local) and all("perturbed_answer" in r for r in local)
    stages = int(generate) + 1 + 2 * int(has_perturbed)
    bar = ItemProgress(progress if ed.rank == 0 else "", len(local), stages)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [prompt_ids(tokenizer, r["question"], prompt_template) for r in local]
    records: list[dict[str, Any]] = [{"question": r["question"], "answer": r["answer"]} for r in local]

    if generate:
        outputs = generate_greedy_ids(
            model, tokenizer, prompts, max_new_tokens, batch_size, ed.synced, on_batch=bar.stage_batch
        )
        for rec, out in zip(records, outputs, strict=True):
            rec["generated_text"] = tokenizer.decode(out, skip_special_tokens=True)
            scores = rouge_scores(rec["generated_text"], rec["answer"], stemmer=True)
            rec["rouge1_recall"], rec["rougeL_recall"] = scores["rouge1_recall"], scores["rougeL_recall"]

    def losses(answers: list[str], questions: list[str], per_item: float = 1):
        pairs = [qa_ids(tokenizer, q, a, prompt_template) for q, a in zip(questions, answers, strict=True)]
        on_batch = bar.stage_batch if per_item == 1 else lambda n: bar.stage_batch(n / per_item)
        prompt_list, targets = [p for p, _ in pairs], [t for _, t in pairs]
        return answer_losses(model, prompt_list, targets, pad_id, batch_size, autocast, on_batch=on_batch)

    questions = [r["question"] for r in local]
    for rec, loss in zip(records, losses([r["answer"] for r in local], questions), strict=True):
        rec.update(gt_loss=loss.loss, num_token_gt=loss.tokens, avg_gt_loss=loss.mean)

    if has_perturbed:
        for rec, loss in zip(records, losses([r.get(base_key, r["answer"]) for r in local], questions), strict=True):
            rec.update(paraphrased_loss=loss.loss, num_token_paraphrased=loss.tokens, avg_paraphrased_loss=loss.mean)
        flat_answers = [a for r in local for a in r["perturbed_answer"]]
        flat_questions = [r["question"] for r in local for _ in r["perturbed_answer"]]
        per_item = len(flat_answers) / max(len(local), 1)
        flat = iter(losses(flat_answers, flat_questions, per_item))
        for rec, row in zip(records, local, strict=True):
            mine = [next(flat) for _ in row["perturbed_answer"]]
            rec["perturb_loss"] = [x.loss for x in mine]
            rec["num_token_perturb"] = [x.tokens for x in mine]
            rec["average_perturb_loss"] = [x.mean for x in mine]
            rec["truth_ratio"] = truth_ratio(rec["avg_paraphrased_loss"], rec["average_perturb_loss"])
    bar.close()
    return gather_in_order(records, indices, ed)


class ItemProgress:
    """A tqdm bar over a set's items (items/s) when named; each of the `stages` passes over the items
    (generation, gold-answer loss, paraphrased loss, perturbed losses) moves it by 1/stages per item."""

    def __init__(self, name: str, items: int, stages: int):
        self.bar = None
        self.weight = 1.0 / max(stages, 1)
        if name and items:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=items, desc=name, unit="item", dynamic_ncols=True, bar_format=BAR_FORMAT)

    def stage_batch(self, items: float) -> None:
        if self.bar is not None:
            self.bar.update(items * self.weight)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.n = self.bar.total  # float steps may fall short by rounding
            self.bar.close()


BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"


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
        stat = forget_truth_ratio_stat if name.startswith("forget") else retain_truth_ratio_stat
        out[f"{name}_truth_ratio"] = stat(ratios)
    return out


def aggregate(
    items: dict[str, list[dict[str, Any]]],
    reference_ratios: Sequence[float] | None = None,
    reference_auc: float | None = None,
) -> dict[str, float]:
    """All sets' numbers, model utility (when the three utility sets are present), forget quality
    (when reference truth ratios are given), and the membership-inference / memorisation numbers (when
    the items hold `mia_forget` and `mia_holdout`; `reference_auc`: PrivLeak's retain-model AUC)."""
    from ngdiff.eval.mia import mia_metrics

    normalise = {s.name: s.normalise_prob for s in UTILITY_SETS}
    out: dict[str, float] = {}
    for name, records in items.items():
        if not name.startswith("mia_"):
            out.update(set_metrics(name, records, normalise.get(name, False)))
    out.update(mia_metrics(items.get("mia_forget") or [], items.get("mia_holdout") or [], reference_auc))
    parts = [f"{s.name}_{m}" for s in UTILITY_SETS for m in ("rougeL_recall", "prob", "truth_ratio")]
    if all(p in out for p in parts):
        out["model_utility"] = model_utility([out[p] for p in parts])
    if reference_ratios is not None and "forget_truth_ratio" in out:  # else `missing_metrics` says why
        ratios = [r["truth_ratio"] for r in items["forget"]]
        pvalue, statistic = forget_quality(ratios, reference_ratios)
        out["forget_quality"] = pvalue
        out["forget_ks_statistic"] = statistic
        if len(ratios) == len(reference_ratios):  # the same questions: comparable one by one
            out["forget_tr_distance"] = paired_truth_ratio_distance(ratios, reference_ratios)
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
    custom: Sequence[tuple[TofuSet, Path]] = (),
    progress: bool = False,
    holdout: str | Path | None = None,
    gradnorm: bool = False,
    reference_model=None,
    reference_auc: float | None = None,
    light: bool = False,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, float]]:
    """(per-item records by set, aggregate metrics) for the forget split and the three utility sets,
    or, when `custom` (from `custom_sets`) is given, for those sets only; plus the forget set asked with
    paraphrased questions and, against `holdout` (default for a TOFU split: its matching holdout split),
    the membership-inference and memorisation metrics (`mia_records`: `gradnorm`, `reference_model`).

    `light`: the cheap evaluation of a point inside a run. The forget sets are scored by likelihood only
    (truth ratio, forget quality, KS distance, probability: no generation, so no ROUGE) and membership
    inference is skipped; the utility sets are scored in full, as model utility needs their ROUGE. Not a
    TOFU protocol (locuslab/tofu evaluates once, with config/eval_everything.yaml): ngdiff's cost cut for
    points inside a run; every number it keeps is computed exactly as the full evaluation computes it."""
    if custom:
        sets = [(tofu_set, read_custom_rows(tofu_set, path, max_items)) for tofu_set, path in custom]
    else:
        sets = [(tofu_set, load_rows(tofu_set, data_dir, max_items)) for tofu_set in tofu_sets(split)]
        if holdout is None and holdout_file(split, data_dir).is_file():
            holdout = holdout_file(split, data_dir)
    forget_rows = next((rows for tofu_set, rows in sets if tofu_set.name == "forget"), [])
    if para := paraphrased_rows(forget_rows):
        sets.append((TofuSet("forget_para", "paraphrased_question", "paraphrased_answer", False), para))
    items: dict[str, list[dict[str, Any]]] = {}
    for tofu_set, rows in sets:
        generate = not light or tofu_set.name in UTILITY_NAMES
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
            generate=generate,
            progress=f"{tofu_set.name} ({tofu_set.file})" if progress else "",
        )
    if holdout and forget_rows and not light:
        from ngdiff.eval.mia import mia_records

        mia_args = dict(
            prompt_template=prompt_template,
            batch_size=batch_size,
            ed=ed,
            autocast=autocast,
            gradnorm=gradnorm,
            reference_model=reference_model,
        )
        items["mia_forget"] = mia_records(model, tokenizer, forget_rows, **mia_args)
        items["mia_holdout"] = mia_records(model, tokenizer, load_holdout(holdout, max_items), **mia_args)
    return items, aggregate(items, reference_ratios, reference_auc)


def missing_metrics(items: dict[str, list[dict[str, Any]]], metrics: dict[str, float]) -> dict[str, str]:
    """Why a TOFU headline number is absent, keyed by the metric, in words a user can act on."""
    reasons = {}
    forget = items.get("forget") or []
    if forget and "forget_truth_ratio" not in metrics:
        reasons["forget_truth_ratio"] = (
            "the forget rows have no paraphrased_answer / perturbed_answer (TOFU keeps them in a "
            "`<split>_perturbed.jsonl` file beside the split; put one beside yours)"
        )
    if forget and "forget_quality" not in metrics:
        reasons["forget_quality"] = (
            "needs the forget truth ratios (above)"
            if "forget_truth_ratio" not in metrics
            else "needs --reference, the retain model's evaluation output or a TOFU log (eval_log_forget.json)"
        )
    if forget and "mia_loss_auc" not in metrics:
        reasons["mia_loss_auc"] = "membership inference needs a holdout set: --holdout FILE (question/answer rows)"
    elif forget:
        if "mia_gradnorm_auc" not in metrics:
            reasons["mia_gradnorm_auc"] = "needs an unsharded model outside training (one backward pass per item)"
        if "mia_reference_auc" not in metrics:
            reasons["mia_reference_auc"] = "needs --reference-model DIR (e.g. the retain model)"
    if forget and "forget_para_rougeL_recall" not in metrics:
        reasons["forget_para_rougeL_recall"] = "the forget rows have no paraphrased_question"
    if "model_utility" not in metrics:
        reasons["model_utility"] = (
            "needs the retain, real_authors and world_facts sets with perturbed answers (`--split` evaluates them)"
        )
    return reasons


def qa_metrics(
    model,
    tokenizer,
    rows: Sequence[dict[str, Any]],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: str = "",
) -> dict[str, float]:
    """Mean ROUGE-L / ROUGE-1 recall of greedy answers and mean length-normalised answer loss of plain
    question/answer rows (one process): what the demo reports for its forget and retain sets."""
    records = evaluate_rows(
        model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
    )
    if not records:
        return {"rougeL_recall": 0.0, "rouge1_recall": 0.0, "answer_loss": 0.0}
    n = len(records)
    return {
        "rougeL_recall": sum(r["rougeL_recall"] for r in records) / n,
        "rouge1_recall": sum(r["rouge1_recall"] for r in records) / n,
        "answer_loss": sum(r["avg_gt_loss"] for r in records) / n,
    }
