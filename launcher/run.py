"""`ngdiff train`: join the process group, guard the output folder, run, shut down cleanly."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from launcher.logs import setup_logging
from launcher.signals import install_stop_handlers, restore_interrupt
from launcher.tracking import build_sinks
from ngdiff.config import ExperimentConfig
from ngdiff.locks import lock_output_dir
from ngdiff.outputs import check_output_dir, write_output_dir
from parallel.distributed import init_distributed, shutdown_distributed

log = logging.getLogger("ngdiff")


def train_from_config(cfg: ExperimentConfig, overwrite: bool = False, verbose: bool = False) -> int:
    ctx = init_distributed(cfg.parallel.timeout_minutes)
    setup_logging(ctx.rank, verbose)
    logging.getLogger("ngdiff.start").info(
        "rank %d/%d on %s, backend %s, %d torch threads",
        ctx.rank,
        ctx.world_size,
        ctx.device,
        cfg.parallel.backend,
        torch.get_num_threads(),
    )
    try:
        stopped = train_in_context(cfg, ctx, overwrite)
        return after_stop(cfg, ctx) if stopped else 0
    except RuntimeError as err:
        return peer_failure_exit(err, ctx)
    finally:
        shutdown_distributed()


def train_in_context(cfg: ExperimentConfig, ctx, overwrite: bool = False, say_next: bool = True) -> bool:
    """One run in an initialised process group (`ngdiff train`, or each request of `ngdiff sequence`):
    lock and check the output folder, train, export. True when a stop signal ended it before its last step."""
    from ngdiff.eval.during_training import evaluation_factory
    from ngdiff.pipeline import run_training

    run_lock = None
    try:
        run_lock = lock_output_dir(cfg.output_dir) if ctx.is_main else None  # one run per folder, held to the end
        check_output_dir(cfg, overwrite)  # every rank reads before rank 0 writes
        if ctx.distributed:
            torch.distributed.barrier()
        if ctx.is_main:
            write_output_dir(cfg, overwrite)
        sinks = build_sinks(cfg, ctx)
        outcome = run_training(
            cfg, ctx, sinks=sinks, evaluate_factory=evaluation_factory(cfg), on_trainer=install_stop_handlers
        )
        stopped = bool(outcome.results) and outcome.results[-1].stop_requested and not outcome.trainer.finished
        if ctx.is_main and outcome.final_dir is not None and say_next:
            log.info("next: %s", next_commands(cfg, outcome.final_dir))
        if ctx.distributed:  # leave together: a rank tearing down its group while rank 0 still writes
            torch.distributed.barrier()  # its summary once aborted in gloo ("terminate called ...")
        return stopped
    finally:
        restore_interrupt()
        if run_lock is not None:
            run_lock.release()


def peer_failure_exit(err: RuntimeError, ctx) -> int:
    """Exit code 3 with one line when a collective failed because a peer died; any other error goes on."""
    if not (ctx.distributed and is_peer_failure(err)):
        raise err
    log.error(
        "rank %d/%d: a collective failed because another rank died or stopped answering "
        "(the launcher's failure report names it); exiting. Cause: %s",
        ctx.rank,
        ctx.world_size,
        str(err).splitlines()[0] if str(err) else type(err).__name__,
    )
    return 3


def next_commands(cfg: ExperimentConfig, final_dir) -> str:
    """What a user runs after training: evaluate the model on what it unlearned, draw the run."""
    files = (*cfg.data.forget, *cfg.data.retain)
    local = all(Path(f).is_file() for f in files) and cfg.data.format == "tofu"
    if not local:
        return f"ngdiff eval --model {final_dir} --benchmark tofu|muse; ngdiff plot {cfg.output_dir}"
    # one evaluation per forget set: each is scored on its own, as it was trained
    evals = [f"ngdiff eval --model {final_dir} --forget {f} --retain {cfg.data.retain[0]}" for f in cfg.data.forget]
    return "; ".join([*evals, f"ngdiff plot {cfg.output_dir}"])


def is_peer_failure(err: BaseException) -> bool:
    """Errors a collective raises when a peer process is gone (gloo, nccl, or the c10d store)."""
    if isinstance(err, torch.distributed.DistError):
        return True
    text = str(err).lower()
    return any(s in text for s in ("connection closed by peer", "connection reset", "broken pipe", "timed out"))


def after_stop(cfg: ExperimentConfig, ctx) -> int:
    """A run stopped by a signal has saved a checkpoint; under Slurm it is requeued to resume."""
    from launcher.signals import requeue_if_slurm

    if ctx.is_main:
        requeue_if_slurm()
    return 0
