"""The sequence's evaluations on disk and `sequence.json` built from them.

Every cell is one `ngdiff eval`-style evaluation of one model on one set, written under
`<output_dir>/eval/<row>/<set>/` (items.json, aggregate.json, summary.md): `row` is `before` (model.path) or
`request_<i>` (that request's final model), `set` is `forget_<j>` (data.forget's j-th file, 1-based) or the
retain set's name. A cell whose summary.md and aggregate.json are there is done; a rerun evaluates only the
others. `sequence.json` is rebuilt from the cells after each request, so it always says what is on disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ngdiff.run_folder import write_atomically
from ngdiff.sequence.muse_cells import FORGET_METRIC, RETAIN_SET, knowmem_file
from ngdiff.sequence.plan import REQUEST_DIR, SequencePlan, muse_cells
from ngdiff.tasks import task_names

SEQUENCE_FILE = "sequence.json"
PLOT_FILE = "sequence.png"
EVAL_DIR = "eval"
BEFORE = "before"
# matrix metrics shown first (then every other `forget_*` metric an evaluation gave, alphabetically)
HEADLINE = (FORGET_METRIC, "forget_rougeL_recall", "forget_answer_loss", "forget_truth_ratio", "forget_quality")
MATRIX_NOTE = (
    "matrix[metric][i][j]: forget set j+1 scored on the final model of request i+1 (0-based lists); every cell is "
    "computed, above the diagonal too (set j before its own request), and null only where the evaluation could not "
    "compute the metric (truth ratio needs the set's *_perturbed.jsonl companion) or the request has not finished"
)


@dataclass(frozen=True)
class EvalSet:
    """One set the sequence scores: its folder name under each row, its role and file."""

    name: str  # forget_<j> or the retain task's name (retain, retain_<stem>)
    role: str  # "forget" or "retain"
    path: Path


def eval_sets(plan: SequencePlan) -> list[EvalSet]:
    """The forget sets, then the retain cells: each retain file (question/answer cells), or the MUSE files'
    retain QA (MUSE cells: utility is KnowMem, whatever the retain texts trained on)."""
    forget = [EvalSet(f"forget_{j}", "forget", Path(p)) for j, p in enumerate(plan.sets, start=1)]
    if muse_cells(plan.cfg):
        return [*forget, EvalSet(RETAIN_SET, "retain", knowmem_file(plan.cfg))]
    names = task_names("retain", plan.cfg.data.retain)
    return forget + [EvalSet(n, "retain", Path(p)) for n, p in zip(names, plan.cfg.data.retain, strict=True)]


def row_dir(plan: SequencePlan, row: int) -> Path:
    """`eval/before` (row 0) or `eval/request_<row>`."""
    return plan.out / EVAL_DIR / (BEFORE if row == 0 else REQUEST_DIR.format(row))


def read_cell(folder: Path) -> dict[str, float] | None:
    """The metrics of a finished evaluation in `folder`, else None (absent, or cut short before its summary)."""
    if not (folder / "summary.md").is_file():
        return None
    try:
        return json.loads((folder / "aggregate.json").read_text())["metrics"]
    except (OSError, ValueError, KeyError):
        return None


def missing_sets(plan: SequencePlan, row: int) -> list[EvalSet]:
    return [s for s in eval_sets(plan) if read_cell(row_dir(plan, row) / s.name) is None]


def trained(folder: Path) -> bool:
    """A request's run finished: its exported model and the summary written after it."""
    return (folder / "final" / "config.json").is_file() and (folder / "summary.json").is_file()


def retain_metrics(plan: SequencePlan, row: int) -> dict[str, float] | None:
    """Row `row`'s retain metrics, keyed as `ngdiff eval` keys them (`retain_<metric>`); with several retain
    files each keeps its task name (`retain_<stem>_<metric>`). None until every retain set is scored."""
    merged: dict[str, float] = {}
    for s in eval_sets(plan):
        if s.role != "retain":
            continue
        cell = read_cell(row_dir(plan, row) / s.name)
        if cell is None:
            return None
        merged.update({f"{s.name}{k.removeprefix('retain')}": v for k, v in cell.items() if k.startswith("retain_")})
    return merged


