"""One way to run a benchmark evaluation (TOFU or MUSE-News), shared by `ngdiff eval`, evaluation during
training and the study, so that which evaluator runs, with which arguments and which reference, is
decided in one place and the numbers of the three paths cannot drift apart."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ngdiff.errors import UserError
from ngdiff.eval.sharding import ONE_PROCESS, EvalDist

Reference = list[float] | float | None  # TOFU: forget truth ratios; MUSE: the retrained model's AUC
Results = tuple[dict[str, list[dict[str, Any]]], dict[str, float]]


def load_reference(benchmark: str, reference: str | Path | None) -> Reference:
    """The loaded reference of `benchmark` (None without one); fails early on a bad file."""
    if not reference:
        return None
    if benchmark == "tofu":
        from ngdiff.eval.tofu_metrics import load_forget_truth_ratios

        return load_forget_truth_ratios(reference)
    from ngdiff.eval.muse import load_reference_auc

    return load_reference_auc(reference)


@dataclass(frozen=True)
class BenchmarkSpec:
    """What to evaluate: the benchmark, its items and a loaded reference (`load_reference`)."""

    benchmark: str  # "tofu" or "muse"
    split: str = "forget01"  # TOFU forget split
    data_dir: str | Path | None = None  # None: the bundled copies
    max_items: int = 300
    batch_size: int = 16
    max_new_tokens: int = 200  # TOFU only (MUSE fixes its own lengths)
    prompt_template: str = ""  # TOFU only
    reference: Reference = None
    custom: Sequence[tuple[Any, Path]] = ()  # TOFU: (TofuSet, path) pairs from `tofu.custom_sets`
    holdout: str | Path | None = None  # TOFU: holdout rows for membership inference (None: the split's own)
    gradnorm: bool = False  # TOFU: the GradNorm attack (a backward pass per item: unsharded, outside training)
    reference_auc: float | None = None  # TOFU: a retain model's logged Min-K% AUC, PrivLeak's reference
    light: bool = False  # TOFU: no forget-set generations, no membership inference (`evaluate_tofu`)


def run_benchmark(
    model,
    tokenizer,
    spec: BenchmarkSpec,
    *,
    ed: EvalDist = ONE_PROCESS,
    autocast: Callable | None = None,
    progress: bool = False,
    reference_model=None,
) -> Results:
    """(per-item records by set, aggregate metrics) of `model` on `spec`, on every rank of `ed`
    (`reference_model`: TOFU's Reference attack and PrivLeak's retain-model AUC)."""
    common: dict[str, Any] = dict(
        data_dir=spec.data_dir, max_items=spec.max_items, batch_size=spec.batch_size, ed=ed, autocast=autocast
    )
    if spec.benchmark == "tofu":
        from ngdiff.eval.tofu import evaluate_tofu

        return evaluate_tofu(
            model,
            tokenizer,
            spec.split,
            max_new_tokens=spec.max_new_tokens,
            reference_ratios=spec.reference,
            prompt_template=spec.prompt_template,
            custom=spec.custom,
            progress=progress,
            holdout=spec.holdout,
            gradnorm=spec.gradnorm,
            reference_model=reference_model,
            reference_auc=spec.reference_auc,
            light=spec.light,
            **common,
        )
    if spec.benchmark == "muse":
        from ngdiff.eval.muse import evaluate_muse

        return evaluate_muse(model, tokenizer, reference_auc=spec.reference, **common)
    raise UserError(f"unknown benchmark {spec.benchmark!r}; choose one of: tofu, muse")
