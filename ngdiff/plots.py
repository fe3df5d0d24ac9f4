"""A picture of a run: one PNG of what `metrics.jsonl` holds, step by step (matplotlib, Agg: no display).

Panels: both losses, both gradient norms, cos(g_R, g_F), the combiner weights, the lr with AutoLR's
accepted and rejected refits marked, throughput and memory, and any evaluation metrics logged during
training. A panel whose keys the run never logged is left out, so the same code draws any run (a
plain GDiff run has no AutoLR marks; a run without evaluation has no evaluation panel).
`plot_metrics` takes rows, not a folder, so other reports can draw their own runs with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ngdiff.errors import UserError
from ngdiff.metrics_log import is_step_metric, read_jsonl


@dataclass(frozen=True)
class Panel:
    title: str
    keys: tuple[str, ...] = ()
    log_scale: bool = False
    prefix: str = ""  # also every key starting with it: one line per task (loss_<task>, ...)
    ylabel: str = ""

    def keys_in(self, rows: Sequence[dict[str, Any]]) -> tuple[str, ...]:
        found = sorted({k for row in rows for k in row if self.prefix and k.startswith(self.prefix)})
        return tuple(dict.fromkeys([*self.keys, *found]))


STEP_PANELS = (
    Panel("loss", prefix="loss_", ylabel="mean loss per token (nats)"),
    Panel("gradient norm", prefix="grad_norm_", log_scale=True, ylabel="L2 norm of the task gradient"),
    Panel("gradient cosines", prefix="cos_", ylabel="cosine (-1 to 1)"),
    Panel("combiner weights", prefix="w_", ylabel="weight in the update"),
    Panel("learning rate", ("lr",), log_scale=True, ylabel="lr (SGD step size)"),
    Panel("throughput", ("tokens_per_second",), ylabel="input tokens / s"),
    Panel("peak memory", ("peak_memory_mb",), ylabel="MiB"),
)
STEP_AXIS = "step (one update of both tasks)"
# evaluation metrics drawn when present (else every other number an evaluation logged, up to 8)
HEADLINE_EVAL = (
    "forget_quality",
    "model_utility",
    "forget_rougeL_recall",
    "retain_rougeL_recall",
    "forget_truth_ratio",
    "verbmem_f",
    "knowmem_f",
    "knowmem_r",
    "privleak",
)
NOT_EVALUATION = {"step", "eval_seconds"}


def words(key: str) -> str:
    """A metric key as a legend says it: `loss_forget` -> "forget loss", `cos_retain_forget` ->
    "cos(retain, forget) gradients"; an unknown key stays as it is."""
    fixed = {"lr": "learning rate", "tokens_per_second": "tokens per second", "peak_memory_mb": "peak memory"}
    if key in fixed:
        return fixed[key]
    for prefix, form in (("grad_norm_", "{} gradient norm"), ("loss_", "{} loss"), ("w_", "weight of {}")):
        if key.startswith(prefix):
            return form.format(key[len(prefix) :].replace("_", " "))
    if key.startswith("cos_"):
        parts = key[len("cos_") :].split("_")
        if len(parts) == 2:
            return f"cosine of the {parts[0]} and {parts[1]} gradients"
    return key.replace("_", " ")


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that hold a finite number under `key`."""
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(int(row["step"]))
            values.append(float(value))
    return steps, values


def evaluation_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    others = sorted(
        {
            k
            for row in rows
            for k in row
            if not is_step_metric(k) and k not in NOT_EVALUATION and not k.startswith("autolr/") and series(rows, k)[0]
        }
    )
    headline = [k for k in HEADLINE_EVAL if k in others]
    return headline or others[:8]


def plot_metrics(
    rows: Sequence[dict[str, Any]],
    output: str | Path,
    title: str = "",
    stop_forget_loss: float = 0.0,
    start_lr: float | None = None,
) -> Path:
    """Draw `rows` (metrics.jsonl records: a `step` and numbers) into the PNG `output`; returns its path.
    `stop_forget_loss` (train.stop_forget_loss) is drawn on the loss panel, `start_lr` (optim.lr) on the lr's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [Panel(p.title, p.keys_in(rows), p.log_scale, ylabel=p.ylabel) for p in STEP_PANELS]
    panels = [p for p in panels if any(series(rows, k)[0] for k in p.keys)]
    eval_keys = evaluation_keys(rows)
    if eval_keys:
        panels.append(Panel("evaluation", tuple(eval_keys), ylabel="metric value"))
    if not panels:
        raise UserError(f"nothing to plot: no step metrics in {title or 'the rows given'}")
    columns = 2
    lines = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(11, 3.0 * lines), squeeze=False, sharex=True)
    for axis, panel in zip(axes.flat, panels, strict=False):
        for key in panel.keys:
            steps, values = series(rows, key)
            if steps:
                axis.plot(steps, values, marker="." if len(steps) < 50 else None, label=words(key))
        if panel.title == "learning rate":
            mark_autolr(axis, rows)
            if start_lr:
                axis.axhline(start_lr, color="grey", linestyle=":", label=f"starting lr {start_lr:g}")
        if panel.title == "loss" and stop_forget_loss > 0:
            axis.axhline(
                stop_forget_loss, color="tab:red", linestyle="--", label=f"stop at forget loss {stop_forget_loss:g}"
            )
        if panel.log_scale and all(v > 0 for k in panel.keys for v in series(rows, k)[1]):
            axis.set_yscale("log")
        axis.set_title(panel.title, fontsize=10)
        axis.set_ylabel(panel.ylabel, fontsize=8)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.tick_params(labelbottom=True)  # the last panel of a column may sit above an empty slot
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    for axis in axes[-1]:
        axis.set_xlabel(STEP_AXIS)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def mark_autolr(axis, rows: Sequence[dict[str, Any]]) -> None:
    """AutoLR's refits on the lr curve: accepted (the fitted lr was taken) and rejected (lr kept)."""
    for accepted, marker, color in ((1.0, "o", "tab:green"), (0.0, "x", "tab:red")):
        points = [(r["step"], r["lr"]) for r in rows if r.get("autolr/accepted") == accepted and "lr" in r]
        if points:
            steps, lrs = zip(*points, strict=True)
            label = f"AutoLR {'accepted' if accepted else 'rejected'} ({len(points)})"
            axis.scatter(steps, lrs, marker=marker, color=color, zorder=3, label=label)


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """The PNG of a run folder's `metrics.jsonl` (default `RUN_DIR/metrics.png`)."""
    run = Path(run_dir)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{run}: no metrics.jsonl (not an ngdiff run folder, or the run has not logged a step yet)")
    rows = read_jsonl(metrics)
    stop, start_lr = run_settings(run)
    return plot_metrics(rows, output or run / "metrics.png", title=str(run), stop_forget_loss=stop, start_lr=start_lr)


def run_settings(run: Path) -> tuple[float, float | None]:
    """(train.stop_forget_loss, optim.lr) from the run's `config.yaml`; (0, None) when it has none."""
    import yaml

    path = run / "config.yaml"
    if not path.is_file():
        return 0.0, None
    config = yaml.safe_load(path.read_text()) or {}
    train, optim = config.get("train") or {}, config.get("optim") or {}
    return float(train.get("stop_forget_loss") or 0.0), (float(optim["lr"]) if optim.get("lr") else None)
