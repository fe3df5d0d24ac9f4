"""The compared sequences' end points as a picture: one panel per end point, one column per arm, a dot per
seed (the same seed the same colour in every column, so a pairing can be followed by eye) and the mean as a
bar. Every value is shown: with a handful of seeds a box or an error bar would hide more than it says."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from ngdiff.sequence.compare import ENDPOINTS, SequenceEndpoint
from ngdiff.sequence.plot import save_figure

BETTER = {"less": "lower is better", "greater": "higher is better"}


def plot_endpoints(points: Sequence[SequenceEndpoint], output: str | Path, fields: Iterable[str] = ENDPOINTS) -> Path:
    """Draw the end points of `points` into the PNG `output`, written whole or not at all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = list(fields)
    arms = list(dict.fromkeys(p.method for p in points))
    seeds = sorted({p.seed for p in points})
    colours = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(seeds)}
    figure, axes = plt.subplots(1, len(fields), figsize=(3.6 * len(fields), 4.4), squeeze=False)
    for axis, name in zip(axes[0], fields, strict=True):
        for x, arm in enumerate(arms):
            mine = [p for p in points if p.method == arm]
            for k, p in enumerate(mine):
                offset = (k - (len(mine) - 1) / 2) * 0.06
                axis.plot(x + offset, p.value(name), "o", color=colours[p.seed], markersize=5, alpha=0.85)
            mean = sum(p.value(name) for p in mine) / len(mine)
            axis.plot([x - 0.3, x + 0.3], [mean, mean], color="black", linewidth=2)
        if name == "relapse":
            axis.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
        label = ENDPOINTS[name].label(points[0].benchmark)
        axis.set_title(f"{label}\n({BETTER[ENDPOINTS[name].direction]})", fontsize=9)
        axis.set_xticks(range(len(arms)), arms, rotation=35, ha="right", fontsize=8)
        axis.set_xlim(-0.6, len(arms) - 0.4)
        axis.grid(axis="y", alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colours[s], label=f"seed {s}") for s in seeds]
    handles.append(plt.Line2D([], [], color="black", linewidth=2, label="mean"))
    figure.legend(handles=handles, loc="upper right", fontsize=7, ncol=1, bbox_to_anchor=(1.0, 0.92))
    figure.suptitle("after the last request: every seed (dots) and the mean (bar)", fontsize=10)
    figure.tight_layout(rect=(0, 0, 0.93, 1))
    return save_figure(figure, output)
