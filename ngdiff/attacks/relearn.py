"""Relearning attack: fine-tune a few steps on part of the forget set and score the held-out part
(Hu et al. 2024, "Jogging the memory of unlearned LLMs"; Lynch et al. 2024). If unlearning only hid the
knowledge, the held-out answers come back within a handful of steps; a retain model (never trained on
the forget set) run through the same steps on the same data is the yardstick.

The forget rows are split interleaved (even rows train, odd rows are held out), so both parts cover the
same authors. Each step takes the next `batch_size` training rows (cycling, no shuffling) and minimises
their token-averaged answer NLL with AdamW. On several ranks each rank computes its share of the batch,
normalised by the batch's total token count, and the gradients are summed across ranks: the same update
as on one process (up to float rounding). The state after every step (weights, optimizer, curve so far)
is saved, so an interrupted attack resumes where it stopped, and a later call with more steps extends it;
the state is read back weights-only (tensors and plain data), like every checkpoint of a run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ngdiff.attacks.scoring import Scoring, forget_scores


@dataclass(frozen=True)
class RelearnConfig:
    steps: int = 5
    lr: float = 1e-5
    batch_size: int = 4
    weight_decay: float = 0.0


def split_forget(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training rows, held-out rows): even and odd positions."""
    return list(rows[0::2]), list(rows[1::2])


def step_rows(train: Sequence[Any], step: int, batch_size: int) -> list[Any]:
    """The rows of 0-based step `step`: the next `batch_size` rows, cycling."""
    return [train[(step * batch_size + i) % len(train)] for i in range(batch_size)]


def _identity(model_path: str, train, heldout, cfg: RelearnConfig, how: Scoring) -> str:
    what = {
        "model": model_path,
        "train": [r["question"] for r in train],
        "heldout": [r["question"] for r in heldout],
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "weight_decay": cfg.weight_decay,
        "template": how.prompt_template,
        "max_new_tokens": how.max_new_tokens,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _save_atomically(state: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def relearning_curve(
    model,
    tokenizer,
    model_path: str,
    rows: Sequence[dict[str, Any]],
    cfg: RelearnConfig,
    how: Scoring,
    state_file: Path | None = None,
) -> dict[str, Any]:
    """{"train_items", "heldout_items", "curve": [{"step": s, <forget scores of the held-out rows>}, ...]}
    for s = 0 .. cfg.steps. Modifies `model` (the caller runs it last). Every rank calls it."""
    import torch.distributed as dist

    from ngdiff.data.loader import collate
    from ngdiff.data.tokenize import encode_qa
    from ngdiff.eval.sharding import local_slice
    from ngdiff.objectives import NLL

    train, heldout = split_forget(rows)
    if not train or not heldout:
        raise ValueError("relearning needs at least two forget rows (one to train on, one held out)")
    ed = how.ed
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    identity = _identity(model_path, train, heldout, cfg, how)
    curve: list[dict[str, float]] = []
    if state_file is not None and state_file.is_file():
        from parallel.safe_load import load_weights_only

        state = load_weights_only(state_file, map_location="cpu")  # a planted pickle is refused, never run
        if state.get("identity") == identity:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            curve = state["curve"][: cfg.steps + 1]
    if not curve:
        curve = [{"step": 0, **forget_scores(model, tokenizer, heldout, how)}]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    objective = NLL()
    device = next(model.parameters()).device
    for step in range(len(curve) - 1, cfg.steps):
        batch_rows, indices = local_slice(step_rows(train, step, cfg.batch_size), ed)
        mine = [r for r, i in zip(batch_rows, indices, strict=True) if i is not None]
        encoded = [encode_qa(tokenizer, r["question"], r["answer"], 1024, how.prompt_template) for r in mine]
        tokens = torch.tensor(float(sum(e.answer_tokens for e in encoded)))
        if ed.world_size > 1:
            dist.all_reduce(tokens)
        model.train()
        optimizer.zero_grad(set_to_none=False)
        if encoded:
            batch = {k: v.to(device) for k, v in collate(encoded, pad_id).items()}
            (objective.loss_sum(model, batch) / tokens.to(device)).backward()
        if ed.world_size > 1:
            for p in model.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
        optimizer.step()
        model.eval()
        curve.append({"step": step + 1, **forget_scores(model, tokenizer, heldout, how)})
        if state_file is not None and ed.rank == 0:
            state = {"identity": identity, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
            _save_atomically({**state, "curve": curve, "config": asdict(cfg)}, state_file)
        if ed.world_size > 1:
            dist.barrier()
    return {"train_items": len(train), "heldout_items": len(heldout), "curve": curve}
