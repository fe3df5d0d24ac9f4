"""The unlearning loop. `Trainer.unlearning_step` is the whole method in one function.

The step loops over k tasks (ngdiff/tasks.py): each task's backward, its gradient taken out of the
engine; one all-reduce gives the Gram matrix and the losses of the whole global batch; the combiner
turns them into weights; the gradient becomes sum_i w_i g_i; the optimizer steps. The gradient
algebra (stash, Gram sums, the packed all-reduce, the in-place combination) is `parallel/grads.py`'s,
so one process and N processes, with or without accumulation, compute the same update.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ngdiff.autolr import AutoLR, AutoLRRecord
from ngdiff.checkpoint import checkpoint_root, load_checkpoint, resumable_checkpoint, save_checkpoint
from ngdiff.combiners import FORGET, RETAIN, CombinerOptions, TaskStats, Weights, direction_norm_sq, get_combiner
from ngdiff.data.loader import MicroBatch
from ngdiff.finite import require_finite, step_quantities
from ngdiff.metrics_log import MetricsSink, peak_memory_mb
from ngdiff.objectives import Objective
from ngdiff.run_folder import PathGuard
from ngdiff.schedule import lr_factor, warmup_steps_of
from ngdiff.tasks import Task, steps_per_epoch
from parallel.grads import StepGradients

if TYPE_CHECKING:
    from ngdiff.config import ExperimentConfig
    from parallel.base import Backend

log = logging.getLogger("ngdiff.trainer")


@dataclass
class StepResult:
    stats: TaskStats
    weights: Weights
    lr: float
    autolr: AutoLRRecord | None
    stop_requested: bool
    names: tuple[str, ...]  # the tasks, in the order of stats and weights
    input_tokens: float = 0.0  # every task's non-padding input tokens of the step, all ranks
    seconds: float = 0.0  # the step's wall time (set by the fit loop)
    peak_memory_mb: float = 0.0  # see ngdiff.metrics_log.peak_memory_mb

    def loss_of_role(self, role: str) -> float:
        """The least-forgotten forget task's loss (min), the worst-kept retain task's loss (max): what the
        stopping rule watches and `loss_forget` / `loss_retain` report when a role has several tasks."""
        losses = [self.stats.losses[i] for i in self.stats.of_role(role)]
        return min(losses) if role == FORGET else max(losses)

    @property
    def loss_forget(self) -> float:
        return self.loss_of_role(FORGET)

    @property
    def loss_retain(self) -> float:
        return self.loss_of_role(RETAIN)

    def metrics(self) -> dict[str, float]:
        s, names = self.stats, self.names
        out = {}
        for i, name in enumerate(names):
            out[f"loss_{name}"] = s.losses[i]
        out.update({f"loss_{role}": self.loss_of_role(role) for role in (RETAIN, FORGET)})
        out.update({f"grad_norm_{name}": s.norm(i) for i, name in enumerate(names)})
        out.update({f"cos_{names[i]}_{names[j]}": s.cosine(i, j) for i, j in itertools.combinations(range(s.k), 2)})
        out.update({f"w_{name}": w for name, w in zip(names, self.weights, strict=True)})
        out["lr"] = self.lr
        if self.seconds > 0:
            out["step_seconds"] = self.seconds
            out["tokens_per_second"] = self.input_tokens / self.seconds
            out["peak_memory_mb"] = self.peak_memory_mb
        if self.autolr is not None:
            out.update(self.autolr.as_metrics())
        return out


def input_tokens(micro_batches: Sequence[MicroBatch]) -> int:
    """Non-padding input tokens of this rank's micro-batches (host copies: no device sync); the
    throughput's unit whatever the objective normalises by (tokens or sequences)."""
    return sum(int(batch["attention_mask"].sum()) for batch in micro_batches)


def clip_weights(weights: Weights, stats: TaskStats, max_norm: float) -> Weights:
    """Scale all weights so |d| <= max_norm; |d| comes from the Gram matrix, no extra collective."""
    if max_norm <= 0:
        return weights
    norm = math.sqrt(max(direction_norm_sq(weights, stats), 0.0))
    if norm <= max_norm:
        return weights
    factor = max_norm / norm
    return tuple(w * factor for w in weights)


def scaled(weights: Weights, task_weights: Sequence[float]) -> Weights:
    """`method.task_weights`: a multiplier per task on the combiner's weight (none: all ones)."""
    if not task_weights:
        return weights
    return tuple(w * t for w, t in zip(weights, task_weights, strict=True))


