"""open-unlearning's token-level forget objectives: reweighted NLL (WGA, SatImp), distillation towards a
target with the true token suppressed (UNDIAL, CE-U), and PDU's flat-logit loss.

Each reference averages over its counted positions; here each returns the sum over them and `count`
says how many there are, so that the trainer's global normalisation recovers the mean of the whole
global batch. Sign: open-unlearning minimises every one of these on the forget set (WGA and SatImp as
the negated weighted NLL); ngdiff's combiners *ascend* a forget task's objective, so each returns the
quantity forgetting increases: WGA and SatImp the weighted NLL itself, UNDIAL, CE-U and PDU their
losses negated.
"""

from __future__ import annotations

import torch

from ngdiff.objectives.core import IGNORE, Objective, logits_of, token_log_likelihoods


class WGA(Objective):
    """Weighted gradient ascent (Wang et al., 2025): sum_t p_t^beta * NLL_t, the weight p_t = exp(-NLL_t)
    detached; beta 1. As open-unlearning's compute_wga_loss (src/trainer/utils.py, used by
    src/trainer/unlearn/wga.py; configs/trainer/WGA.yaml), which minimises the negated mean."""

    def __init__(self, beta: float = 1.0):
        self.beta = beta

    def loss_sum(self, model, batch, reference=None):
        log_p, mask = token_log_likelihoods(logits_of(model, batch), batch["labels"])
        weight = log_p.detach().exp() ** self.beta
        return (weight * -log_p * mask).sum()


class SatImp(Objective):
    """SatImp (Yang et al., 2025): sum_t p_t^beta1 (1 - p_t)^beta2 * NLL_t, weights detached; beta1 5,
    beta2 1. As open-unlearning's compute_satimp_loss (src/trainer/utils.py, src/trainer/unlearn/satimp.py;
    configs/trainer/SatImp.yaml), which minimises the negated mean."""

    def __init__(self, beta1: float = 5.0, beta2: float = 1.0):
        self.beta1, self.beta2 = beta1, beta2

    def loss_sum(self, model, batch, reference=None):
        log_p, mask = token_log_likelihoods(logits_of(model, batch), batch["labels"])
        p = log_p.detach().exp()
        weight = p**self.beta1 * (1 - p) ** self.beta2
        return (weight * -log_p * mask).sum()


def soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of `logits` against the distribution softmax(target_logits), per position."""
    target = torch.softmax(target_logits.float(), dim=-1)
    return -(target * torch.log_softmax(logits.float(), dim=-1)).sum(-1)


class UNDIAL(Objective):
    """UNDIAL (Dong et al., 2025): cross-entropy of the model against the frozen start's next-token
    distribution with the true token's logit lowered by beta (10). As open-unlearning's
    compute_undial_loss (src/trainer/utils.py, src/trainer/unlearn/undial.py; configs/trainer/UNDIAL.yaml).

    Departure: that code averages over every position of the padded batch, prompt and padding included
    (an ignored label, -100, indexes the vocabulary from its end there); here only the labelled answer
    tokens count, so the loss does not depend on padding, i.e. on how the batch is split. Minimised
    there, so returned negated.
    """

    needs_reference = True

    def __init__(self, beta: float = 10.0):
        self.beta = beta

    def loss_sum(self, model, batch, reference=None):
        if reference is None:
            raise ValueError("UNDIAL needs the frozen reference model")
        logits = logits_of(model, batch)[:, :-1]
        with torch.no_grad():
            teacher = logits_of(reference, batch)[:, :-1].float()
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE
        teacher = teacher.scatter_add(
            -1, targets.clamp_min(0).unsqueeze(-1), torch.full_like(targets, -self.beta, dtype=teacher.dtype)[..., None]
        )
        return -(soft_cross_entropy(logits, teacher) * mask).sum()


def without_first_answer_tokens(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Labels with each row's first n labelled positions ignored (CE-U's footnote trick, arXiv:2503.01224)."""
    valid = labels != IGNORE
    return labels.masked_fill((valid.cumsum(-1) <= n) & valid, IGNORE)


class CEU(Objective):
    """Cross-entropy unlearning (Yang et al., 2025): cross-entropy of the model against its own detached
    next-token distribution with the true token removed (its logit set to -inf), over the answer tokens
    but each row's first `ignore_first_n` (1) labelled positions. As open-unlearning's
    src/trainer/unlearn/ceu.py (cross_entropy_unlearning_loss, compute_batch_ceu; configs/trainer/CEU.yaml),
    whose trainer uses no retain loss (here any retain objective and combiner apply). Minimised there,
    so returned negated."""

    def __init__(self, ignore_first_n: int = 1):
        self.ignore_first_n = ignore_first_n

    def count(self, batch):
        return int((without_first_answer_tokens(batch["labels"], self.ignore_first_n)[:, 1:] != IGNORE).sum())

    def loss_sum(self, model, batch, reference=None):
        logits = logits_of(model, batch)[:, :-1]
        targets = without_first_answer_tokens(batch["labels"], self.ignore_first_n)[:, 1:]
        mask = targets != IGNORE
        target_logits = logits.detach().float().scatter(-1, targets.clamp_min(0).unsqueeze(-1), float("-inf"))
        return -(soft_cross_entropy(logits, target_logits) * mask).sum()


class PDUForget(Objective):
    """PDU's forget loss (Entesari et al., 2025): (max_v z_v - mean_v z_v)^2 of the logits z at each
    labelled position, averaged over them: flattening the output distribution. As open-unlearning's
    src/trainer/unlearn/pdu.py (compute_loss), including its positions: the logits *at* each labelled
    position (the mask is the unshifted labels), not the ones predicting it.

    Departure: PDU's primal-dual update of the retain weight is not implemented (see docs/methods.md):
    here the forget loss is combined with the retain task by the chosen combiner, as open-unlearning's
    PDU with `primal_dual: false`. Minimised there, so returned negated."""

    def count(self, batch):
        return int((batch["labels"] != IGNORE).sum())

    def loss_sum(self, model, batch, reference=None):
        logits = logits_of(model, batch).float()
        spread = (logits.max(-1).values - logits.mean(-1)) ** 2
        return -(spread * (batch["labels"] != IGNORE)).sum()
