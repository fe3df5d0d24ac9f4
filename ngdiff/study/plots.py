"""The study's pictures (matplotlib, Agg), drawn from the result rows alone; every run is drawn, never
only an average:
- pareto.png: forget quality (log axis) against model utility along training, each method at its selected
  lr: every run's trajectory faint, the cell's median per step bold; the utility floor dashed;
- pareto_all.png: one panel per method (two columns), every lr's median trajectory and every run faint;
- lr.png: end-point forget quality and utility against the initial lr, every run a dot, the median a line;
- autolr.png: the lr path of every AutoLR run and the fraction of accepted fits;
- attacks.png: PrivLeak, int4 and relearning recovery of every scored run (`ngdiff study attack`).

One colour and one marker per method, legends in words (`method_label`); markers of different methods
are offset by a few pixels so that methods on top of each other stay visible (the captions say so).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from ngdiff.study.results import Row, _number, by_run

DPI = 100
TINY = 1e-30  # forget quality is a p-value; a 0 is drawn at this floor on the log axis
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "8", "d")
UTILITY_LABEL = "model utility (TOFU's harmonic mean of retain / real-authors / world-facts scores, 0-1)"
QUALITY_LABEL = "forget quality (KS-test p-value vs the retain model, log scale)"
# Method names of the shipped studies in words; a study may name others under plots.labels
METHOD_LABELS = {
    "ga": "Gradient ascent (AdamW)",
    "gdiff": "GDiff (AdamW protocol)",
    "gdiff-sgd": "GDiff (SGD, constant lr)",
    "npo": "NPO (AdamW protocol)",
    "simnpo": "SimNPO (AdamW protocol)",
    "idknll": "IdkNLL (AdamW protocol)",
    "ngdiff": "NGDiff (SGD, constant lr)",
    "ngdiff+autolr": "NGDiff + AutoLR (SGD)",
    "ngdiff-adamw": "NGDiff (AdamW protocol)",
    "ngdiff-adamw-const": "NGDiff (AdamW, constant lr)",
    "npo+ngdiff": "NPO loss + NGDiff combiner (AdamW)",
    "mgda": "MGDA (AdamW)",
    "pcgrad": "PCGrad (AdamW)",
    "imtlg": "IMTL-G (AdamW)",
    "lossnorm": "Loss normalisation (AdamW)",
    "rlw": "Random loss weighting (AdamW)",
}


def method_label(method: str, labels: Mapping[str, str] | None = None) -> str:
    return (labels or {}).get(method) or METHOD_LABELS.get(method, method)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(names: Sequence[str]) -> dict[str, object]:
    """Distinct colours: tab10, then Dark2 for methods 11-18."""
    plt = _pyplot()
    first, second = plt.get_cmap("tab10"), plt.get_cmap("Dark2")
    return {name: first(i) if i < 10 else second((i - 10) % 8) for i, name in enumerate(names)}


def _styles(names: Sequence[str]) -> dict[str, tuple[object, str]]:
    colors = _colors(names)
    return {name: (colors[name], MARKERS[i % len(MARKERS)]) for i, name in enumerate(names)}


def _offset(ax, index: int, count: int, pixels: float = 3.0):
    """A transform that shifts method `index` of `count` sideways by a few pixels (no data moves)."""
    from matplotlib.transforms import ScaledTranslation

    shift = (index - (count - 1) / 2) * pixels / 72.0
    return ax.transData + ScaledTranslation(shift, 0, ax.figure.dpi_scale_trans)


def _plot(ax, xs, ys, *args, **kwargs):
    """`ax.plot` with an offset transform: matplotlib does not count such a line in the axis limits, so its
    data are added to them here."""
    import numpy as np

    lines = ax.plot(xs, ys, *args, **kwargs)
    points = np.column_stack([np.atleast_1d(xs), np.atleast_1d(ys)]).astype(float)
    if len(points):
        ax.update_datalim(points)
        ax.autoscale_view()
    return lines


def _median_of(runs: int) -> str:
    """A legend's count of runs: a bold line is one run's own path, or the median of several."""
    return "1 run" if runs == 1 else f"median of {runs} runs"


def _y(value: float | None, metric: str) -> float | None:
    if value is None:
        return None
    return max(value, TINY) if metric == "forget_quality" else value


def run_trajectory(points: Sequence[Row], x: str, y: str) -> list[tuple[int, float, float]]:
    """(step, x, y) of one run's evaluations that have both numbers."""
    out = []
    for p in points:
        px, py = _number(p.get(x)), _y(_number(p.get(y)), y)
        if px is not None and py is not None:
            out.append((int(p["step"]), px, py))
    return out


