"""open-unlearning's TOFU evaluation logs, read and written, so results compare with its leaderboard
without re-running its retain models.

Its evaluator (src/evals/base.py `Evaluator.evaluate`, src/evals/metrics/base.py) writes two files:
`TOFU_EVAL.json`, one entry per metric keyed by the metric's config name (configs/eval/tofu_metrics/
*.yaml `@package` lines), each `{"agg_value": x, "value_by_index": {"<item index>": {...}}}` (the MIAs:
`{"forget": {...}, "holdout": {...}, "auc": x, "agg_value": x}`, src/evals/metrics/mia/utils.py); and
`TOFU_SUMMARY.json`, `{metric: agg_value}`. A retain model's TOFU_EVAL.json is what its forget quality
(`forget_truth_ratio` scores) and PrivLeak (`mia_min_k` AUC) take as `retain_logs_path`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ngdiff.errors import UserError
from ngdiff.eval.mia import METRIC_KEYS

SET_PREFIXES = {"forget": "forget", "retain": "retain", "real_authors": "ra", "world_facts": "wf"}
TRUTH_RATIO_KEYS = {  # open-unlearning spells the forget one differently (forget_Truth_Ratio.yaml's package)
    "forget": "forget_truth_ratio",
    "retain": "retain_Truth_Ratio",
    "real_authors": "ra_Truth_Ratio",
    "world_facts": "wf_Truth_Ratio",
}
MIA_KEYS = {  # our record field -> open-unlearning metric
    "loss": "mia_loss",
    "zlib": "mia_zlib",
    "min_k": "mia_min_k",
    "min_k_plus_plus": "mia_min_k_plus_plus",
    "gradnorm": "mia_gradnorm",
    "reference": "mia_reference",
}
SCALARS = {  # our metric -> open-unlearning metric with only an agg_value
    "forget_quality": "forget_quality",
    "model_utility": "model_utility",
    "privleak": "privleak",
}


def is_open_unlearning_log(data: Any) -> bool:
    """Whether `data` (a parsed JSON file) is an open-unlearning TOFU_EVAL.json with forget truth ratios."""
    return isinstance(data, dict) and isinstance(data.get("forget_truth_ratio"), dict)


def _read(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "TOFU_EVAL.json"
    if not path.is_file():
        raise UserError(f"open-unlearning log not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON: {err}") from err


def reference_truth_ratios(log: dict[str, Any], where: str = "the log") -> list[float]:
    """The forget-set truth ratios of a retain model's TOFU_EVAL.json, in item order (what its
    privacy.py `ks_test` compares against)."""
    entry = log.get("forget_truth_ratio")
    if not isinstance(entry, dict) or not isinstance(entry.get("value_by_index"), dict):
        raise UserError(f"{where}: no forget_truth_ratio.value_by_index (not a TOFU_EVAL.json of open-unlearning)")
    by_index = entry["value_by_index"]
    return [float(by_index[k]["score"]) for k in sorted(by_index, key=int)]


def reference_min_k_auc(log: dict[str, Any]) -> float | None:
    """The retain model's Min-K% AUC (privleak.yaml reads `mia_min_k` of the retain logs), None if absent."""
    entry = log.get("mia_min_k")
    if isinstance(entry, dict) and entry.get("agg_value") is not None:
        return float(entry["agg_value"])
    return None


def load_privleak_reference(reference: str | Path | None) -> float | None:
    """PrivLeak's retain-model AUC from `--reference`: an open-unlearning TOFU_EVAL.json / TOFU_SUMMARY.json,
    or an `ngdiff eval` output (its aggregate.json's `mia_mink_auc`); None when the file holds none."""
    if not reference:
        return None
    path = Path(reference)
    candidates = [path / "TOFU_EVAL.json", path / "aggregate.json"] if path.is_dir() else [path]
    for file in candidates:
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError:
            return None
        if isinstance(data, dict) and isinstance(data.get("mia_min_k"), dict):
            return reference_min_k_auc(data)
        if isinstance(data, dict) and isinstance(data.get("mia_min_k"), (int, float)):  # TOFU_SUMMARY.json
            return float(data["mia_min_k"])
        metrics = data.get("metrics", {}) if isinstance(data, dict) else {}
        if file.name == "items.json" and (file.parent / "aggregate.json").is_file():
            metrics = json.loads((file.parent / "aggregate.json").read_text()).get("metrics", {})
        if isinstance(metrics, dict) and "mia_mink_auc" in metrics:
            return float(metrics["mia_mink_auc"])
    return None


