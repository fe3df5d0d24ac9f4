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
    """Log p of every labelled next token, one 1-d tensor per row (in label order).

    Rows are batched longest first, so each batch pads to lengths close to its own (TOFU's perturbed
    answers range from a few tokens to the length cap); the result is in the rows' order.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]), reverse=True)
    out: dict[int, torch.Tensor] = {}
    for start in range(0, len(rows), batch_size):
        chunk = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in _pad_right([rows[i] for i in chunk], pad_id).items()}
        with autocast() if autocast is not None else nullcontext():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        token_ll, mask = token_log_likelihoods(logits, batch["labels"])
        for i, ll, m in zip(chunk, token_ll, mask, strict=True):
            out[i] = ll[m].double().cpu()
        if on_batch is not None:
            on_batch(len(chunk))
    if was_training:
        model.train()
    return [out[i] for i in range(len(rows))]


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


@dataclass
class AnswerTokenStats:
    """What the membership-inference and memorisation metrics read from one forward pass over an answer.

    `avg_loss` covers every answer token (open-unlearning's `evaluate_probability`); the per-position
    fields drop the last answer token (the EOS prediction), as its `tokenwise_logprobs` and
    `tokenwise_vocab_logprobs` do (src/evals/metrics/utils.py).
    """

    avg_loss: float
    token_logprobs: list[float]  # log p of each answer token but the last
    mu: list[float]  # E_{z~p}[log p(z)] at each of those positions (Min-K%++)
    sigma: list[float]  # Var_{z~p}[log p(z)] there
    preds: list[int]  # greedy (argmax) token there
    labels: list[int]  # the answer token there


@torch.no_grad()
def answer_token_stats(
    model,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 16,
    autocast: Callable | None = None,
) -> list[AnswerTokenStats]:
    """One `AnswerTokenStats` per (prompt, answer) pair, batched like `answer_losses`."""
    rows = [([*p, *a], [IGNORE] * len(p) + list(a)) for p, a in zip(prompts, answers, strict=True)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[AnswerTokenStats] = []
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in _pad_right(rows[start : start + batch_size], pad_id).items()}
        with autocast() if autocast is not None else nullcontext():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        targets = batch["labels"][:, 1:]
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        for row_lp, row_targets in zip(logprobs, targets, strict=True):
            mask = row_targets != IGNORE
            lp, labels = row_lp[mask].double(), row_targets[mask]
            picked = lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            keep = max(int(labels.numel()) - 1, 0)
            probs = lp[:keep].exp()
            mu = (probs * lp[:keep]).sum(-1)
            sigma = (probs * lp[:keep].square()).sum(-1) - mu.square()
            out.append(
                AnswerTokenStats(
                    avg_loss=float(-picked.mean()) if picked.numel() else 0.0,
                    token_logprobs=picked[:keep].tolist(),
                    mu=mu.tolist(),
                    sigma=sigma.tolist(),
                    preds=lp[:keep].argmax(-1).tolist(),
                    labels=labels[:keep].tolist(),
                )
            )
    if was_training:
        model.train()
    return out


def answer_grad_norms(
    model, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int, p: float = 2.0
) -> list[float]:
    """Per pair: the mean over parameter tensors of the p-norm of d(mean answer NLL)/d(parameter), one pair
    at a time, the last answer token excluded (open-unlearning src/evals/metrics/mia/gradnorm.py).

    Departure: the model stays in eval mode (open-unlearning switches to train mode, which only changes
    anything through dropout; eval mode keeps the score deterministic). Gradients are cleared afterwards.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    params = [q for q in model.parameters() if q.requires_grad]
    frozen = not params  # a model loaded for inference (e.g. an adapter folder): every parameter counts, as in
    if frozen:  # a trainable model, and is frozen again afterwards
        params = list(model.parameters())
        for q in params:
            q.requires_grad_(True)
    try:
        return _grad_norms(model, params, prompts, answers, pad_id, p, device)
    finally:
        model.zero_grad(set_to_none=True)
        if frozen:
            for q in params:
                q.requires_grad_(False)
        if was_training:
            model.train()


def _grad_norms(model, params, prompts, answers, pad_id: int, p: float, device) -> list[float]:
    norms: list[float] = []
    for prompt, answer in zip(prompts, answers, strict=True):
        batch = {
            k: v.to(device)
            for k, v in _pad_right([([*prompt, *answer], [IGNORE] * len(prompt) + list(answer))], pad_id).items()
        }
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            token_ll, mask = token_log_likelihoods(logits, batch["labels"])
            picked = token_ll[mask][:-1] if int(mask.sum()) > 1 else token_ll[mask]
            (-picked.mean()).backward()
        per_param = [q.grad.detach().double().norm(p=p) for q in params if q.grad is not None]
        norms.append(float(torch.stack(per_param).mean()))
    return norms
