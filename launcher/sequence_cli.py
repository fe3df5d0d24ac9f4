"""`ngdiff sequence`: data.forget's sets as unlearning requests, one ordinary run each, every set scored
after each request (ngdiff/sequence/, docs/sequence.md). Under torchrun every rank runs the same loop."""

from __future__ import annotations

import argparse
import logging
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from launcher.cli import add_train_arguments, split_config_and_overrides, subcommand
from ngdiff.config import ExperimentConfig, load_config

log = logging.getLogger("ngdiff.sequence")


@subcommand(
    "sequence",
    "unlearn data.forget's sets one after another (sequence.mode: chain, replay or adapters), scoring every set "
    "after each request",
    add_train_arguments,
)
def run_sequence_command(args: argparse.Namespace) -> int:
    from launcher.logs import setup_logging
    from launcher.run import after_stop, peer_failure_exit, train_in_context
    from launcher.signals import STOP_SIGNALS, install_stop_handlers
    from ngdiff.sequence.plan import plan_sequence
    from ngdiff.sequence.runner import run_sequence
    from parallel.distributed import init_distributed, shutdown_distributed

    config_path, overrides = split_config_and_overrides(args.items)
    cfg = load_config(config_path, overrides)
    plan = plan_sequence(cfg)  # every request's config checked before any work
    ctx = init_distributed(cfg.parallel.timeout_minutes)
    setup_logging(ctx.rank, args.verbose or cfg.logging.verbose)

    def barrier() -> None:
        if ctx.distributed:
            torch.distributed.barrier()

    # between runs (scoring a model) a stop signal marks this flag, as it marks a trainer during a run
    between = SimpleNamespace(stop_requested=False)

    def train(run_cfg: ExperimentConfig) -> bool:
        stopped = train_in_context(run_cfg, ctx, say_next=False)
        install_stop_handlers(between)  # the run's trainer is gone: its handlers would mark nothing
        return stopped

    def stop_requested() -> bool:
        """Whether any rank got a stop signal while scoring (all ranks agree: one all-reduce)."""
        flag = torch.tensor([float(between.stop_requested)], device=ctx.device)
        if ctx.distributed:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, *STOP_SIGNALS)}
    install_stop_handlers(between)
    try:
        stopped = run_sequence(
            plan,
            ctx,
            train=train,
            evaluate=lambda model, sets, folder: evaluate_sets(cfg, ctx, model, sets, folder),
            overwrite=args.overwrite,
            barrier=barrier,
            stop_requested=stop_requested,
        )
        return after_stop(cfg, ctx) if stopped else 0
    except RuntimeError as err:
        return peer_failure_exit(err, ctx)
    finally:
        for sig, handler in handlers.items():  # as before the sequence (tests run it in their own process)
            signal.signal(sig, handler)
        shutdown_distributed()


def evaluate_sets(cfg: ExperimentConfig, ctx, model_dir: Path | str, sets, folder: Path) -> None:
    """Score `model_dir` on each set as `ngdiff eval --forget/--retain` does (the same loading, evaluator and
    output files), or with MUSE's metrics under eval.benchmark=muse (ngdiff.sequence.muse_cells), one folder per
    set under `folder`; sharded with the run's backend under fsdp / zero3."""
    from launcher.eval_cli import load_model
    from ngdiff.eval.benchmark import BenchmarkSpec, run_benchmark
    from ngdiff.eval.report import write_outputs
    from ngdiff.eval.sharding import EvalDist
    from ngdiff.eval.tofu import custom_sets, missing_metrics
    from ngdiff.modeling import load_tokenizer
    from ngdiff.sequence.muse_cells import score_muse_cell
    from ngdiff.sequence.plan import muse_cells

    backend = cfg.parallel.backend if cfg.parallel.backend in ("fsdp", "zero3") else ""
    how = argparse.Namespace(backend=backend, trust_remote_code=cfg.model.trust_remote_code)
    model, sharded = load_model(how, Path(model_dir), ctx)
    tokenizer = load_tokenizer(str(model_dir), cfg.model.trust_remote_code)
    ed = EvalDist(ctx.rank, ctx.world_size, sharded)
    muse = muse_cells(cfg)
    for eval_set in sets:
        start = time.perf_counter()
        if muse:
            items, metrics = score_muse_cell(model, tokenizer, cfg, eval_set.role, eval_set.path, ed)
            settings = {"verbmem_prompt_words": cfg.sequence.verbmem_prompt_words, "data_dir": cfg.eval.data_dir}
        else:
            forget, retain = (str(eval_set.path), None) if eval_set.role == "forget" else (None, str(eval_set.path))
            spec = BenchmarkSpec(
                "tofu",
                max_items=cfg.eval.max_items,
                batch_size=cfg.eval.batch_size,
                max_new_tokens=cfg.eval.max_new_tokens,
                prompt_template=cfg.data.prompt_template,
                custom=custom_sets(forget, retain),
            )
            items, metrics = run_benchmark(model, tokenizer, spec, ed=ed)
            settings = {"max_new_tokens": cfg.eval.max_new_tokens, "prompt_template": cfg.data.prompt_template}
        if ctx.is_main:
            meta = {
                "model": str(model_dir),
                "split": f"{eval_set.role}: {eval_set.path}",
                "max_items": cfg.eval.max_items,
                **settings,
                "ranks": ctx.world_size,
                "seconds": round(time.perf_counter() - start, 2),
                "not computed": {} if muse else missing_metrics(items, metrics),
            }
            write_outputs(folder / eval_set.name, "muse" if muse else "tofu", items, metrics, meta)
    del model