def median_trajectory(runs: Sequence[Sequence[Row]], x: str, y: str) -> list[tuple[int, float, float]]:
    """(step, median x, median y) over the runs that have that step: the cell's typical path (the median of
    p-values, not their mean)."""
    by_step: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for points in runs:
        for step, px, py in run_trajectory(points, x, y):
            by_step[step].append((px, py))
    return [
        (step, statistics.median(v[0] for v in vs), statistics.median(v[1] for v in vs))
        for step, vs in sorted(by_step.items())
    ]


def _cell_runs(rows: Sequence[Row], method: str, lr: float, stages: Sequence[str]) -> list[list[Row]]:
    return [pts for (stage, _w, m, r, _s), pts in by_run(rows).items() if m == method and r == lr and stage in stages]


def _reference_marks(ax, target: Row | None, reference_utility: float | None, floor: float | None, y: str) -> None:
    if target and _number(target.get("model_utility")) is not None and _number(target.get(y)) is not None:
        ax.plot(target["model_utility"], _y(target[y], y), "k*", ms=12, zorder=5, label="target (step 0)")
    if reference_utility is not None and y == "forget_quality":
        ax.plot(reference_utility, 1.0, "*", color="green", ms=12, zorder=5, label="retain model (gold standard)")
    if floor is not None:
        ax.axvline(floor, color="grey", lw=1.0, ls="--", label=f"utility floor ({floor:.3g})")


