"""The unlearning loop. `Trainer.unlearning_step` is the whole method in one function.

Gradients are taken of each task's loss *sum* (over its units: tokens or sequences); the one
all-reduce of the step carries the Gram partial sums, the loss sums and the unit counts, after which
every quantity is the mean over the whole global batch. So one process and N processes, with or
without accumulation, compute the same update, and no count needs its own collective.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ngdiff.autolr import AutoLR, AutoLRRecord
from ngdiff.checkpoint import checkpoint_root, latest_complete, load_checkpoint, save_checkpoint
from ngdiff.combiners import CombinerOptions, TaskStats, Weights, get_combiner
from ngdiff.data.loader import MicroBatch, TaskStream
from ngdiff.metrics_log import MetricsSink
from ngdiff.objectives import Objective
from ngdiff.schedule import lr_factor, warmup_steps_of

log = logging.getLogger("ngdiff.trainer")


@dataclass
class StepResult:
    stats: TaskStats
    weights: Weights
    lr: float
    autolr: AutoLRRecord | None
    stop_requested: bool

    def metrics(self) -> dict[str, float]:
        s, w = self.stats, self.weights
        out = {
            "loss_retain": s.loss_retain,
            "loss_forget": s.loss_forget,
            "grad_norm_retain": s.norm_retain,
            "grad_norm_forget": s.norm_forget,
            "cos_retain_forget": s.cosine,
            "w_retain": w.retain,
            "w_forget": w.forget,
            "lr": self.lr,
        }
        if self.autolr is not None:
            out.update(self.autolr.as_metrics())
        return out


def gram_partial_sums(retain: Sequence[torch.Tensor], forget: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's contributions to |g_R|^2, <g_R, g_F>, |g_F|^2, accumulated in float64."""
    zero = torch.zeros((), dtype=torch.float64, device=forget[0].device if forget else "cpu")
    aa, cc, bb = zero.clone(), zero.clone(), zero.clone()
    for r, f in zip(retain, forget, strict=True):
        r, f = r.reshape(-1), f.reshape(-1)
        aa += torch.dot(r, r).double()
        cc += torch.dot(r, f).double()
        bb += torch.dot(f, f).double()
    return [aa, cc, bb]


def clip_weights(weights: Weights, stats: TaskStats, max_norm: float) -> Weights:
    """Scale both weights so |d| <= max_norm; |d| comes from the Gram matrix, no extra collective."""
    if max_norm <= 0:
        return weights
    norm = math.sqrt(max(weights.direction_norm_sq(stats), 0.0))
    if norm <= max_norm:
        return weights
    factor = max_norm / norm
    return Weights(weights.retain * factor, weights.forget * factor)


