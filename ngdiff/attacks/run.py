"""`ngdiff attack`'s work: each attack on the model and, when given, on the retain model (the yardstick);
`attack.json` and `attack.png` in the output folder. Order: format shift and quantization (which leave
the weights as they were), then relearning (which changes them)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ngdiff.attacks.quantize import SCHEMES, quantized
from ngdiff.attacks.relearn import RelearnConfig, relearning_curve
from ngdiff.attacks.scoring import Scoring, forget_scores
from ngdiff.attacks.shift import format_shift

ATTACKS = ("shift", "quantize", "relearn")


def attack_one(
    model,
    tokenizer,
    model_path: str,
    rows: Sequence[dict[str, Any]],
    attacks: Sequence[str],
    cfg: RelearnConfig,
    how: Scoring,
    state_dir: Path,
) -> dict[str, Any]:
    """Every attack in `attacks` on one model (every rank calls this)."""
    out: dict[str, Any] = {}
    if "shift" in attacks:
        out["format_shift"] = format_shift(model, tokenizer, rows, how)
    if "quantize" in attacks:
        out["quantization"] = {"none": forget_scores(model, tokenizer, rows, how)}
        for scheme in SCHEMES:
            with quantized(model, scheme):
                out["quantization"][scheme] = forget_scores(model, tokenizer, rows, how)
    if "relearn" in attacks:
        out["relearning"] = relearning_curve(
            model, tokenizer, model_path, rows, cfg, how, state_dir / "relearn_state.pt"
        )
    return out


def write_report(folder: Path, report: dict[str, Any]) -> Path:
    """attack.json and attack.png (rank 0)."""
    from ngdiff.eval.report import _clean

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "attack.json.tmp"
    tmp.write_text(json.dumps(_clean(report), indent=1))
    tmp.replace(folder / "attack.json")
    plot_attacks(report, folder / "attack.png")
    return folder


def plot_attacks(report: dict[str, Any], path: Path, metric: str = "rougeL_recall") -> None:
    """One panel per attack: forget ROUGE-L recall of the model and the retain model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in ("model", "retain_model") if m in report["results"]]
    panels = [a for a in ("relearning", "quantization", "format_shift") if a in report["results"][models[0]]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    labels = {"model": "attacked model", "retain_model": "retain model"}
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "relearning":
            for m in models:
                curve = report["results"][m]["relearning"]["curve"]
                ax.plot([p["step"] for p in curve], [p[metric] for p in curve], marker="o", label=labels[m])
            ax.set_xlabel("relearning step")
            ax.set_title("Relearning: held-out forget rows")
        else:
            names = list(report["results"][models[0]][panel])
            width = 0.8 / len(models)
            for j, m in enumerate(models):
                values = [report["results"][m][panel][n][metric] for n in names]
                ax.bar([i + j * width for i in range(len(names))], values, width, label=labels[m])
            ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(names))])
            ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
            ax.set_title("Quantization (RTN)" if panel == "quantization" else "Format shift")
        ax.set_ylabel("forget ROUGE-L recall")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
