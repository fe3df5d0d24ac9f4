"""From a validated config to a finished run: data, model, backend, trainer, export.

Order matters for users: everything that can fail cheaply (tokenizer, data files, lengths, batch
sizes) is checked before the model is built.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ngdiff.combiners import FORGET
from ngdiff.data.overlap import warn_about_overlap
from ngdiff.finite import require_finite_weights
from ngdiff.lora import AdaptersDisabled, WithAdapters
from ngdiff.metrics_log import JsonlSink, MetricsSink, jsonable
from ngdiff.model_source import loading_from
from ngdiff.modeling import load_tokenizer, model_factory
from ngdiff.objectives import build_objectives
from ngdiff.objectives.representation import TrainOnly
from ngdiff.tasks import Task, build_tasks, steps_per_epoch
from ngdiff.trainer import StepResult, Trainer
from parallel import build_backend
from parallel.base import DistContext
from parallel.compat import log_patches

if TYPE_CHECKING:
    from ngdiff.config import ExperimentConfig
    from ngdiff.eval.during_training import EvaluateFactory

log = logging.getLogger("ngdiff")


@dataclass
class RunOutcome:
    trainer: Trainer
    results: list[StepResult]
    final_dir: Path | None


FEW_STEPS = 20  # fewer steps than this leave AutoLR (every 4 steps) a handful of fits: rarely a finished unlearning


def total_steps(cfg: ExperimentConfig, tasks: Sequence[Task]) -> int:
    """train.max_steps, else train.epochs over the first forget set."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * steps_per_epoch(tasks)))


def few_steps_warning(cfg: ExperimentConfig, tasks: Sequence[Task], steps: int) -> str:
    """The warning a run gets when `train.epochs` over a small forget set gives very few steps ("" if not)."""
    if cfg.train.max_steps > 0 or steps >= FEW_STEPS:
        return ""
    forget = next(task for task in tasks if task.role == FORGET)
    return (
        f"only {steps} unlearning step{'s' if steps != 1 else ''}: train.epochs={cfg.train.epochs:g} over "
        f"{len(forget.stream.examples)} forget records at train.forget_batch_size={cfg.train.forget_batch_size}; "
        f"for a longer run set train.max_steps (e.g. train.max_steps={FEW_STEPS * 2}), more train.epochs or a "
        "smaller train.forget_batch_size"
    )


def trainer_order(cfg: ExperimentConfig) -> tuple[float, ...]:
    """method.task_weights (data.forget's files, then data.retain's) in the trainer's order (retain first)."""
    weights, n_forget = cfg.method.task_weights, len(cfg.data.forget)
    return tuple(weights[n_forget:]) + tuple(weights[:n_forget]) if weights else ()