class Trainer:
    def __init__(
        self,
        cfg,
        backend,
        forget_stream: TaskStream,
        retain_stream: TaskStream,
        forget_objective: Objective,
        retain_objective: Objective | None,
        *,
        max_steps: int,
        reference: torch.nn.Module | None = None,
        sinks: Sequence[MetricsSink] = (),
        evaluate: Callable[[int], dict[str, Any]] | None = None,
        tokenizer: Any = None,
    ):
        self.cfg = cfg
        self.backend = backend
        self.forget_stream = forget_stream
        self.retain_stream = retain_stream
        self.forget_objective = forget_objective
        self.retain_objective = retain_objective
        self.reference = reference
        self.max_steps = max_steps
        self.sinks = list(sinks)
        self.evaluate = evaluate
        self.tokenizer = tokenizer
        self.combine = get_combiner(cfg.method.combiner)
        self.combiner_options = CombinerOptions(cfg.method.gdiff_coefficient, cfg.train.seed)
        self.autolr = AutoLR(cfg.autolr, backend, max_steps, cfg.optim.name)
        self.lr = cfg.optim.lr  # the base lr; AutoLR, when on, maintains it
        self.warmup_steps = warmup_steps_of(
            cfg.optim.warmup_steps, cfg.optim.warmup_epochs, forget_stream.batches_per_epoch
        )
        self.step_index = 0
        self.stop_requested = False  # set by a signal handler; all ranks agree through the step's all-reduce
        self.output_dir = Path(cfg.output_dir)

    # ------------------------------------------------------------------ the method
    def unlearning_step(self) -> StepResult:
        backend = self.backend
        device = backend.ctx.device
        backend.zero_grad()
        retain_batches = self.retain_stream.next()
        retain_sum, retain_count = self.accumulate(self.retain_objective, retain_batches)
        retain_grads = [g.detach().clone() for g in backend.local_grads()]  # one gradient shard aside
        backend.zero_grad()
        forget_batches = self.forget_stream.next()
        forget_sum, forget_count = self.accumulate(self.forget_objective, forget_batches)
        forget_grads = backend.local_grads()  # live: the combination is written here, in place

        partial = gram_partial_sums(
            backend.inner_product_views(retain_grads), backend.inner_product_views(forget_grads)
        )
        counts = torch.tensor(
            [retain_count, forget_count, float(self.stop_requested)], dtype=torch.float64, device=device
        )
        totals = backend.all_reduce_sum(torch.cat([torch.stack([*partial, retain_sum, forget_sum]), counts]))
        aa, cc, bb, sum_r, sum_f, n_r, n_f, stop = totals.tolist()
        n_r, n_f = max(n_r, 1.0), max(n_f, 1.0)
        stats = TaskStats(
            a=aa / n_r**2,
            b=bb / n_f**2,
            c=cc / (n_r * n_f),
            loss_retain=sum_r / n_r,
            loss_forget=sum_f / n_f,
            step=self.step_index,
        )
        weights = clip_weights(self.combine(stats, self.combiner_options), stats, self.cfg.optim.max_grad_norm)
        for forget, retain in zip(forget_grads, retain_grads, strict=True):
            forget.mul_(weights.forget / n_f).add_(retain, alpha=weights.retain / n_r)
        backend.set_local_grads(forget_grads)
        del retain_grads

        record = None
        factor = self.lr_factor()
        if self.autolr.due(self.step_index) and factor > 0:
            step_sums = totals[[3, 5, 4, 6]]  # [sum_R, units_R, sum_F, units_F] at theta_before
            record = self.autolr_step(weights, retain_batches, forget_batches, step_sums, factor)
        else:
            backend.step(self.lr * factor)
        return StepResult(stats, weights, self.lr * factor, record, stop > 0)

    def lr_factor(self) -> float:
        """optim.schedule's multiplier at this step: the step moves at lr x factor. With AutoLR on, the
        factor multiplies the lr AutoLR maintains (AutoLR fits on the scheduled step and keeps the base)."""
        return lr_factor(self.cfg.optim.schedule, self.step_index, self.warmup_steps, self.max_steps)

    def accumulate(self, objective: Objective | None, micro_batches: list[MicroBatch]) -> tuple[torch.Tensor, int]:
        """Backward of the objective's sum over this rank's micro-batches; returns (sum, units)."""
        backend = self.backend
        total = torch.zeros((), dtype=torch.float64, device=backend.ctx.device)
        if objective is None:  # e.g. plain gradient ascent has no retain task
            return total, 0
        count = 0
        for index, batch in enumerate(micro_batches):
            count += objective.count(batch)  # on the host copy: no device sync
            batch = self.to_device(batch)
            last = index == len(micro_batches) - 1
            with backend.micro_batch(last=last):
                with backend.autocast():
                    loss_sum = objective.loss_sum(backend.model, batch, self.reference)
                backend.backward(loss_sum * backend.gradient_scale, last_micro_batch=last)
            total += loss_sum.detach().double()
        return total, count

    def autolr_step(
        self,
        weights: Weights,
        retain_batches: list[MicroBatch],
        forget_batches: list[MicroBatch],
        step_sums: torch.Tensor,
        factor: float = 1.0,
    ) -> AutoLRRecord:
        """Step, probe the loss along the step, refit lr (see ngdiff/autolr.py).

        `autolr.probe_batch=fresh` probes newly drawn batches; `step` probes the step's own batches
        and takes r = 0 from the step's forward (`step_sums`, all-reduced), saving one forward.
        The step moves at lr x factor (optim.schedule); AutoLR fits that step and keeps the base lr.
        """
        combined = self.cfg.autolr.probe_loss == "combined"
        at_zero = step_sums if self.cfg.autolr.probe_batch == "step" else None
        if at_zero is None:
            retain_batches = self.retain_stream.next()
            forget_batches = self.forget_stream.next() if combined else []
        elif not combined:
            forget_batches = []

        device = self.backend.ctx.device

        @torch.no_grad()
        def probe_sums() -> torch.Tensor:
            """[loss sum, units] of each task on this rank, kept on the device (one stack, no syncs)."""
            sums = []
            for objective, batches in (
                (self.retain_objective, retain_batches),
                (self.forget_objective, forget_batches),
            ):
                total, count = torch.zeros((), dtype=torch.float64, device=device), 0
                for batch in batches if objective is not None else ():
                    count += objective.count(batch)
                    with self.backend.autocast():
                        total += objective.loss_sum(self.backend.model, self.to_device(batch), self.reference).double()
                sums += [total, torch.tensor(float(count), dtype=torch.float64, device=device)]
            return torch.stack(sums)

        def probe_loss(row: torch.Tensor) -> float:
            value = float(row[0] / row[1].clamp_min(1))
            if combined:
                value = weights.retain * value + weights.forget * float(row[2] / row[3].clamp_min(1))
            return value

        record = self.autolr.step(self.lr * factor, self.step_index, probe_sums, probe_loss, at_zero)
        self.lr = record.lr_after / factor
        return record

    def to_device(self, batch: MicroBatch) -> MicroBatch:
        device = self.backend.ctx.device
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    # ------------------------------------------------------------------ the loop
    def fit(self) -> list[StepResult]:
        ctx = self.backend.ctx
        root = checkpoint_root(self.output_dir)
        if self.cfg.train.resume == "auto":
            newest = latest_complete(root)
            if newest is not None:
                self.load_state(load_checkpoint(self.backend, newest))
                if ctx.is_main:
                    log.info("resumed from %s (step %d)", newest, self.step_index)
        progress = self._progress()
        results = []
        save_every, eval_every = self.cfg.train.save_every, self.cfg.eval.every
        while self.step_index < self.max_steps:
            result = self.unlearning_step()
            self.step_index += 1
            results.append(result)
            metrics = result.metrics()
            if self.step_index % self.cfg.train.log_every == 0 or self.step_index == self.max_steps:
                self.emit(metrics)
            if progress is not None:
                progress.set_postfix(
                    forget=f"{result.stats.loss_forget:.3f}",
                    retain=f"{result.stats.loss_retain:.3f}",
                    lr=f"{result.lr:.2e}",
                    refresh=False,  # update() redraws at the bar's own pace, not once per step in Slurm logs
                )
                progress.update(1)
            target = self.cfg.train.stop_forget_loss
            reached = target > 0 and result.stats.loss_forget >= target
            last = self.step_index == self.max_steps or reached or result.stop_requested
            periodic = eval_every and self.step_index % eval_every == 0
            # a preempted run checkpoints at once and skips evaluation: the warning time is short
            if self.evaluate is not None and not result.stop_requested and (last or periodic):
                self.emit(self.evaluate(self.step_index))
            if result.stop_requested or (save_every and self.step_index % save_every == 0) or (last and save_every):
                save_checkpoint(self.backend, root, self.step_index, self.state())
            if reached and ctx.is_main:
                log.info(
                    "forget loss %.3f reached train.stop_forget_loss=%.3f at step %d",
                    result.stats.loss_forget,
                    target,
                    self.step_index,
                )
            if result.stop_requested:
                if ctx.is_main:
                    log.warning("stop requested: checkpoint written at step %d", self.step_index)
                break
            if reached:
                break
        if progress is not None:
            progress.close()
        return results

    @property
    def finished(self) -> bool:
        return self.step_index >= self.max_steps

    def emit(self, metrics: dict[str, Any]) -> None:
        if self.backend.ctx.is_main and metrics:
            for sink in self.sinks:
                sink.log(metrics, self.step_index)

    def _progress(self):
        if not (self.backend.ctx.is_main and self.cfg.logging.progress):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.max_steps, initial=self.step_index, desc="unlearning", unit="step", dynamic_ncols=True)

    def export(self, directory: Path) -> None:
        self.backend.export_pretrained(directory, self.tokenizer)
        self.backend.barrier()

    # ------------------------------------------------------------------ resumable state
    def state(self) -> dict[str, Any]:
        return {
            "step": self.step_index,
            "lr": self.lr,
            "forget_stream": self.forget_stream.state_dict(),
            "retain_stream": self.retain_stream.state_dict(),
            "autolr": self.autolr.state_dict(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.step_index = int(state["step"])
        self.lr = float(state["lr"])
        self.forget_stream.load_state_dict(state["forget_stream"])
        self.retain_stream.load_state_dict(state["retain_stream"])
        if "autolr" in state:  # checkpoints written before the acceptance rate was logged lack it
            self.autolr.load_state_dict(state["autolr"])
