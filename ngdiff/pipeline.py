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
from typing import Any

import torch

from ngdiff.data import TaskStream, encode_task
from ngdiff.metrics_log import JsonlSink, MetricsSink
from ngdiff.modeling import load_tokenizer, model_factory
from ngdiff.objectives import build_objectives
from ngdiff.trainer import StepResult, Trainer
from parallel import build_backend
from parallel.base import DistContext

log = logging.getLogger("ngdiff")


@dataclass
class RunOutcome:
    trainer: Trainer
    results: list[StepResult]
    final_dir: Path | None


def build_streams(cfg, tokenizer, ctx: DistContext, refusals: bool) -> tuple[TaskStream, TaskStream]:
    refusals_from = cfg.data.idk if refusals else None
    forget = encode_task(cfg.data, tokenizer, cfg.data.forget, "data.forget", refusals_from, seed=cfg.train.seed)
    retain = encode_task(cfg.data, tokenizer, cfg.data.retain, "data.retain")
    common = dict(
        rank=ctx.rank, world_size=ctx.world_size, micro_batch=cfg.train.micro_batch_size, pad_id=tokenizer.pad_token_id
    )
    forget_stream = TaskStream(forget, cfg.train.forget_batch_size, seed=cfg.train.seed, name="forget", **common)
    retain_stream = TaskStream(retain, cfg.train.retain_batch_size, seed=cfg.train.seed + 1, name="retain", **common)
    return forget_stream, retain_stream


def total_steps(cfg, forget_stream: TaskStream) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * forget_stream.batches_per_epoch))


def run_training(
    cfg,
    ctx: DistContext,
    *,
    sinks: Sequence[MetricsSink] = (),
    evaluate_factory: Callable[[Any, Any], Callable[[int], dict[str, Any]]] | None = None,
    on_trainer: Callable[[Trainer], None] | None = None,
) -> RunOutcome:
    """Train per `cfg`; rank 0 writes metrics.jsonl and, when the run completes, `final/`.

    `evaluate_factory(backend, tokenizer)` builds the periodic evaluation; `on_trainer` lets the
    launcher attach signal handlers to the trainer before the loop starts.
    """
    torch.manual_seed(cfg.train.seed)
    output_dir = Path(cfg.output_dir)
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    forget_objective, retain_objective = build_objectives(
        cfg.method.forget_objective,
        cfg.method.retain_objective,
        cfg.method.npo_beta,
        cfg.method.simnpo_beta,
        cfg.method.simnpo_gamma,
    )
    refusals = getattr(forget_objective, "uses_refusals", False)
    forget_stream, retain_stream = build_streams(cfg, tokenizer, ctx, refusals)
    max_steps = total_steps(cfg, forget_stream)

    backend = build_backend(cfg.parallel.backend, ctx, cfg.parallel, cfg.optim, cfg.train.precision)
    backend.set_batch_layout(forget_stream.micro, forget_stream.accumulation_steps)
    backend.prepare(model_factory(cfg.model.path, cfg.model.trust_remote_code), cfg.model.gradient_checkpointing)
    reference = None
    if forget_objective.needs_reference or (retain_objective is not None and retain_objective.needs_reference):
        reference_path = cfg.model.reference_path or cfg.model.path
        reference = backend.prepare_frozen(model_factory(reference_path, cfg.model.trust_remote_code))

    all_sinks: list[MetricsSink] = list(sinks)
    if ctx.is_main:
        all_sinks.insert(0, JsonlSink(output_dir / "metrics.jsonl", append=cfg.train.resume == "auto"))
    evaluate = evaluate_factory(backend, tokenizer) if evaluate_factory is not None else None
    trainer = Trainer(
        cfg,
        backend,
        forget_stream,
        retain_stream,
        forget_objective,
        retain_objective,
        max_steps=max_steps,
        reference=reference,
        sinks=all_sinks,
        evaluate=evaluate,
        tokenizer=tokenizer,
    )
    if on_trainer is not None:
        on_trainer(trainer)
    try:
        results = trainer.fit()
        final_dir = None
        if trainer.finished or (results and not results[-1].stop_requested):
            final_dir = output_dir / "final"
            trainer.export(final_dir)
            if ctx.is_main:
                summary = {"steps": trainer.step_index, "final_lr": trainer.lr}
                if results:
                    summary.update({f"last_{k}": v for k, v in results[-1].metrics().items()})
                (output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
                log.info("final model written to %s", final_dir)
    finally:
        for sink in all_sinks:
            sink.finish()
    return RunOutcome(trainer, results, final_dir)