def forget_cells(plan: SequencePlan, row: int) -> list[dict[str, float] | None]:
    return [read_cell(row_dir(plan, row) / s.name) for s in eval_sets(plan) if s.role == "forget"]


def matrix_metrics(cells: list[dict[str, float] | None]) -> list[str]:
    found = {k for cell in cells if cell for k in cell if k.startswith("forget_")}
    return [k for k in HEADLINE if k in found] + sorted(found - set(HEADLINE))


def request_record(plan: SequencePlan, index: int) -> dict[str, Any]:
    request = plan.requests[index - 1]
    summary_file = request.folder / "summary.json"
    steps = json.loads(summary_file.read_text()).get("steps") if summary_file.is_file() else None
    return {
        "index": index,
        "mode": plan.cfg.sequence.mode,
        "new_set": plan.sets[index - 1],
        "forget": list(request.cfg.data.forget),  # the run's forget tasks, in task order
        "task_weights": list(request.cfg.method.task_weights),
        "start_model": request.cfg.model.path,
        "folder": str(request.folder),
        "final": str(request.final) if trained(request.folder) else None,
        "steps": steps,
        "evaluated": not missing_sets(plan, index) and trained(request.folder),
    }


def sequence_record(plan: SequencePlan) -> dict[str, Any]:
    """What `sequence.json` holds: the requests, the T x T forget matrix per metric, retain metrics per
    request, and the same scores of the starting model (`before`)."""
    t = len(plan.requests)
    rows = [forget_cells(plan, i) if trained(plan.requests[i - 1].folder) else [None] * t for i in range(1, t + 1)]
    before = forget_cells(plan, 0)
    metrics = matrix_metrics([cell for row in [before, *rows] for cell in row])
    return {
        "mode": plan.cfg.sequence.mode,
        "replay_share": plan.cfg.sequence.replay_share if plan.cfg.sequence.mode == "replay" else None,
        "sets": list(plan.sets),
        "retain": list(plan.cfg.data.retain),
        "requests": [request_record(plan, i) for i in range(1, t + 1)],
        "matrix": {m: [[cell.get(m) if cell else None for cell in row] for row in rows] for m in metrics},
        "utility": [retain_metrics(plan, i) if trained(plan.requests[i - 1].folder) else None for i in range(1, t + 1)],
        "before": {
            "model": plan.cfg.model.path,
            "forget": {m: [cell.get(m) if cell else None for cell in before] for m in metrics},
            "utility": retain_metrics(plan, 0),
        },
        "evaluation": evaluation_record(plan),
        "note": MATRIX_NOTE,
    }


def evaluation_record(plan: SequencePlan) -> dict[str, Any]:
    """How the cells were made: `benchmark` muse (VerbMem per set, KnowMem utility) or tofu (`ngdiff eval`)."""
    ecfg, out = plan.cfg.eval, str(plan.out / EVAL_DIR)
    if muse_cells(plan.cfg):
        from ngdiff.eval.muse import KNOWMEM_TOKENS, VERBMEM_TOKENS

        return {
            "benchmark": "muse",
            "max_items": ecfg.max_items,
            "verbmem_prompt_words": plan.cfg.sequence.verbmem_prompt_words,
            "verbmem_new_tokens": VERBMEM_TOKENS,
            "knowmem_new_tokens": KNOWMEM_TOKENS,
            "knowmem_retain": str(knowmem_file(plan.cfg)),
            "batch_size": ecfg.batch_size,
            "cells": out,
        }
    return {
        "benchmark": "tofu",
        "max_items": ecfg.max_items,
        "max_new_tokens": ecfg.max_new_tokens,
        "batch_size": ecfg.batch_size,
        "prompt_template": plan.cfg.data.prompt_template,
        "cells": out,
    }


def write_sequence_json(plan: SequencePlan) -> dict[str, Any]:
    from ngdiff.eval.report import _clean

    record = sequence_record(plan)
    text = json.dumps(_clean(record), indent=1, allow_nan=False)
    write_atomically(plan.out / SEQUENCE_FILE, text + "\n")
    return record
