"""`sequence.png`: how every forget set and the retain set fare over the requests (matplotlib, Agg).

One panel per headline metric (ROUGE-L recall of greedy answers, answer loss, truth ratio when computed;
VerbMem for MUSE cells): x is the model (before any request, then after request 1, 2, ...), one line per
forget set with a star where its own request came, and the retain set's line alongside (black, dashed;
KnowMem on the retain QA beside VerbMem).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ngdiff.eval.report import METRIC_LABELS

PANELS = ("verbmem", "rougeL_recall", "answer_loss", "truth_ratio")
DIRECTION = {
    "verbmem": "forget: lower is more forgotten",
    "rougeL_recall": "forget: lower is more forgotten",
    "answer_loss": "forget: higher is more forgotten",
    "truth_ratio": "as TOFU reports it",
}
LABELS = {**METRIC_LABELS, "verbmem": "VerbMem"}
RETAIN_LINE = {"verbmem": ("knowmem", "retain KnowMem")}  # MUSE cells: utility is another metric


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def plot_sequence(record: dict[str, Any], output: str | Path) -> Path:
    """Draw `record` (sequence.json's content) into the PNG `output`, written whole or not at all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    t = len(record["requests"])
    panels = [m for m in PANELS if f"forget_{m}" in record["matrix"]]
    figure, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.2 * max(len(panels), 1), 4.2), squeeze=False)
    xs = list(range(t + 1))
    for axis, metric in zip(axes[0], panels, strict=False):
        key = f"forget_{metric}"
        before, rows = record["before"]["forget"].get(key, [None] * t), record["matrix"][key]
        for j in range(t):
            ys = [_number(before[j])] + [_number(rows[i][j]) for i in range(t)]
            points = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
            if not points:
                continue
            line = axis.plot(
                *zip(*points, strict=True), marker="o", label=f"forget set {j + 1} ({Path(record['sets'][j]).stem})"
            )
            if ys[j + 1] is not None:
                axis.plot([j + 1], [ys[j + 1]], marker="*", markersize=14, color=line[0].get_color(), linestyle="")
        retain = [record["before"]["utility"], *record["utility"]]
        retain_metric, retain_label = RETAIN_LINE.get(metric, (metric, "retain set"))
        ys = [_number((u or {}).get(f"retain_{retain_metric}")) for u in retain]
        points = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
        if points:
            axis.plot(*zip(*points, strict=True), color="black", linestyle="--", marker="s", label=retain_label)
        axis.set_title(f"{LABELS[metric]} ({DIRECTION[metric]})", fontsize=9)
        axis.set_ylabel(LABELS[metric])
        axis.set_xlabel("model: before any request (0), then after request i")
        axis.set_xticks(xs, ["before"] + [str(i) for i in range(1, t + 1)])
        axis.yaxis.set_major_locator(MaxNLocator(nbins=6))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, title="star: the set's own request", title_fontsize=7)
    figure.suptitle(f"{t} unlearning requests, sequence.mode={record['mode']}", fontsize=11)
    figure.tight_layout()
    return save_figure(figure, output)


def save_figure(figure: Any, output: str | Path) -> Path:
    """Write `figure` to the PNG `output` whole or not at all (a reader never sees half a file), then close it."""
    import matplotlib.pyplot as plt

    path = Path(output)
    partial = path.with_name(f".{path.name}.partial.png")
    figure.savefig(partial, dpi=100)
    plt.close(figure)
    os.replace(partial, path)
    return path
