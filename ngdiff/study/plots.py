"""The study's pictures (matplotlib, Agg, small PNGs):
- pareto.png: forget quality (log axis) against model utility along training, one trajectory per method
  at its best lr (seeds averaged per step: geometric mean of forget quality, mean of utility);
- lr.png: end-point forget quality and utility against the initial lr (mean and std over seeds);
- autolr.png: the lr path of every AutoLR run and the fraction of accepted fits.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from ngdiff.study.results import Row, Stat, by_run

DPI = 90
TINY = 1e-30  # forget quality is a p-value; a 0 is drawn at this floor on the log axis


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(names: Sequence[str]) -> dict[str, object]:
    """Distinct colours: tab10, then Dark2 for methods 11-18 (lines past 10 are also dashed)."""
    plt = _pyplot()
    first, second = plt.get_cmap("tab10"), plt.get_cmap("Dark2")
    return {name: first(i) if i < 10 else second((i - 10) % 8) for i, name in enumerate(names)}


def _style(index: int) -> str:
    return "-o" if index < 10 else "--o"


def mean_trajectory(runs: Sequence[Sequence[Row]], x: str, y: str) -> list[tuple[int, float, float]]:
    """(step, mean x, geometric-mean y) over the runs that have that step."""
    by_step: dict[int, list[Row]] = defaultdict(list)
    for points in runs:
        for p in points:
            if p.get(x) is not None and p.get(y) is not None:
                by_step[p["step"]].append(p)
    out = []
    for step in sorted(by_step):
        ps = by_step[step]
        gx = sum(p[x] for p in ps) / len(ps)
        gy = math.exp(sum(math.log(max(p[y], TINY)) for p in ps) / len(ps))
        out.append((step, gx, gy))
    return out


def pareto_plot(
    rows: Sequence[Row],
    best_lr: dict[str, float],
    path: Path,
    target: Row,
    reference_utility: float | None,
    forget_metric: str = "forget_quality",
    utility_metric: str = "model_utility",
) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    runs = by_run(rows)
    colors = _colors(list(best_lr))
    for index, (method, lr) in enumerate(best_lr.items()):
        mine = [pts for (m, r, _), pts in runs.items() if m == method and r == lr]
        traj = mean_trajectory(mine, utility_metric, forget_metric)
        if not traj:
            continue
        xs, ys = [t[1] for t in traj], [t[2] for t in traj]
        ax.plot(xs, ys, _style(index), ms=2.5, lw=1.2, color=colors[method], label=f"{method} (lr {lr:g})")
        ax.plot(xs[-1], ys[-1], "s", ms=5, color=colors[method])
    if target.get(utility_metric) is not None and target.get(forget_metric) is not None:
        ax.plot(target[utility_metric], max(target[forget_metric], TINY), "k*", ms=11, label="target (step 0)")
    if reference_utility is not None and forget_metric == "forget_quality":
        ax.plot(reference_utility, 1.0, "g*", ms=11, label="retain model (gold)")
    if forget_metric == "forget_quality":
        ax.set_yscale("log")
    ax.set_xlabel(utility_metric.replace("_", " "))
    ax.set_ylabel(forget_metric.replace("_", " ") + (" (log)" if forget_metric == "forget_quality" else ""))
    ax.set_title("Trajectories at each method's best lr (square: end of budget)", fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def pareto_grid_plot(
    rows: Sequence[Row],
    methods: Sequence[str],
    path: Path,
    target: Row,
    reference_utility: float | None,
    utility_floor: float | None,
    forget_metric: str = "forget_quality",
    utility_metric: str = "model_utility",
) -> Path:
    """One small panel per method with every lr's trajectory (seeds averaged per step): what the
    one-trajectory-per-method picture leaves out."""
    plt = _pyplot()
    runs = by_run(rows)
    methods = [m for m in methods if any(k[0] == m for k in runs)]
    cols = 4
    nrows = max(1, math.ceil(len(methods) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), sharex=True, sharey=True, squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, method in zip(axes.flat, methods, strict=False):
        lrs = sorted({k[1] for k in runs if k[0] == method})
        for i, lr in enumerate(lrs):
            traj = mean_trajectory([p for k, p in runs.items() if k[0] == method and k[1] == lr], utility_metric,
                                   forget_metric)  # fmt: skip
            if traj:
                color = cmap(i / max(len(lrs) - 1, 1))
                ax.plot([t[1] for t in traj], [t[2] for t in traj], "-o", ms=2, lw=1, color=color, label=f"{lr:g}")
        if target.get(utility_metric) is not None and target.get(forget_metric) is not None:
            ax.plot(target[utility_metric], max(target[forget_metric], TINY), "k*", ms=7)
        if reference_utility is not None and forget_metric == "forget_quality":
            ax.plot(reference_utility, 1.0, "g*", ms=7)
        if utility_floor is not None:
            ax.axvline(utility_floor, color="grey", lw=0.8, ls="--")
        if forget_metric == "forget_quality":
            ax.set_yscale("log")
        ax.set_title(method, fontsize=9)
        ax.legend(fontsize=5, title="lr", title_fontsize=5, loc="lower left")
        ax.grid(True, alpha=0.3, which="both")
    for ax in axes.flat[len(methods) :]:
        ax.axis("off")
    fig.supxlabel(utility_metric.replace("_", " "), fontsize=9)
    fig.supylabel(forget_metric.replace("_", " "), fontsize=9)
    fig.suptitle("Every lr (black star: target, green: retain model, dashed: utility floor)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def end_points(rows: Sequence[Row], method: str, metric: str) -> list[tuple[float, Stat]]:
    per_lr: dict[float, list[float]] = defaultdict(list)
    for (m, lr, _seed), points in by_run(rows).items():
        if m == method and points[-1].get(metric) is not None:
            per_lr[lr].append(points[-1][metric])
    return [(lr, Stat.of(values)) for lr, values in sorted(per_lr.items())]


def lr_plot(
    rows: Sequence[Row],
    methods: Sequence[str],
    path: Path,
    forget_metric: str = "forget_quality",
    utility_metric: str = "model_utility",
) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = _colors(list(methods))
    for index, method in enumerate(methods):
        for ax, metric in zip(axes, (forget_metric, utility_metric), strict=True):
            points = end_points(rows, method, metric)
            if not points:
                continue
            lrs = [lr for lr, _ in points]
            means = [max(s.mean, TINY) if metric == "forget_quality" else s.mean for _, s in points]
            stds = [s.std for _, s in points]
            ax.errorbar(lrs, means, yerr=stds, fmt=_style(index), ms=4, capsize=3, color=colors[method], label=method)
    for ax, metric in zip(axes, (forget_metric, utility_metric), strict=True):
        ax.set_xscale("log")
        if metric == "forget_quality":
            ax.set_yscale("log")
        ax.set_xlabel("initial lr")
        ax.set_ylabel(f"{metric.replace('_', ' ')} at the end of the budget")
        ax.grid(True, alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle("End point vs initial lr (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def autolr_plot(lr_paths: dict[tuple[str, float, int], list[tuple[int, float, float | None]]], path: Path) -> Path:
    """`lr_paths[(method, lr0, seed)]` = [(step, lr, cumulative acceptance rate or None)]."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    lrs = sorted({lr0 for (_, lr0, _) in lr_paths})
    cmap = plt.get_cmap("viridis")
    color = {lr0: cmap(i / max(len(lrs) - 1, 1)) for i, lr0 in enumerate(lrs)}
    methods = sorted({m for (m, _, _) in lr_paths})
    styles = dict(zip(methods, ["-", "--", ":", "-."] * 4, strict=False))
    labelled = set()
    for (method, lr0, _seed), path_points in sorted(lr_paths.items()):
        steps = [p[0] for p in path_points]
        label = f"{method}, lr0 {lr0:g}" if (method, lr0) not in labelled else None
        labelled.add((method, lr0))
        axes[0].plot(steps, [p[1] for p in path_points], styles[method], color=color[lr0], lw=1, label=label)
        rates = [(p[0], p[2]) for p in path_points if p[2] is not None]
        if rates:
            axes[1].plot([r[0] for r in rates], [r[1] for r in rates], styles[method], color=color[lr0], lw=1)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("lr")
    axes[0].set_title("AutoLR: lr path per run", fontsize=10)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("accepted fits / attempted (cumulative)")
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