class Trainer:
    def __init__(
        self,
        cfg: ExperimentConfig,
        backend: Backend,
        tasks: Sequence[Task],
        *,
        max_steps: int,
        reference: torch.nn.Module | None = None,
        sinks: Sequence[MetricsSink] = (),
        evaluate: Callable[..., dict[str, Any]] | None = None,  # evaluate(step, final=bool)
        tokenizer: Any = None,
        task_weights: Sequence[float] = (),
    ):
        """`tasks` in the order the step computes them (retain first, see ngdiff/tasks.py); the last one's
        live gradient receives the combination. `task_weights`: one multiplier per task, same order."""
        roles = {task.role for task in tasks}
        if roles != {RETAIN, FORGET}:
            raise ValueError(f"an unlearning run needs at least one retain and one forget task, got roles {roles}")
        if task_weights and len(task_weights) != len(tasks):
            raise ValueError(f"{len(task_weights)} task weights for {len(tasks)} tasks")
        self.cfg = cfg
        self.backend = backend
        self.tasks = list(tasks)
        self.names = tuple(task.name for task in self.tasks)
        self.roles = tuple(task.role for task in self.tasks)
        self.task_weights = tuple(task_weights)
        self.reference = reference
        self.max_steps = max_steps
        self.sinks = list(sinks)
        self.evaluate = evaluate
        self.tokenizer = tokenizer
        self.combine = get_combiner(cfg.method.combiner)
        method = cfg.method
        self.combiner_options = CombinerOptions(
            method.gdiff_coefficient, cfg.train.seed, method.blur_gamma, method.cagrad_c, method.fairgrad_alpha
        )
        self.autolr = AutoLR(cfg.autolr, backend, max_steps, cfg.optim.name)
        self.lr = cfg.optim.lr  # the base lr; AutoLR, when on, maintains it
        self.warmup_steps = warmup_steps_of(cfg.optim.warmup_steps, cfg.optim.warmup_epochs, steps_per_epoch(tasks))
        self.step_index = 0
        self.stop_requested = False  # set by a signal handler; all ranks agree through the step's all-reduce
        self.output_dir = Path(cfg.output_dir)

    # ------------------------------------------------------------------ the method
    def unlearning_step(self) -> StepResult:
        backend, parallel = self.backend, self.cfg.parallel
        backend.zero_grad()
        grads = StepGradients(backend, len(self.tasks), parallel.stash_dtype, parallel.stash_offload)
        batches, sums, counts = [], [], []
        for task in self.tasks:  # g_i: each task's backward, taken out of the engine (the last stays live)
            batches.append(task.stream.next())
            loss_sum, count = self.accumulate(task.objective, batches[-1])
            sums.append(loss_sum)
            counts.append(count)
            grads.take()
        local_tokens = sum(input_tokens(b) for t, b in zip(self.tasks, batches, strict=True) if t.objective is not None)
        reduced = grads.reduce(sums, counts, [float(self.stop_requested), local_tokens])  # the one all-reduce
        stop, tokens = reduced.extras
        stats = TaskStats(reduced.gram, reduced.losses, self.roles, self.step_index)
        require_finite(self.step_index + 1, step_quantities(self.names, stats))  # all-reduced: every rank raises
        weights = scaled(self.combine(stats, self.combiner_options), self.task_weights)
        weights = clip_weights(weights, stats, self.cfg.optim.max_grad_norm)
        require_finite(self.step_index + 1, dict(zip((f"w_{name}" for name in self.names), weights, strict=True)))
        grads.combine(weights)  # d = sum_i w_i g_i, written in place as the engine's gradient

        record = None
        factor = self.lr_factor()
        if self.autolr.due(self.step_index) and factor > 0:
            record = self.autolr_step(weights, batches, reduced.loss_rows, factor)
        else:
            backend.step(self.lr * factor)
        return StepResult(stats, weights, self.lr * factor, record, stop > 0, self.names, input_tokens=tokens)

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
        self, weights: Weights, batches: list[list[MicroBatch]], step_sums: torch.Tensor, factor: float = 1.0
    ) -> AutoLRRecord:
        """Step, probe the loss along the step, refit lr (see ngdiff/autolr.py).

        The probed loss is the mean of the retain tasks' losses (`autolr.probe_loss=retain`) or the
        combination sum_i w_i L_i (`combined`). `autolr.probe_batch=fresh` probes newly drawn batches;
        `step` probes the step's own batches and takes r = 0 from the step's forward (`step_sums`:
        [sum_i, units_i] per task, all-reduced), saving one forward. The step moves at lr x factor
        (optim.schedule); AutoLR fits that step and keeps the base lr.
        """
        combined = self.cfg.autolr.probe_loss == "combined"
        at_zero = step_sums if self.cfg.autolr.probe_batch == "step" else None
        probed = [combined or task.role == RETAIN for task in self.tasks]
        if at_zero is None:
            batches = [task.stream.next() if used else [] for task, used in zip(self.tasks, probed, strict=True)]
        device = self.backend.ctx.device

        @torch.no_grad()
        def probe_sums() -> torch.Tensor:
            """[loss sum, units] of each task on this rank, kept on the device (one stack, no syncs)."""
            sums = []
            for task, task_batches, used in zip(self.tasks, batches, probed, strict=True):
                total, count = torch.zeros((), dtype=torch.float64, device=device), 0
                objective = task.objective
                for batch in task_batches if used and objective is not None else ():
                    count += objective.count(batch)
                    with self.backend.autocast():
                        total += objective.loss_sum(self.backend.model, self.to_device(batch), self.reference).double()
                sums += [total, torch.tensor(float(count), dtype=torch.float64, device=device)]
            return torch.stack(sums)

        retain = [i for i, role in enumerate(self.roles) if role == RETAIN]

        def probe_loss(row: torch.Tensor) -> float:
            losses = (row[0::2] / row[1::2].clamp_min(1)).tolist()
            if combined:
                return sum(w * loss for w, loss in zip(weights, losses, strict=True))
            return sum(losses[i] for i in retain) / len(retain)

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
            newest = resumable_checkpoint(self.backend, root)
            if newest is not None:
                self.load_state(load_checkpoint(self.backend, newest))
                if ctx.is_main:
                    log.info("resumed from %s (step %d)", newest, self.step_index)
            self.resumed_at(self.step_index)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        run_folder = PathGuard(self.output_dir)  # a checkpoint never recreates a deleted run folder
        progress = self._progress()
        results = []
        save_every, eval_every = self.cfg.train.save_every, self.cfg.eval.every
        while self.step_index < self.max_steps:
            started = time.perf_counter()
            # the step syncs once (its all-reduce); kernels it queues after that are waited for by the next
            # step's sync, so in steady state each step's wall time is its own
            result = self.unlearning_step()
            result.seconds = time.perf_counter() - started
            result.peak_memory_mb = peak_memory_mb(ctx.device)
            self.step_index += 1
            results.append(result)
            target = self.cfg.train.stop_forget_loss
            reached = target > 0 and result.loss_forget >= target
            last = self.step_index == self.max_steps or reached or result.stop_requested
            if self.step_index % self.cfg.train.log_every == 0 or last:  # the step that ends a run is logged
                self.emit(result.metrics())
            if progress is not None:
                progress.set_postfix(
                    forget=f"{result.loss_forget:.3f}",
                    retain=f"{result.loss_retain:.3f}",
                    lr=f"{result.lr:.2e}",
                    refresh=False,  # update() redraws at the bar's own pace, not once per step in Slurm logs
                )
                progress.update(1)
            periodic = eval_every and self.step_index % eval_every == 0
            # a preempted run checkpoints at once and skips evaluation: the warning time is short
            if self.evaluate is not None and not result.stop_requested and (last or periodic):
                self.emit(self.evaluate(self.step_index, final=last))
            if result.stop_requested or (save_every and self.step_index % save_every == 0) or (last and save_every):
                save_checkpoint(self.backend, root, self.step_index, self.state(), run_folder)
            if reached and ctx.is_main:
                log.info(
                    "forget loss %.3f reached train.stop_forget_loss=%.3f at step %d",
                    result.loss_forget,
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

    def resumed_at(self, step: int) -> None:
        """Tell the sinks that keep history (metrics.jsonl) where the run continues: rows a crash left
        beyond its checkpoint are written again, so they go."""
        if self.backend.ctx.is_main:
            for sink in self.sinks:
                if hasattr(sink, "resumed_at"):
                    sink.resumed_at(step)

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
        self.backend.export_pretrained(directory, self.tokenizer, self.cfg.export.dtype, self.cfg.export.lora)
        self.backend.barrier()

    # ------------------------------------------------------------------ resumable state
    def state(self) -> dict[str, Any]:
        return {
            "step": self.step_index,
            "lr": self.lr,
            **{f"{task.name}_stream": task.stream.state_dict() for task in self.tasks},
            "autolr": self.autolr.state_dict(),
            # a stateful combiner's state (TorchJD's GradVac, PCD: see ngdiff/torchjd_adapter.py)
            **({"combiner": self.combine.state_dict()} if hasattr(self.combine, "state_dict") else {}),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.step_index = int(state["step"])
        self.lr = float(state["lr"])
        for task in self.tasks:
            task.stream.load_state_dict(state[f"{task.name}_stream"])
        if "autolr" in state:  # checkpoints written before the acceptance rate was logged lack it
            self.autolr.load_state_dict(state["autolr"])
        if "combiner" in state and hasattr(self.combine, "load_state_dict"):
            self.combine.load_state_dict(state["combiner"])
