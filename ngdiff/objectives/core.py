"""The objectives ngdiff started with (NLL, IdK, NPO, SimNPO, KL) and the helpers every objective shares.

Each returns a *sum* over its units (tokens or sequences) and says how many
units a batch holds, so the trainer can normalise by the count of the whole global batch: one rank and
N ranks, with or without accumulation, then compute the same gradient.

Sign convention: a forget objective returns the quantity that forgetting *increases* (the NLL of the
forget answers, say); the combiner's negative `w_F` pushes it up. A retain objective returns a loss to
decrease.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


class Objective(ABC):
    needs_reference: bool = False  # a frozen copy of the starting model (NPO, KL)
    unit: str = "tokens"
    # the forget data it reads: "" the answers; "refusals" refusals instead (IdK); "refusal_pairs" each
    # answer with a refusal as its alternate (IdkDPO); "alternate_key" each answer with data.alternate_key's
    alternates: str = ""

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Units this batch contributes to the normaliser."""
        if self.unit == "tokens":
            return int((batch["labels"][:, 1:] != IGNORE).sum())
        return int(batch["labels"].shape[0])

    @abstractmethod
    def loss_sum(
        self, model: nn.Module, batch: dict[str, torch.Tensor], reference: nn.Module | None = None
    ) -> torch.Tensor:
        """Summed objective over this batch's units (a 0-dim tensor attached to the graph)."""


def logits_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # no KV cache: a training or probing forward never decodes further, and building one costs time
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def token_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log p of each next label token (0 where ignored) and the mask of counted positions."""
    targets = labels[:, 1:]
    mask = targets != IGNORE
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logprobs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


def sequence_log_likelihood(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-likelihood per sequence and the answer length per sequence."""
    token_ll, mask = token_log_likelihoods(logits_of(model, batch), batch["labels"])
    return token_ll.sum(-1), mask.sum(-1)


class NLL(Objective):
    """Token-level negative log-likelihood of the labelled tokens."""

    def loss_sum(self, model, batch, reference=None):
        return nll_sum(logits_of(model, batch), batch["labels"])


class IdkNLL(NLL):
    """NLL of a refusal answer: the data swaps the forget answers for sentences of `idontknow.jsonl`.

    Learning the refusal is a loss to *decrease*, so its negation is the forget quantity.
    """

    alternates = "refusals"

    def loss_sum(self, model, batch, reference=None):
        return -super().loss_sum(model, batch)


class NPO(Objective):
    """Negative preference optimisation (Zhang et al., 2024): -(2/beta) log sigmoid(-beta log(pi/pi_ref)),
    on the summed answer log-likelihood of each sequence, beta 0.1, as open-unlearning's
    src/trainer/unlearn/npo.py and compute_dpo_loss (src/trainer/utils.py).

    Returned negated (per sequence, summed), so that pushing it up with w_F < 0 minimises NPO.
    """

    needs_reference = True
    unit = "sequences"

    def __init__(self, beta: float = 0.1):
        self.beta = beta

    def loss_sum(self, model, batch, reference=None):
        if reference is None:
            raise ValueError("NPO needs the frozen reference model")
        log_p, _ = sequence_log_likelihood(model, batch)
        with torch.no_grad():
            log_ref, _ = sequence_log_likelihood(reference, batch)
        ratio = log_p - log_ref
        return (2.0 / self.beta) * F.logsigmoid(-self.beta * ratio).sum()


class SimNPO(Objective):
    """SimNPO (Fan et al., 2024): NPO without a reference, on the length-normalised NLL with a margin.

    Loss per sequence, as the official code (OPTML-Group/Unlearn-Simple, TOFU/dataloader.py, loss_type
    `simnpo`) and open-unlearning (src/trainer/unlearn/simnpo.py, where the margin is called `delta`):
    -(2/beta) log sigmoid(beta * (NLL(y|x)/|y| - gamma)). Returned negated, like NPO. beta defaults to the
    official 2.5 (open-unlearning's TOFU config uses 4.5); with NPO's 0.1 the weights are nearly flat and
    SimNPO degenerates into length-normalised gradient ascent.
    """

    unit = "sequences"

    def __init__(self, beta: float = 2.5, gamma: float = 0.0):
        self.beta = beta
        self.gamma = gamma

    def loss_sum(self, model, batch, reference=None):
        log_p, length = sequence_log_likelihood(model, batch)
        mean_nll = -log_p / length.clamp_min(1)
        return (2.0 / self.beta) * F.logsigmoid(self.beta * (mean_nll - self.gamma)).sum()


class KLToReference(Objective):
    """KL(p_ref || p_theta) of the next-token distributions at every attended position, averaged over them.

    TOFU (dataloader.py, loss_type `KL`) and open-unlearning (src/trainer/utils.py, compute_kl_divergence)
    flatten the logits of *every* position, prompt tokens included, and divide by batch x width
    (`batchmean` on the flattened rows). We take the same positions, prompt included, but only attended
    ones: padded positions hold no data, and counting them would make the loss depend on how the batch
    is padded, i.e. on the micro-batch and rank split, which this trainer keeps exact.
    """

    needs_reference = True

    def count(self, batch):
        return int(batch["attention_mask"].sum())

    def loss_sum(self, model, batch, reference=None):
        if reference is None:
            raise ValueError("the KL retain objective needs the frozen reference model")
        logprobs = torch.log_softmax(logits_of(model, batch).float(), dim=-1)
        with torch.no_grad():
            ref_logprobs = torch.log_softmax(logits_of(reference, batch).float(), dim=-1)
        kl = (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1)
        return (kl * batch["attention_mask"]).sum()