def pareto_plot(
    rows: Sequence[Row],
    selected: Mapping[str, float],
    path: Path,
    target: Row | None,
    reference_utility: float | None,
    floor: float | None,
    stages: Sequence[str],
    labels: Mapping[str, str] | None = None,
    forget_metric: str = "forget_quality",
    utility_metric: str = "model_utility",
) -> Path:
    """Each method at its selected lr: every run faint, the median per step bold, the end point a large
    marker."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 6.5))
    methods = list(selected)
    styles = _styles(methods)
    drawn = 0
    for index, method in enumerate(methods):
        runs = _cell_runs(rows, method, selected[method], stages)
        if not runs:
            continue
        color, marker = styles[method]
        transform = _offset(ax, index, len(methods))
        for points in runs:
            traj = run_trajectory(points, utility_metric, forget_metric)
            _plot(
                ax, [t[1] for t in traj], [t[2] for t in traj], "-", color=color, lw=0.7, alpha=0.3, transform=transform
            )
        med = median_trajectory(runs, utility_metric, forget_metric)
        xs, ys = [t[1] for t in med], [t[2] for t in med]
        label = f"{method_label(method, labels)}, lr {selected[method]:g} ({_median_of(len(runs))})"
        _plot(ax, xs, ys, "-", marker=marker, ms=4, lw=2.0, color=color, label=label, transform=transform)
        _plot(ax, xs[-1], ys[-1], marker, ms=10, color=color, mec="black", mew=0.8, transform=transform)
        drawn += 1
    _reference_marks(ax, target, reference_utility, floor, forget_metric)
    if forget_metric == "forget_quality":
        ax.set_yscale("log")
    ax.set_xlabel(UTILITY_LABEL if utility_metric == "model_utility" else utility_metric.replace("_", " "))
    ax.set_ylabel(QUALITY_LABEL if forget_metric == "forget_quality" else forget_metric.replace("_", " "))
    ax.set_title(
        "Trade-off at each method's selected lr: faint = every run, bold = median per step, large marker = end of "
        "budget\n(better: up and right; methods offset by a few pixels so that none hides another)",
        fontsize=9,
    )
    ax.grid(True, alpha=0.3, which="both")
    if drawn or target:
        ax.legend(fontsize=7.5, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def pareto_grid_plot(
    rows: Sequence[Row],
    methods: Sequence[str],
    path: Path,
    target: Row | None,
    reference_utility: float | None,
    floor: float | None,
    stages: Sequence[str],
    labels: Mapping[str, str] | None = None,
    forget_metric: str = "forget_quality",
    utility_metric: str = "model_utility",
) -> Path:
    """One panel per method (two columns, 5.5 x 4 in each): every lr's median trajectory bold, every run
    faint, the target, the retain model and the utility floor."""
    plt = _pyplot()
    runs = by_run(rows)
    methods = [m for m in methods if any(k[2] == m and k[0] in stages for k in runs)]
    cols = 2
    nrows = max(1, math.ceil(len(methods) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4.0 * nrows), sharex=True, sharey=True, squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, method in zip(axes.flat, methods, strict=False):
        lrs = sorted({k[3] for k in runs if k[2] == method and k[0] in stages})
        for i, lr in enumerate(lrs):
            cell = _cell_runs(rows, method, lr, stages)
            color = cmap(i / max(len(lrs) - 1, 1) * 0.9)
            transform = _offset(ax, i, len(lrs), 2.0)
            for points in cell:
                traj = run_trajectory(points, utility_metric, forget_metric)
                _plot(
                    ax,
                    [t[1] for t in traj],
                    [t[2] for t in traj],
                    "-",
                    color=color,
                    lw=0.6,
                    alpha=0.3,
                    transform=transform,
                )
            med = median_trajectory(cell, utility_metric, forget_metric)
            _plot(
                ax,
                [t[1] for t in med],
                [t[2] for t in med],
                "-",
                marker=MARKERS[i % len(MARKERS)],
                ms=3.5,
                lw=1.6,
                color=color,
                label=f"lr {lr:g} ({_median_of(len(cell))})",
                transform=transform,
            )
        _reference_marks(ax, target, reference_utility, floor, forget_metric)
        if forget_metric == "forget_quality":
            ax.set_yscale("log")
        ax.set_title(method_label(method, labels), fontsize=10)
        ax.legend(fontsize=7, loc="best", title="initial lr", title_fontsize=7)  # where it hides least
        ax.grid(True, alpha=0.3, which="both")
        ax.tick_params(labelbottom=True, labelleft=True)
    for ax in axes.flat[len(methods) :]:
        ax.axis("off")
    fig.supxlabel(UTILITY_LABEL if utility_metric == "model_utility" else utility_metric, fontsize=10)
    fig.supylabel(QUALITY_LABEL if forget_metric == "forget_quality" else forget_metric, fontsize=10)
    fig.suptitle(
        "Every lr of every method: bold = median per step, faint = every run (black star: target, green star: "
        "retain model, dashed: utility floor)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def lr_plot(
    rows: Sequence[Row],
    methods: Sequence[str],
    path: Path,
    floor: float | None,
    stages: Sequence[str],
    labels: Mapping[str, str] | None = None,
    forget_metric: str = "forget_quality",
    utility_metric: str = "model_utility",
) -> Path:
    """End point against the initial lr: every run a dot (offset per method), the median over runs a line."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    styles = _styles(list(methods))
    runs = by_run(rows)
    for index, method in enumerate(methods):
        color, marker = styles[method]
        ends: dict[float, list[Row]] = defaultdict(list)
        for (stage, _w, m, lr, _s), points in runs.items():
            if m == method and stage in stages:
                ends[lr].append(points[-1])
        if not ends:
            continue
        for ax, metric in zip(axes, (forget_metric, utility_metric), strict=True):
            transform = _offset(ax, index, len(methods), 4.0)
            lrs, medians = [], []
            for lr in sorted(ends):
                values = [_y(_number(e.get(metric)), metric) for e in ends[lr]]
                values = [v for v in values if v is not None]
                if not values:
                    continue
                _plot(
                    ax,
                    [lr] * len(values),
                    values,
                    marker,
                    ls="none",
                    ms=4,
                    alpha=0.45,
                    color=color,
                    transform=transform,
                )
                lrs.append(lr)
                medians.append(statistics.median(values))
            _plot(
                ax,
                lrs,
                medians,
                "-",
                marker=marker,
                ms=6,
                lw=1.8,
                color=color,
                transform=transform,
                label=method_label(method, labels),
            )
    for ax, metric in zip(axes, (forget_metric, utility_metric), strict=True):
        ax.set_xscale("log")
        if metric == "forget_quality":
            ax.set_yscale("log")
        ax.set_xlabel("initial lr (log scale; SGD and AdamW grids differ)")
        name = {
            "forget_quality": "end-point forget quality\n(KS-test p-value vs the retain model, log scale)",
            "model_utility": "end-point model utility\n(TOFU's harmonic mean, 0-1)",
        }.get(metric, f"end-point {metric.replace('_', ' ')}")
        ax.set_ylabel(name, fontsize=9)
        ax.grid(True, alpha=0.3, which="both")
    if floor is not None:
        axes[1].axhline(floor, color="grey", lw=1.0, ls="--", label=f"utility floor ({floor:.3g})")
    axes[1].legend(fontsize=7.5, loc="best")
    fig.suptitle(
        "End point vs initial lr: dots = every run, line = median over runs (methods offset by a few pixels)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def autolr_plot(
    lr_paths: dict[tuple[str, float, int], list[tuple[int, float, float | None]]],
    path: Path,
    labels: Mapping[str, str] | None = None,
) -> Path:
    """`lr_paths[(method, lr0, seed)]` = [(step, lr, cumulative acceptance rate or None)]."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    lrs = sorted({lr0 for (_, lr0, _) in lr_paths})
    cmap = plt.get_cmap("viridis")
    color = {lr0: cmap(i / max(len(lrs) - 1, 1) * 0.9) for i, lr0 in enumerate(lrs)}
    methods = sorted({m for (m, _, _) in lr_paths})
    styles = dict(zip(methods, ["-", "--", ":", "-."] * 4, strict=False))
    labelled = set()
    for (method, lr0, _seed), path_points in sorted(lr_paths.items()):
        steps = [p[0] for p in path_points]
        label = f"{method_label(method, labels)}, initial lr {lr0:g}" if (method, lr0) not in labelled else None
        labelled.add((method, lr0))
        axes[0].plot(steps, [p[1] for p in path_points], styles[method], color=color[lr0], lw=1, label=label)
        rates = [(p[0], p[2]) for p in path_points if p[2] is not None]
        if rates:
            axes[1].plot([r[0] for r in rates], [r[1] for r in rates], styles[method], color=color[lr0], lw=1)
    for lr0 in lrs:
        axes[0].axhline(lr0, color=color[lr0], lw=0.6, ls=(0, (1, 3)))
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("lr (log scale; dotted: the initial lrs)")
    axes[0].set_title("AutoLR: lr path of every run", fontsize=10)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("accepted fits / attempted fits (cumulative)")
    axes[1].set_ylim(-0.05, 1.05)
    axes[1].set_title("AutoLR: acceptance rate", fontsize=10)
    for ax in axes:
        ax.grid(True, alpha=0.3, which="both")
    if labelled:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


ATTACK_PANELS = {  # attacks.jsonl key -> axis label
    "privleak": "PrivLeak (%): 0 = a retrain, negative = membership leaks",
    "int4_recovery": "forget ROUGE-L recall regained by int4 quantization",
    "relearn_recovery": "held-out forget ROUGE-L recall regained by relearning",
}


def attacks_plot(rows: Sequence[Row], path: Path, yardstick: str, labels: Mapping[str, str] | None = None) -> Path:
    """attacks.png: one panel per attack score, one column per method, every scored run a dot (sideways
    jitter by seed), the median a bar; each world's retain model (`yardstick` rows) a dashed line."""
    plt = _pyplot()
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != yardstick))
    styles = _styles(methods)
    fig, axes = plt.subplots(1, len(ATTACK_PANELS), figsize=(5.2 * len(ATTACK_PANELS), 4.8), squeeze=False)
    for ax, (key, ylabel) in zip(axes[0], ATTACK_PANELS.items(), strict=True):
        for i, method in enumerate(methods):
            color, marker = styles[method]
            mine = [
                (r.get("seed") or 0, v)
                for r in rows
                if r["method"] == method and (v := _number(r.get(key))) is not None
            ]
            if not mine:
                continue
            seeds = sorted({s for s, _ in mine})
            xs = [i + 0.25 * (seeds.index(s) - (len(seeds) - 1) / 2) / max(len(seeds), 1) for s, _ in mine]
            ax.scatter(xs, [v for _, v in mine], color=color, marker=marker, s=22, alpha=0.8, zorder=3)
            ax.hlines(statistics.median(v for _, v in mine), i - 0.3, i + 0.3, color=color, lw=2.5, zorder=4)
        worlds = [(r.get("world"), _number(r.get(key))) for r in rows if r["method"] == yardstick]
        for j, (world, value) in enumerate(w for w in worlds if w[1] is not None):
            ax.axhline(value, color="0.35", ls="--", lw=1, label=f"retain model (world {world})" if j < 4 else None)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels([method_label(m, labels) for m in methods], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        if worlds:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle("Privacy and attacks on each run's selected point (dots: runs; bars: medians)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
