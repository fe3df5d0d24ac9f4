"""Evaluation outputs: `items.json` (per item), `aggregate.json` (metrics + how they were made), `summary.md`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# display order and labels of the summary table; anything else follows alphabetically, labelled by `label`
LABELS = {
    "forget_quality": "Forget quality (KS p-value)",
    "model_utility": "Model utility",
    "verbmem_f": "VerbMem on forget (ROUGE-L F1 x100)",
    "knowmem_f": "KnowMem on forget (ROUGE-L F1 x100)",
    "knowmem_r": "KnowMem on retain (ROUGE-L F1 x100)",
    "privleak": "PrivLeak (%)",
    "privleak_auc": "Min-40% AUC forget vs holdout",
    "privleak_reference_auc": "PrivLeak reference: retain model's Min-40% AUC",
    "mia_loss_auc": "MIA LOSS AUC (forget vs holdout)",
    "mia_zlib_auc": "MIA ZLib AUC",
    "mia_mink_auc": "MIA Min-40% AUC",
    "mia_minkpp_auc": "MIA Min-40%++ AUC",
    "mia_gradnorm_auc": "MIA GradNorm AUC",
    "mia_reference_auc": "MIA Reference AUC",
    "extraction_strength": "Extraction strength (forget)",
    "exact_memorization": "Exact memorisation (forget)",
}


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


SET_LABELS = {
    "forget_para": "Forget (paraphrased questions)",
    "forget": "Forget",
    "retain": "Retain",
    "real_authors": "Real authors",
    "world_facts": "World facts",
}
METRIC_LABELS = {
    "answer_loss": "answer loss",
    "rougeL_recall": "ROUGE-L recall",
    "rouge1_recall": "ROUGE-1 recall",
    "prob": "probability",
    "truth_ratio": "truth ratio",
    "ks_statistic": "KS statistic",
}


def label(key: str) -> str:
    """A metric's name in the summary: one style (sentence case, words), whatever the key's form."""
    if key in LABELS:
        return LABELS[key]
    for prefix, set_label in SET_LABELS.items():
        rest = key.removeprefix(prefix + "_")
        if rest != key and rest in METRIC_LABELS:
            return f"{set_label} {METRIC_LABELS[rest]}"
    words = key.replace("_", " ")
    return words[:1].upper() + words[1:]


def summary_markdown(benchmark: str, metrics: dict[str, float], meta: dict[str, Any]) -> str:
    """Title, how the numbers were made, the table (label, value, key in aggregate.json), and what was
    not computed and why (`meta["not computed"]`: metric -> reason)."""
    rows = [k for k in LABELS if k in metrics] + sorted(k for k in metrics if k not in LABELS)
    missing = meta.get("not computed") or {}
    lines = [f"# {benchmark.upper()} evaluation", ""]
    lines += [f"- {k}: `{v}`" for k, v in meta.items() if k != "not computed"]
    lines += ["", "| metric | value | key |", "|---|---|---|"]
    lines += [f"| {label(k)} | {metrics[k]:.6g} | `{k}` |" for k in rows]
    if missing:
        lines += ["", "Not computed:"]
        lines += [f"- {label(k)}: {reason}" for k, reason in missing.items()]
    return "\n".join(lines) + "\n"


def write_outputs(
    output_dir: str | Path,
    benchmark: str,
    items: dict[str, list[dict[str, Any]]],
    metrics: dict[str, float],
    meta: dict[str, Any],
) -> Path:
    """Write the three files (rank 0 only: the caller decides); returns the folder."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "items.json").write_text(json.dumps(_clean(items), indent=1))
    aggregate = {"benchmark": benchmark, "meta": meta, "metrics": metrics}
    (folder / "aggregate.json").write_text(json.dumps(_clean(aggregate), indent=1))
    (folder / "summary.md").write_text(summary_markdown(benchmark, metrics, meta))
    return folder