def build_trainer(
    cfg: ExperimentConfig,
    ctx: DistContext,
    *,
    sinks: Sequence[MetricsSink] = (),
    evaluate_factory: EvaluateFactory | None = None,
    max_steps: int | None = None,
    build_model: Callable[[], torch.nn.Module] | None = None,
) -> Trainer:
    """Tokenizer, tasks, backend with the model (and the frozen reference), trainer: everything a run
    builds before its loop, data first (cheap failures before the model). `sinks` and
    `evaluate_factory(backend, tokenizer)` are handed to the trainer; benchmarks may override the
    config's `max_steps` and build the model from a config (`build_model`) instead of model.path."""
    torch.manual_seed(cfg.train.seed)
    with loading_from("model.path", cfg.model.path):
        tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    forget_objective, retain_objective = build_objectives(
        cfg.method.forget_objective, cfg.method.retain_objective, method=cfg.method, seed=cfg.train.seed
    )
    tasks = build_tasks(cfg, tokenizer, ctx, forget_objective, retain_objective)
    if ctx.is_main:
        warn_about_overlap(cfg.data)
        log.info(
            "data: %s; loading %s on the %s backend (%d rank%s)",
            ", ".join(f"{len(task.stream.examples)} {task.name}" for task in tasks),
            cfg.model.path,
            cfg.parallel.backend,
            ctx.world_size,
            "s" if ctx.world_size > 1 else "",
        )

    backend = build_backend(cfg.parallel.backend, ctx, cfg.parallel, cfg.optim, cfg.train.precision)
    layout = tasks[-1].stream  # DeepSpeed checks one batch layout: a forget task's
    backend.set_batch_layout(layout.micro, layout.accumulation_steps)
    build = build_model or model_factory(cfg.model.path, cfg.model.trust_remote_code)
    if cfg.model.lora.enabled:
        build = WithAdapters(build, cfg.model.lora, cfg.train.seed)
    if cfg.method.rmu_trainable:
        build = TrainOnly(build, cfg.method.rmu_trainable)
    backend.prepare(build, cfg.model.gradient_checkpointing)
    log_patches()  # which library internals this run patches (DEBUG: -v), once the engine is loaded
    reference = None
    needs_reference = any(task.objective is not None and task.objective.needs_reference for task in tasks)
    if needs_reference and cfg.model.lora.enabled and not cfg.model.reference_path:
        reference = AdaptersDisabled(backend.module)  # the base model itself: no second copy
    elif needs_reference:
        reference_path = cfg.model.reference_path or cfg.model.path
        key = "model.reference_path" if cfg.model.reference_path else "model.path"
        reference = backend.prepare_frozen(model_factory(reference_path, cfg.model.trust_remote_code, key=key))

    evaluate = evaluate_factory(backend, tokenizer) if evaluate_factory is not None else None
    if max_steps is None:
        max_steps = total_steps(cfg, tasks)
        warning = few_steps_warning(cfg, tasks, max_steps)
        if warning and ctx.is_main:
            log.warning("%s", warning)
    return Trainer(
        cfg,
        backend,
        tasks,
        max_steps=max_steps,
        reference=reference,
        sinks=sinks,
        evaluate=evaluate,
        tokenizer=tokenizer,
        task_weights=trainer_order(cfg),
    )


def run_training(
    cfg: ExperimentConfig,
    ctx: DistContext,
    *,
    sinks: Sequence[MetricsSink] = (),
    evaluate_factory: EvaluateFactory | None = None,
    on_trainer: Callable[[Trainer], None] | None = None,
) -> RunOutcome:
    """Train per `cfg`; rank 0 writes metrics.jsonl and, when the run completes, `final/`.

    `evaluate_factory(backend, tokenizer)` builds the periodic evaluation; `on_trainer` lets the
    launcher attach signal handlers to the trainer before the loop starts.
    """
    output_dir = Path(cfg.output_dir)
    trainer = build_trainer(cfg, ctx, sinks=sinks, evaluate_factory=evaluate_factory)
    if ctx.is_main:  # opened once everything is built: a run that fails to start leaves no metrics file
        trainer.sinks.insert(0, JsonlSink(output_dir / "metrics.jsonl", append=cfg.train.resume == "auto"))
    all_sinks, max_steps = trainer.sinks, trainer.max_steps
    if on_trainer is not None:
        on_trainer(trainer)
    if ctx.is_main:
        log.info(
            "unlearning: %d steps (%s); metrics in %s",
            max_steps,
            cfg.method.combiner,
            output_dir / "metrics.jsonl",
        )
    try:
        results = trainer.fit()
        final_dir = None
        if trainer.finished or (results and not results[-1].stop_requested):
            final_dir = output_dir / "final"
            require_finite_weights(trainer.backend, trainer.step_index)
            trainer.export(final_dir)
            if ctx.is_main:
                summary = {"steps": trainer.step_index, "final_lr": trainer.lr}
                if results:
                    summary.update({f"last_{k}": v for k, v in results[-1].metrics().items()})
                # strict JSON: a NaN metric (e.g. a rejected AutoLR fit's A) is written as the string "nan"
                text = json.dumps({k: jsonable(v) for k, v in summary.items()}, indent=1, allow_nan=False)
                (output_dir / "summary.json").write_text(text)
                log.info("final model written to %s", final_dir)
    finally:
        for sink in all_sinks:
            sink.finish()
        trainer.backend.close()  # process-wide engine state (ZeRO-3's zero.Init hook) ends with the run
    return RunOutcome(trainer, results, final_dir)
