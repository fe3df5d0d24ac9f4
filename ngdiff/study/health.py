"""Is the study's world worth ranking methods on? A pure check of world.json's metrics.

Unlearning is measured against two models: the target (which must have learned its forget set, or there
is nothing to forget) and the retain model (which must answer the forget set differently, or the target
already has perfect forget quality). A method's best point must also keep a share of the target's model
utility; a target with utility 0 makes that floor 0 and every method passes it. When any of these
fails, a ranking of methods is noise, so the summary says why and ranks nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MIN_TARGET_FORGET_ROUGE = 0.3  # the target answers its forget questions (ROUGE-L recall)
MIN_TARGET_RETAIN_D = 0.2  # KS distance of the target's forget truth ratios to the retain model's
MIN_ROUGE_DIFFERENCE = 0.1  # without truth ratios: the two models' forget ROUGE-L must differ this much
MIN_TARGET_VERBMEM = 30.0  # MUSE: the target continues its forget texts (VerbMem, ROUGE-L F1 x 100)
MIN_VERBMEM_DIFFERENCE = 10.0  # MUSE: the target's and the retain model's VerbMem differ this much


@dataclass(frozen=True)
class Health:
    reasons: tuple[str, ...]  # empty: healthy

    @property
    def healthy(self) -> bool:
        return not self.reasons

    @property
    def line(self) -> str:
        """What the summary prints instead of a best method (and the CLI as a warning)."""
        return f"World unhealthy: {'; '.join(self.reasons)}; methods are not ranked"

    def to_json(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "reasons": list(self.reasons)}


def _number(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def world_health(world: dict[str, Any]) -> Health:
    """The reasons (in words) a world's target and retain model cannot carry a ranking; a check whose
    metric the world lacks (e.g. a MUSE world, or a published reference log) is skipped."""
    target = world.get("target_metrics") or {}
    retain = world.get("reference_metrics") or {}
    reasons = []
    target_rouge = _number(target, "forget_rougeL_recall")
    if target_rouge is not None and target_rouge < MIN_TARGET_FORGET_ROUGE:
        reasons.append(
            f"the target did not learn its forget set (forget ROUGE-L {target_rouge:.3g} < {MIN_TARGET_FORGET_ROUGE})"
        )
    d = _number(target, "forget_ks_statistic")
    retain_rouge = _number(retain, "forget_rougeL_recall")
    if d is not None:
        if d < MIN_TARGET_RETAIN_D:
            reasons.append(
                f"the target and the retain model barely differ on the forget set "
                f"(KS distance {d:.3g} < {MIN_TARGET_RETAIN_D})"
            )
    elif (
        target_rouge is not None
        and retain_rouge is not None
        and abs(target_rouge - retain_rouge) < MIN_ROUGE_DIFFERENCE
    ):
        reasons.append(
            f"the target and the retain model answer the forget set alike "
            f"(forget ROUGE-L {target_rouge:.3g} vs {retain_rouge:.3g})"
        )
    verbmem, retain_verbmem = _number(target, "verbmem_f"), _number(retain, "verbmem_f")
    if verbmem is not None and verbmem < MIN_TARGET_VERBMEM:
        reasons.append(f"the target did not learn its forget texts (VerbMem {verbmem:.3g} < {MIN_TARGET_VERBMEM:g})")
    if verbmem is not None and retain_verbmem is not None and abs(verbmem - retain_verbmem) < MIN_VERBMEM_DIFFERENCE:
        reasons.append(
            f"the target and the retain model continue the forget texts alike (VerbMem {verbmem:.3g} vs "
            f"{retain_verbmem:.3g})"
        )
    utility = _number(target, "model_utility")
    if utility is not None and utility <= 0:
        reasons.append("the target's model utility is 0 (the utility floor excludes nothing)")
    return Health(tuple(reasons))


def unranked_summary(health: Health, world: dict[str, Any], missing: int = 0) -> str:
    """summary.md for an unhealthy world: why, and the world's figures; no best method, no table."""
    target = world.get("target_metrics") or {}
    retain = world.get("reference_metrics") or {}

    def fmt(metrics: dict[str, Any], key: str) -> str:
        value = _number(metrics, key)
        return "n/a" if value is None else f"{value:.4g}"

    lines = [
        "# Study summary",
        "",
        f"{health.line}.",
        "",
        "| model | forget ROUGE-L | model utility |",
        "|---|---|---|",
        f"| target | {fmt(target, 'forget_rougeL_recall')} | {fmt(target, 'model_utility')} |",
        f"| retain model | {fmt(retain, 'forget_rougeL_recall')} | {fmt(retain, 'model_utility')} |",
        "",
        f"Target-vs-retain-model KS distance on the forget split: {fmt(target, 'forget_ks_statistic')}.",
        "",
        "Every run's evaluations are in `results.jsonl`; rebuild the world (more fine-tuning, see "
        "world.finetune) before comparing methods.",
    ]
    if missing:
        lines += ["", f"{missing} runs of the grid have not finished."]
    return "\n".join(lines) + "\n"
