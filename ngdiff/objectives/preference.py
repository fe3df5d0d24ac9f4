"""DPO on the forget set: prefer an alternate answer (a refusal for IdkDPO) to the original one."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ngdiff.objectives.core import Objective, sequence_log_likelihood

ALTERNATE = "alt_"  # collate's prefix for the alternate answer's tensors (input_ids, attention_mask, labels)


def alternate_of(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch of alternate answers that `collate` stores beside the original ones."""
    if ALTERNATE + "input_ids" not in batch:
        raise ValueError("this objective needs each forget example paired with an alternate answer")
    return {key: batch[ALTERNATE + key] for key in ("input_ids", "attention_mask", "labels")}


class DPO(Objective):
    """Direct preference optimisation on the forget set, the alternate answer winning over the original:
    L = -(2/beta) log sigmoid(beta * ((log pi(win) - log ref(win)) - (log pi(lose) - log ref(lose)))),
    log-likelihoods summed over each answer, averaged over sequences; beta 0.1. As open-unlearning's
    src/trainer/unlearn/dpo.py with compute_dpo_loss (src/trainer/utils.py) and configs/trainer/DPO.yaml.

    open-unlearning minimises L; here it is returned negated (per sequence, summed), so that the
    combiner's ascent of a forget task minimises L, as NPO. The reference is the frozen start (or the
    LoRA base with the adapters off). The alternate answers come from the records' `data.alternate_key`.
    """

    needs_reference = True
    unit = "sequences"
    alternates = "alternate_key"

    def __init__(self, beta: float = 0.1):
        self.beta = beta

    def loss_sum(self, model, batch, reference=None):
        if reference is None:
            raise ValueError("DPO needs the frozen reference model")
        win = alternate_of(batch)
        log_win, _ = sequence_log_likelihood(model, win)
        log_lose, _ = sequence_log_likelihood(model, batch)
        with torch.no_grad():
            ref_win, _ = sequence_log_likelihood(reference, win)
            ref_lose, _ = sequence_log_likelihood(reference, batch)
        margin = (log_win - ref_win) - (log_lose - ref_lose)
        return (2.0 / self.beta) * F.logsigmoid(self.beta * margin).sum()


class IdkDPO(DPO):
    """DPO whose winning answer is a refusal drawn from `data.idk` (open-unlearning's IdkDPO: the DPO
    trainer on the TOFU_QA_forget_idk data, configs/experiment/unlearn/tofu/idk.yaml)."""

    alternates = "refusal_pairs"
