"""The sequence's loop: guard the folder, score the starting model, then per request train (unless it
finished earlier), score every set on its final model, and rewrite `sequence.json` and `sequence.png`.

Every rank runs this loop (under torchrun each request is an ordinary distributed run); how a request is
trained and how a model is scored are handed in by the launcher, so this module holds only the protocol.
Decisions read the folder after a barrier, so every rank takes the same ones; rank 0 alone writes.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path

from ngdiff.config import ExperimentConfig
from ngdiff.errors import UserError
from ngdiff.locks import lock_output_dir
from ngdiff.outputs import check_output_dir, write_output_dir
from ngdiff.sequence.plan import REQUEST_DIR, SequencePlan
from ngdiff.sequence.results import (
    EVAL_DIR,
    PLOT_FILE,
    SEQUENCE_FILE,
    EvalSet,
    missing_sets,
    row_dir,
    trained,
    write_sequence_json,
)
from parallel.base import DistContext

log = logging.getLogger("ngdiff.sequence")

AGAIN = "pass train.resume=auto to continue the sequence (finished requests are skipped), or --overwrite to start again"
Train = Callable[[ExperimentConfig], bool]  # runs one request; True when a stop signal ended it early
Evaluate = Callable[[Path | str, list[EvalSet], Path], None]  # (model, sets, folder): one cell per set


def marker_config(plan: SequencePlan) -> ExperimentConfig:
    """What the sequence folder's marker records: the config without data.forget, whose files each request's
    own marker records, so appending a later request to data.forget continues the same sequence."""
    cfg = copy.deepcopy(plan.cfg)
    cfg.data.forget = ()
    return cfg


def own_entries(plan: SequencePlan) -> tuple[str, ...]:
    return (SEQUENCE_FILE, PLOT_FILE, EVAL_DIR, *(REQUEST_DIR.format(r.index) for r in plan.requests))


def guard_folders(plan: SequencePlan, ctx: DistContext, overwrite: bool, barrier: Callable[[], None]) -> None:
    """The sequence folder as `ngdiff train` guards a run folder, and every request folder already there
    checked as its run would be (a changed set, or a finished request rerun without train.resume=auto, is
    refused now, before anything trains)."""
    seq_cfg = marker_config(plan)
    check_output_dir(seq_cfg, overwrite, again=AGAIN)
    if not overwrite:
        for request in plan.requests:
            if request.folder.is_dir():
                check_output_dir(request.cfg, False, again=AGAIN)
    barrier()
    if ctx.is_main:
        write_output_dir(seq_cfg, overwrite, own=own_entries(plan))
    barrier()


def check_request_data(plan: SequencePlan, ctx: DistContext) -> None:
    """Every request's tasks built as its run will build them (tokenized, batched), before anything is
    written: a bad record or a set smaller than its batch in the last request is named before the first
    trains, as is a text too short for its VerbMem prompt (MUSE cells). The tokenizer is model.path's; each
    request's final/ carries the same one."""
    from ngdiff.model_source import loading_from
    from ngdiff.modeling import load_tokenizer
    from ngdiff.objectives import build_objectives
    from ngdiff.sequence.muse_cells import check_muse_cells
    from ngdiff.sequence.plan import muse_cells
    from ngdiff.tasks import build_tasks

    cfg = plan.cfg
    if muse_cells(cfg):
        check_muse_cells(cfg)
    with loading_from("model.path", cfg.model.path):
        tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    objectives = build_objectives(
        cfg.method.forget_objective, cfg.method.retain_objective, method=cfg.method, seed=cfg.train.seed
    )
    for request in plan.requests:
        try:
            build_tasks(request.cfg, tokenizer, ctx, *objectives)
        except UserError as err:
            raise UserError(f"request {request.index} of the sequence ({request.folder}): {err}") from None


def score_row(plan: SequencePlan, row: int, model: Path | str, evaluate: Evaluate, barrier: Callable[[], None]) -> None:
    """Evaluate the sets of row `row` not yet on disk (row 0: the starting model)."""
    missing = missing_sets(plan, row)
    if missing:
        what = "the starting model" if row == 0 else f"request {row}'s final model"
        log.info("scoring %s on %s", what, ", ".join(s.name for s in missing))
        evaluate(model, missing, row_dir(plan, row))
    barrier()


def write_outputs(plan: SequencePlan, ctx: DistContext) -> None:
    if ctx.is_main:
        from ngdiff.sequence.plot import plot_sequence

        record = write_sequence_json(plan)
        plot_sequence(record, plan.out / PLOT_FILE)


def run_sequence(
    plan: SequencePlan,
    ctx: DistContext,
    train: Train,
    evaluate: Evaluate,
    *,
    overwrite: bool = False,
    barrier: Callable[[], None] = lambda: None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> bool:
    """Every request in order; True when a stop signal ended one early, or came while a model was scored
    (`stop_requested`, asked before each request trains): it resumes with train.resume=auto."""
    check_request_data(plan, ctx)
    lock = lock_output_dir(plan.out) if ctx.is_main else None  # one sequence per folder
    try:
        guard_folders(plan, ctx, overwrite, barrier)
        score_row(plan, 0, plan.cfg.model.path, evaluate, barrier)
        t = len(plan.requests)
        for request in plan.requests:
            if trained(request.folder):
                log.info("request %d/%d: finished earlier (%s), not trained again", request.index, t, request.final)
            else:
                if stop_requested():
                    log.info("stopping before request %d/%d (a stop signal came while scoring)", request.index, t)
                    write_outputs(plan, ctx)
                    return True
                log.info(
                    "request %d/%d (%s): forgetting %s, starting from %s",
                    request.index,
                    t,
                    plan.cfg.sequence.mode,
                    ", ".join(request.cfg.data.forget),
                    request.cfg.model.path,
                )
                if train(request.cfg):
                    write_outputs(plan, ctx)
                    return True
                if not trained(request.folder):
                    raise UserError(f"request {request.index} ended without a final model in {request.final}")
            score_row(plan, request.index, request.final, evaluate, barrier)
            write_outputs(plan, ctx)
        if ctx.is_main:
            log.info("sequence done: %s, %s", plan.out / SEQUENCE_FILE, plan.out / PLOT_FILE)
        return False
    finally:
        if lock is not None:
            lock.release()
