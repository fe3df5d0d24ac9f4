"""MUSE-News evaluation, as `swj0419/muse_bench` computes it (`metrics/verbmem.py`, `knowmem.py`,
`privleak.py`, `logger.py`, `eval.py`).

- VerbMem: greedy continuation (128 new tokens) of each `verbmem/forget` prompt; ROUGE-L F1 (no stemming)
  against the ground truth cut to its first 128 tokens (BOS included, as MUSE tokenises it); mean x 100.
- KnowMem (forget / retain): few-shot prompt `Question: q\\nAnswer: a\\n\\n` over the `*_icl` examples, then
  `Question: q\\nAnswer: `; 32 greedy tokens, cut at the first "\\n\\n", "\\nQuestion" or "Question:";
  ROUGE-L F1 (no stemming) against the answer; mean x 100.
- PrivLeak: Min-40% score of each text, `-mean` of the 40% lowest token log-probabilities; AUC of
  `roc_curve(y, -score)` with forget texts labelled 0 and holdout texts 1 (MUSE's `forget_holdout_Min-40%`);
  PrivLeak = (AUC - AUC_ref) / AUC_ref x 100, AUC_ref from a model never trained on the forget set.

Deviation, for models with a short context: prompts keep their last tokens and texts their first tokens so
that prompt + continuation fits `max_position_embeddings` (MUSE's Llama-2 needs no cut).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ngdiff import MUSE_DIR
from ngdiff.errors import UserError
from ngdiff.eval.generation import generate_greedy_ids, generation_model
from ngdiff.eval.likelihood import sequence_token_logprobs
from ngdiff.eval.rouge import rouge_scores
from ngdiff.eval.sharding import ONE_PROCESS, EvalDist, gather_in_order, local_slice

VERBMEM_TOKENS = 128
KNOWMEM_TOKENS = 32
MIN_K = 0.4
STOP_STRINGS = ("\n\n", "\nQuestion", "Question:")

MUSE_FILES = {
    "verbmem": "verbmem/forget.json",
    "knowmem_forget": "knowmem/forget_qa.json",
    "knowmem_forget_icl": "knowmem/forget_qa_icl.json",
    "knowmem_retain": "knowmem/retain2_qa.json",
    "knowmem_retain_icl": "knowmem/retain2_qa_icl.json",
    "privleak_forget": "privleak/forget.json",
    "privleak_holdout": "privleak/holdout.json",
}


def load_muse(key: str, data_dir: str | Path | None = None, max_items: int = 0) -> list[Any]:
    folder = Path(data_dir) if data_dir else MUSE_DIR
    path = folder / MUSE_FILES[key]
    if not path.is_file():
        raise UserError(f"MUSE file {MUSE_FILES[key]} not found in {folder}")
    data = json.loads(path.read_text())
    return data[:max_items] if max_items > 0 and not key.endswith("_icl") else data


def context_length(model) -> int:
    config = generation_model(model).config
    return int(getattr(config, "max_position_embeddings", 0) or 1 << 30)


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)


def prefix_before(text: str, stops: Sequence[str] = STOP_STRINGS) -> str:
    """MUSE's `get_prefix_before_words_occur`: cut at each stop string in turn."""
    for stop in stops:
        text = text.split(stop)[0]
    return text


def knowmem_prompt(question: str, icl: Sequence[dict[str, str]]) -> str:
    shots = "".join(f"Question: {d['question']}\nAnswer: {d['answer']}\n\n" for d in icl)
    return shots + f"Question: {question}\nAnswer: "


def _generate(model, tokenizer, texts: list[str], max_new_tokens: int, batch_size: int, ed: EvalDist) -> list[str]:
    keep = max(1, context_length(model) - max_new_tokens)
    prompts = [tokenizer(t, add_special_tokens=True)["input_ids"][-keep:] for t in texts]
    return [
        _decode(tokenizer, ids)
        for ids in generate_greedy_ids(model, tokenizer, prompts, max_new_tokens, batch_size, ed.synced)
    ]


