"""Plain supervised fine-tuning on one process: makes the model that later unlearns (TOFU's "target").

Reuses the training pieces (token-weighted NLL, the task stream, the single backend) so the demo's
model is trained on exactly the formatting that unlearning and evaluation use.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ngdiff.data import Encoded, TaskStream
from ngdiff.objectives import NLL
from parallel.base import DistContext
from parallel.single import SingleBackend

log = logging.getLogger("ngdiff.finetune")


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 30
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    seed: int = 0


@dataclass(frozen=True)
class _Optim:  # the fields parallel.optim.build_optimizer reads
    lr: float
    weight_decay: float
    name: str = "adamw"
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


def warmup_cosine(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def finetune(
    model_dir: str | Path,
    tokenizer,
    examples: list[Encoded],
    out_dir: str | Path,
    cfg: FinetuneConfig,
    progress: bool = True,
) -> Path:
    """Fine-tune the model in `model_dir` on `examples` (NLL on answer tokens), save to `out_dir`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    backend = SingleBackend(DistContext(), None, _Optim(cfg.lr, cfg.weight_decay), "fp32")
    backend.prepare(lambda: AutoModelForCausalLM.from_pretrained(model_dir))
    stream = TaskStream(
        examples,
        cfg.batch_size,
        rank=0,
        world_size=1,
        micro_batch=0,
        seed=cfg.seed,
        pad_id=tokenizer.pad_token_id,
        name="finetune",
    )
    total = cfg.epochs * stream.batches_per_epoch
    objective = NLL()
    bar = None
    for step in range(total):
        (batch,) = stream.next()
        backend.zero_grad()
        loss = objective.loss_sum(backend.model, batch) / objective.count(batch)
        backend.backward(loss, last_micro_batch=True)
        backend.step(warmup_cosine(step, total, cfg.warmup_steps, cfg.lr))
        if progress and bar is None:
            # the bar starts after the first step, whose one-time set-up costs many steps' time, and its ETA
            # is the mean rate so far (smoothing=0): an estimate from step 1 alone overstates the time many-fold
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=1, desc="fine-tuning", unit="step", dynamic_ncols=True, smoothing=0)
        elif bar is not None:
            bar.update(1)
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    out_dir = Path(out_dir)
    backend.export_pretrained(out_dir, tokenizer)
    return out_dir
