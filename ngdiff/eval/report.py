"""Evaluation outputs: `items.json` (per item), `aggregate.json` (metrics + how they were made), `summary.md`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# display order and labels of the summary table; anything else follows alphabetically
LABELS = {
    "forget_quality": "Forget quality (KS p-value)",
    "model_utility": "Model utility",
    "verbmem_f": "VerbMem on forget (ROUGE-L F1 x100)",
    "knowmem_f": "KnowMem on forget (ROUGE-L F1 x100)",
    "knowmem_r": "KnowMem on retain (ROUGE-L F1 x100)",
    "privleak": "PrivLeak (%)",
    "privleak_auc": "Min-40% AUC forget vs holdout",
}


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def summary_markdown(benchmark: str, metrics: dict[str, float], meta: dict[str, Any]) -> str:
    rows = [k for k in LABELS if k in metrics] + sorted(k for k in metrics if k not in LABELS)
    lines = [f"# {benchmark.upper()} evaluation", ""]
    lines += [f"- {k}: `{v}`" for k, v in meta.items()]
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {LABELS.get(k, k)} | {metrics[k]:.6g} |" for k in rows]
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