def verbmem_items(
    model,
    tokenizer,
    rows: Sequence[dict[str, str]],
    *,
    batch_size: int = 16,
    ed: EvalDist = ONE_PROCESS,
    max_new_tokens: int = VERBMEM_TOKENS,
) -> list[dict[str, Any]]:
    """Per-prompt VerbMem records (prompt omitted: it is the input file's)."""
    local, indices = local_slice(list(rows), ed)
    outputs = _generate(model, tokenizer, [r["prompt"] for r in local], max_new_tokens, batch_size, ed)
    records = []
    for row, output in zip(local, outputs, strict=True):
        gt_short = _decode(tokenizer, tokenizer(row["gt"], add_special_tokens=True)["input_ids"][:max_new_tokens])
        records.append(
            {"gt": gt_short, "response": output, "rougeL_f1": rouge_scores(output, gt_short, False)["rougeL_f1"]}
        )
    return gather_in_order(records, indices, ed)


def knowmem_items(
    model,
    tokenizer,
    rows: Sequence[dict[str, str]],
    icl: Sequence[dict[str, str]],
    *,
    batch_size: int = 16,
    ed: EvalDist = ONE_PROCESS,
    max_new_tokens: int = KNOWMEM_TOKENS,
) -> list[dict[str, Any]]:
    """Per-question KnowMem records."""
    local, indices = local_slice(list(rows), ed)
    texts = [knowmem_prompt(r["question"], icl) for r in local]
    outputs = _generate(model, tokenizer, texts, max_new_tokens, batch_size, ed)
    records = []
    for row, output in zip(local, outputs, strict=True):
        answer = prefix_before(output)
        scores = rouge_scores(answer, str(row["answer"]), stemmer=False)
        records.append(
            {"question": row["question"], "answer": row["answer"], "response": answer, "rougeL_f1": scores["rougeL_f1"]}
        )
    return gather_in_order(records, indices, ed)


def verbmem_row(text: str, prompt_words: int) -> dict[str, str]:
    """One VerbMem item cut from a text: its first `prompt_words` words as the prompt (trailing whitespace
    dropped), the rest as the ground truth, so that prompt + gt is the text. MUSE's prompts are cut from its
    forget articles the same way, with longer prompts (`verbmem/forget.json`); the CPU worlds' texts are short."""
    pieces = re.findall(r"\S+\s*", text)
    prompt = "".join(pieces[:prompt_words]).rstrip()
    return {"prompt": prompt, "gt": text[len(prompt) :]}


def min_k_score(token_logprobs: Sequence[float], ratio: float = MIN_K) -> float:
    """MUSE's `Min-{k}%`: minus the mean of the lowest `int(n * ratio)` token log-probabilities (at least one)."""
    k = max(1, int(len(token_logprobs) * ratio))
    return float(-np.mean(np.sort(np.asarray(token_logprobs, dtype=np.float64))[:k]))


