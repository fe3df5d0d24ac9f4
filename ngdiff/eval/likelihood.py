"""Batched per-sequence likelihoods: answer losses (TOFU) and per-token log-probabilities (Min-K%).

Sequences are right-padded into batches; padding carries the ignore label, so a sequence's numbers do
not depend on what it was batched with (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ngdiff.objectives import IGNORE, token_log_likelihoods


@dataclass(frozen=True)
class AnswerLoss:
    """Summed NLL of an answer's tokens and how many there are (TOFU's `gt_loss`, `num_token_gt`)."""

    loss: float
    tokens: int

    @property
    def mean(self) -> float:
        """Length-normalised loss (TOFU's `avg_gt_loss`)."""
        return self.loss / max(self.tokens, 1)


def _pad_right(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (row_ids, row_labels) in enumerate(rows):
        ids[r, : len(row_ids)] = torch.tensor(row_ids)
        labels[r, : len(row_labels)] = torch.tensor(row_labels)
        mask[r, : len(row_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@torch.no_grad()
def _token_log_likelihoods(
    model,
    rows: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
    batch_size: int,
    autocast: Callable | None,
    on_batch: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """Log p of every labelled next token, one 1-d tensor per row (in label order)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in _pad_right(rows[start : start + batch_size], pad_id).items()}
        with autocast() if autocast is not None else nullcontext():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        token_ll, mask = token_log_likelihoods(logits, batch["labels"])
        out.extend(ll[m].double().cpu() for ll, m in zip(token_ll, mask, strict=True))
        if on_batch is not None:
            on_batch(len(batch["input_ids"]))
    if was_training:
        model.train()
    return out


def answer_losses(
    model,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 16,
    autocast: Callable | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[AnswerLoss]:
    """NLL of each answer given its prompt (loss on the answer tokens only, as in TOFU's `get_batch_loss`)."""
    rows = [([*p, *a], [IGNORE] * len(p) + list(a)) for p, a in zip(prompts, answers, strict=True)]
    lls = _token_log_likelihoods(model, rows, pad_id, batch_size, autocast, on_batch)
    return [AnswerLoss(float(-ll.sum()), int(ll.numel())) for ll in lls]


def sequence_token_logprobs(
    model, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int = 8, autocast: Callable | None = None
) -> list[list[float]]:
    """log p(x_t | x_<t) for t >= 1 of each whole sequence (what Min-K% sorts)."""
    rows = [(list(s), list(s)) for s in sequences]
    return [ll.tolist() for ll in _token_log_likelihoods(model, rows, pad_id, batch_size, autocast)]