def _by_index(values: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {str(i): v for i, v in enumerate(values)}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def to_open_unlearning(items: dict[str, list[dict[str, Any]]], metrics: dict[str, float]) -> dict[str, Any]:
    """Our per-item records and metrics as a TOFU_EVAL.json of open-unlearning (the metrics it has).

    Items are indexed by their position in the set (open-unlearning indexes them by dataset row, the
    same numbers for the bundled TOFU files). The paraphrased-question set has no open-unlearning name
    (it runs the whole suite again with `question_key: paraphrased_question`) and is left out.
    """
    out: dict[str, Any] = {}
    for name, prefix in SET_PREFIXES.items():
        records = items.get(name) or []
        if not records:
            continue
        probs = [{"prob": math.exp(-r["avg_gt_loss"]), "avg_loss": r["avg_gt_loss"]} for r in records]
        out[f"{prefix}_Q_A_Prob"] = {"agg_value": _mean([p["prob"] for p in probs]), "value_by_index": _by_index(probs)}
        if f"{name}_prob" in metrics and name in ("real_authors", "world_facts"):
            out[f"{prefix}_Q_A_Prob_normalised"] = {"agg_value": metrics[f"{name}_prob"]}
        if "rougeL_recall" in records[0]:
            rouge = [
                {
                    "rouge1_recall": r["rouge1_recall"],
                    "rougeL_recall": r["rougeL_recall"],
                    "input": r["question"],
                    "ground_truth": r["answer"],
                    "generation": r.get("generated_text", ""),
                }
                for r in records
            ]
            out[f"{prefix}_Q_A_ROUGE"] = {
                "agg_value": _mean([x["rougeL_recall"] for x in rouge]),
                "value_by_index": _by_index(rouge),
            }
        if "truth_ratio" in records[0]:
            if name in ("forget", "retain"):
                para = [
                    {"prob": math.exp(-r["avg_paraphrased_loss"]), "avg_loss": r["avg_paraphrased_loss"]}
                    for r in records
                ]
                out[f"{prefix}_Q_A_PARA_Prob"] = {
                    "agg_value": _mean([p["prob"] for p in para]),
                    "value_by_index": _by_index(para),
                }
            pert = [
                {"prob": [math.exp(-x) for x in r["average_perturb_loss"]], "avg_loss": r["average_perturb_loss"]}
                for r in records
            ]
            out[f"{prefix}_Q_A_PERT_Prob"] = {
                "agg_value": _mean([_mean(p["prob"]) for p in pert]),
                "value_by_index": _by_index(pert),
            }
            out[TRUTH_RATIO_KEYS[name]] = {
                "agg_value": metrics.get(f"{name}_truth_ratio"),
                "value_by_index": _by_index([{"score": r["truth_ratio"]} for r in records]),
            }
    forget, holdout = items.get("mia_forget") or [], items.get("mia_holdout") or []
    for field, key in MIA_KEYS.items():
        ours = METRIC_KEYS[field]
        if forget and field in forget[0] and ours in metrics:
            sides = {
                side: {
                    "agg_value": _mean([r[field] for r in records]),
                    "value_by_index": _by_index([{"score": r[field]} for r in records]),
                }
                for side, records in (("forget", forget), ("holdout", holdout))
            }
            out[key] = {**sides, "auc": metrics[ours], "agg_value": metrics[ours]}
    for field in ("extraction_strength", "exact_memorization"):
        if forget and field in metrics:
            out[field] = {
                "agg_value": metrics[field],
                "value_by_index": _by_index([{"score": r[field]} for r in forget]),
            }
    for ours, key in SCALARS.items():
        if ours in metrics:
            out[key] = {"agg_value": metrics[ours]}
    return out


def summary_of(log: dict[str, Any]) -> dict[str, Any]:
    """TOFU_SUMMARY.json: every metric's agg_value (src/evals/base.py `Evaluator.summarize`)."""
    return {k: v["agg_value"] for k, v in log.items() if isinstance(v, dict) and v.get("agg_value") is not None}


def write_open_unlearning(
    folder: str | Path, items: dict[str, list[dict[str, Any]]], metrics: dict[str, float]
) -> Path:
    """Write TOFU_EVAL.json and TOFU_SUMMARY.json into `folder`; returns the folder."""
    from ngdiff.eval.report import _clean

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    log = to_open_unlearning(items, metrics)
    (folder / "TOFU_EVAL.json").write_text(json.dumps(_clean(log), indent=4))
    (folder / "TOFU_SUMMARY.json").write_text(json.dumps(_clean(summary_of(log)), indent=4))
    return folder
