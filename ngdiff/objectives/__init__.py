"""Per-task objectives. Each returns a *sum* over its units (tokens or sequences) and says how many
units a batch holds, so the trainer can normalise by the count of the whole global batch: one rank and
N ranks, with or without accumulation, then compute the same gradient.

Sign convention: a forget objective returns the quantity that forgetting *increases* (the NLL of the
forget answers, say); the combiner's negative `w_F` pushes it up. A retain objective returns a loss to
decrease. An objective that its reference *minimises* on the forget set (NPO, DPO, UNDIAL, CE-U, RMU,
PDU) therefore enters as its negation.

Modules: `core` (NLL, IdK, NPO, SimNPO, KL and the shared helpers), `preference` (DPO, IdkDPO),
`token_weighted` (WGA, SatImp, UNDIAL, CE-U, PDU), `representation` (RMU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ngdiff.objectives.core import (
    IGNORE,
    NLL,
    NPO,
    IdkNLL,
    KLToReference,
    Objective,
    SimNPO,
    logits_of,
    nll_sum,
    sequence_log_likelihood,
    token_log_likelihoods,
)
from ngdiff.objectives.preference import DPO, IdkDPO
from ngdiff.objectives.representation import RMUForget, RMURetain
from ngdiff.objectives.token_weighted import CEU, UNDIAL, WGA, PDUForget, SatImp

if TYPE_CHECKING:
    from ngdiff.config import MethodConfig

__all__ = [
    "CEU",
    "DPO",
    "FORGET_OBJECTIVES",
    "IGNORE",
    "NLL",
    "NPO",
    "RETAIN_OBJECTIVES",
    "UNDIAL",
    "WGA",
    "IdkDPO",
    "IdkNLL",
    "KLToReference",
    "Objective",
    "PDUForget",
    "RMUForget",
    "RMURetain",
    "SatImp",
    "SimNPO",
    "build_objectives",
    "logits_of",
    "nll_sum",
    "sequence_log_likelihood",
    "token_log_likelihoods",
]

FORGET_OBJECTIVES: dict[str, type[Objective]] = {
    "nll": NLL,
    "npo": NPO,
    "simnpo": SimNPO,
    "idk": IdkNLL,
    "dpo": DPO,
    "idkdpo": IdkDPO,
    "wga": WGA,
    "satimp": SatImp,
    "undial": UNDIAL,
    "ceu": CEU,
    "pdu": PDUForget,
    "rmu": RMUForget,
}
RETAIN_OBJECTIVES: dict[str, type[Objective] | None] = {"nll": NLL, "kl": KLToReference, "rmu": RMURetain, "none": None}


def build_objectives(
    forget: str,
    retain: str,
    npo_beta: float = 0.1,
    simnpo_beta: float = 2.5,
    simnpo_gamma: float = 0.0,
    *,
    method: MethodConfig | None = None,
    seed: int = 0,
) -> tuple[Objective, Objective | None]:
    """The two roles' objectives. `method`: the run's method section, whose keys set the hyper-parameters
    of the objectives beyond NPO and SimNPO (without it: their open-unlearning defaults); `seed`: RMU's."""
    if forget not in FORGET_OBJECTIVES:
        raise ValueError(f"unknown forget objective {forget!r}; choose one of: {', '.join(FORGET_OBJECTIVES)}")
    if retain not in RETAIN_OBJECTIVES:
        raise ValueError(f"unknown retain objective {retain!r}; choose one of: {', '.join(RETAIN_OBJECTIVES)}")
    if method is not None:
        npo_beta, simnpo_beta, simnpo_gamma = method.npo_beta, method.simnpo_beta, method.simnpo_gamma
    m = method
    forget_builders = {
        "npo": lambda: NPO(beta=npo_beta),
        "simnpo": lambda: SimNPO(beta=simnpo_beta, gamma=simnpo_gamma),
        "dpo": lambda: DPO(beta=m.dpo_beta) if m else DPO(),
        "idkdpo": lambda: IdkDPO(beta=m.dpo_beta) if m else IdkDPO(),
        "wga": lambda: WGA(beta=m.wga_beta) if m else WGA(),
        "satimp": lambda: SatImp(beta1=m.satimp_beta1, beta2=m.satimp_beta2) if m else SatImp(),
        "undial": lambda: UNDIAL(beta=m.undial_beta) if m else UNDIAL(),
        "ceu": lambda: CEU(ignore_first_n=m.ceu_ignore_first_n) if m else CEU(),
        "rmu": lambda: RMUForget(m.rmu_layer, m.rmu_steering_coeff, seed) if m else RMUForget(seed=seed),
    }
    forget_obj = forget_builders.get(forget, FORGET_OBJECTIVES[forget])()
    if retain == "rmu":
        retain_obj: Objective | None = RMURetain(m.rmu_layer) if m else RMURetain()
    else:
        retain_cls = RETAIN_OBJECTIVES[retain]
        retain_obj = retain_cls() if retain_cls is not None else None
    return forget_obj, retain_obj