def privleak_items(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    ed: EvalDist = ONE_PROCESS,
    autocast: Callable | None = None,
) -> list[dict[str, Any]]:
    """Min-40% score of each text."""
    local, indices = local_slice(list(texts), ed)
    limit = context_length(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seqs = [tokenizer(t, add_special_tokens=True)["input_ids"][:limit] for t in local]
    logprobs = sequence_token_logprobs(model, seqs, pad_id, batch_size, autocast)
    records = [{"min_k": min_k_score(lp), "tokens": len(lp) + 1} for lp in logprobs]
    return gather_in_order(records, indices, ed)


def membership_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """MUSE's `sweep`: forget labelled 0 ('nonmember' in its code), holdout 1, ROC on minus the score.

    Well below 0.5 means the forget texts look like training data (lower loss) compared with holdout.
    """
    from sklearn.metrics import auc, roc_curve

    scores = np.asarray([*forget_scores, *holdout_scores], dtype=np.float64)
    labels = np.asarray([0] * len(forget_scores) + [1] * len(holdout_scores))
    if len(set(labels.tolist())) < 2:
        raise UserError("PrivLeak needs both forget and holdout texts")
    fpr, tpr, _ = roc_curve(labels, -scores)
    return float(auc(fpr, tpr))


def privleak(auc_value: float, reference_auc: float) -> float:
    """Relative AUC gap in percent; 0 is what a model never trained on the forget set scores."""
    if reference_auc <= 0:
        raise UserError(f"reference AUC must be positive, got {reference_auc}")
    return (auc_value - reference_auc) / reference_auc * 100.0


def load_reference_auc(reference: str | float | None) -> float | None:
    """A number, or an `ngdiff eval --benchmark muse` output (folder or aggregate.json) holding `privleak_auc`."""
    if reference is None or reference == "":
        return None
    if isinstance(reference, (int, float)):
        return float(reference)
    try:
        return float(reference)
    except ValueError:
        pass
    path = Path(reference)
    if path.is_dir():
        path = path / "aggregate.json"
    if not path.is_file():
        raise UserError(f"reference for PrivLeak is neither a number nor an evaluation output: {reference}")
    data = json.loads(path.read_text())
    metrics = data.get("metrics", data)
    if "privleak_auc" not in metrics:
        raise UserError(f"{path}: no privleak_auc (not a MUSE evaluation output)")
    return float(metrics["privleak_auc"])


def evaluate_muse(
    model,
    tokenizer,
    *,
    data_dir: str | Path | None = None,
    max_items: int = 0,
    batch_size: int = 16,
    ed: EvalDist = ONE_PROCESS,
    autocast: Callable | None = None,
    reference_auc: float | None = None,
    verbmem_tokens: int = VERBMEM_TOKENS,
    knowmem_tokens: int = KNOWMEM_TOKENS,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, float]]:
    """(per-item records by task, aggregate metrics) for VerbMem, KnowMem forget/retain and PrivLeak."""

    def load(key: str) -> list[Any]:
        return load_muse(key, data_dir, max_items)

    items: dict[str, list[dict[str, Any]]] = {
        "verbmem_f": verbmem_items(
            model, tokenizer, load("verbmem"), batch_size=batch_size, ed=ed, max_new_tokens=verbmem_tokens
        ),
        "knowmem_f": knowmem_items(
            model,
            tokenizer,
            load("knowmem_forget"),
            load("knowmem_forget_icl"),
            batch_size=batch_size,
            ed=ed,
            max_new_tokens=knowmem_tokens,
        ),
        "knowmem_r": knowmem_items(
            model,
            tokenizer,
            load("knowmem_retain"),
            load("knowmem_retain_icl"),
            batch_size=batch_size,
            ed=ed,
            max_new_tokens=knowmem_tokens,
        ),
        "privleak_forget": privleak_items(
            model, tokenizer, load("privleak_forget"), batch_size=batch_size, ed=ed, autocast=autocast
        ),
        "privleak_holdout": privleak_items(
            model, tokenizer, load("privleak_holdout"), batch_size=batch_size, ed=ed, autocast=autocast
        ),
    }
    return items, muse_aggregate(items, reference_auc)


def muse_aggregate(items: dict[str, list[dict[str, Any]]], reference_auc: float | None = None) -> dict[str, float]:
    out: dict[str, float] = {}
    for task in ("verbmem_f", "knowmem_f", "knowmem_r"):
        if items.get(task):
            out[task] = 100.0 * float(np.mean([r["rougeL_f1"] for r in items[task]]))
    if items.get("privleak_forget") and items.get("privleak_holdout"):
        auc_value = membership_auc(
            [r["min_k"] for r in items["privleak_forget"]], [r["min_k"] for r in items["privleak_holdout"]]
        )
        out["privleak_auc"] = auc_value
        if reference_auc is not None:
            out["privleak"] = privleak(auc_value, reference_auc)
    return out
