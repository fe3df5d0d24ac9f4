"""Periodic evaluation inside a training run, on all ranks (sharded ones included).

The trainer calls `evaluate(step, final=...)` on every rank every `eval.every` steps and at the end
(`final=True`); with `eval.intermediate=utility` the evaluations before the final one skip the forget
sets' generations and membership inference (`light_metric_names` says what they leave out); every rank
computes its slice, all ranks receive every result (so they agree on the best checkpoint, whose export
is a collective under sharded engines), and rank 0's dict is logged. Per-step outputs go to
`<output_dir>/eval/step_XXXXXXXX/`; with `eval.best_metric=NAME[:min|max]` the best model so far is
exported to `<output_dir>/best/` with `best.json`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ngdiff.errors import UserError
from ngdiff.eval.benchmark import BenchmarkSpec, load_reference, run_benchmark
from ngdiff.eval.open_unlearning_format import load_privleak_reference
from ngdiff.eval.report import write_outputs
from ngdiff.eval.sharding import EvalDist
from ngdiff.eval.tofu import FORGET_SPLITS

log = logging.getLogger("ngdiff.eval")

_TOFU_SETS = ("forget", "retain", "real_authors", "world_facts", "forget_para")
_TOFU_MIA = (  # against the split's holdout; GradNorm and Reference are `ngdiff eval`'s only (see mia.py)
    "mia_loss_auc",
    "mia_zlib_auc",
    "mia_mink_auc",
    "mia_minkpp_auc",
    "privleak",
    "privleak_reference_auc",
    "extraction_strength",
    "exact_memorization",
)
_TOFU_STATS = ("answer_loss", "rougeL_recall", "rouge1_recall", "prob", "truth_ratio")
_GENERATED = ("rougeL_recall", "rouge1_recall")

Evaluate = Callable[..., dict[str, Any]]  # evaluate(step, final=True) -> metrics
EvaluateFactory = Callable[[Any, Any], Evaluate]  # factory(backend, tokenizer) -> evaluate


def metric_names(benchmark: str, with_reference: bool) -> list[str]:
    """The names `evaluate` returns for a benchmark (what `eval.best_metric` may name)."""
    if benchmark == "tofu":
        names = [f"{s}_{m}" for s in _TOFU_SETS for m in _TOFU_STATS] + ["model_utility", *_TOFU_MIA]
        return names + (["forget_quality", "forget_ks_statistic", "forget_tr_distance"] if with_reference else [])
    if benchmark == "muse":
        return ["verbmem_f", "knowmem_f", "knowmem_r", "privleak_auc"] + (["privleak"] if with_reference else [])
    raise UserError(f"unknown eval.benchmark {benchmark!r}; choose one of: none, tofu, muse")


def light_metric_names(benchmark: str, with_reference: bool) -> list[str]:
    """What a TOFU evaluation before the last one returns under `eval.intermediate=utility`: everything
    but the forget sets' ROUGE (no generation there) and the membership-inference numbers."""
    left_out = {*_TOFU_MIA, *(f"{s}_{m}" for s in ("forget", "forget_para") for m in _GENERATED)}
    return [name for name in metric_names(benchmark, with_reference) if name not in left_out]


@dataclass(frozen=True)
class BestMetric:
    name: str
    mode: str  # "min" or "max"

    @classmethod
    def parse(cls, text: str, known: list[str]) -> BestMetric | None:
        if not text:
            return None
        name, _, mode = text.partition(":")
        mode = mode or "max"
        if mode not in ("min", "max"):
            raise UserError(f"eval.best_metric {text!r}: the direction after ':' must be min or max")
        if name not in known:
            raise UserError(f"eval.best_metric names unknown metric {name!r}; known: {', '.join(known)}")
        return cls(name, mode)

    def better(self, value: float, best: float | None) -> bool:
        return best is None or (value < best if self.mode == "min" else value > best)


def evaluation_factory(cfg) -> EvaluateFactory | None:
    """None when the config asks for no evaluation; else `factory(backend, tokenizer) -> evaluate`.

    Everything checkable without a model (split, reference file, best metric) is checked here, before
    training starts.
    """
    ecfg = cfg.eval
    if ecfg.benchmark == "none":
        return None
    if ecfg.benchmark == "tofu" and ecfg.split not in FORGET_SPLITS:
        raise UserError(f"unknown eval.split {ecfg.split!r}; choose one of: {', '.join(FORGET_SPLITS)}")
    spec = BenchmarkSpec(
        ecfg.benchmark,
        split=ecfg.split,
        data_dir=ecfg.data_dir or None,
        max_items=ecfg.max_items,
        batch_size=ecfg.batch_size,
        max_new_tokens=ecfg.max_new_tokens,
        prompt_template=cfg.data.prompt_template,
        reference=load_reference(ecfg.benchmark, ecfg.reference),
        reference_auc=load_privleak_reference(ecfg.reference) if ecfg.benchmark == "tofu" else None,
    )
    best = BestMetric.parse(ecfg.best_metric, metric_names(ecfg.benchmark, bool(ecfg.reference)))
    light = light_spec(spec, ecfg.intermediate, best)
    output_dir = Path(cfg.output_dir)

    def factory(backend, tokenizer) -> Evaluate:
        ed = EvalDist.from_backend(backend)
        best_file = output_dir / "best" / "best.json"
        state: dict[str, float | None] = {"best": None}
        if best is not None and best_file.is_file():  # a resumed run keeps its best so far
            state["best"] = json.loads(best_file.read_text()).get("value")

        def evaluate(step: int, final: bool = True) -> dict[str, Any]:
            start = time.perf_counter()
            now = spec if final or light is None else light
            items, metrics = run_benchmark(backend.model, tokenizer, now, ed=ed, autocast=backend.autocast)
            metrics = {**metrics, "eval_seconds": time.perf_counter() - start}
            if ed.rank == 0:
                meta = {
                    "step": step,
                    "split": ecfg.split,
                    "max_items": ecfg.max_items,
                    "ranks": ed.world_size,
                    "evaluation": "light" if now.light else "full",
                }
                write_outputs(output_dir / "eval" / f"step_{step:08d}", ecfg.benchmark, items, metrics, meta)
            if best is not None and best.better(metrics[best.name], state["best"]):
                state["best"] = metrics[best.name]
                export_best(backend, tokenizer, output_dir / "best", step, best, metrics)
            return metrics

        return evaluate

    return factory


def light_spec(spec: BenchmarkSpec, intermediate: str, best: BestMetric | None) -> BenchmarkSpec | None:
    """The spec of the evaluations before the last one (None: they are full), checked before training: a
    best metric must be one that every evaluation computes."""
    if intermediate == "full":
        return None
    if spec.benchmark != "tofu":
        raise UserError(f"eval.intermediate={intermediate} is for eval.benchmark=tofu, not {spec.benchmark}")
    names = light_metric_names(spec.benchmark, spec.reference is not None)
    if best is not None and best.name not in names:
        raise UserError(
            f"eval.best_metric={best.name} is not computed by the light evaluations of "
            f"eval.intermediate={intermediate}; use eval.intermediate=full or another metric"
        )
    return replace(spec, light=True)


def export_best(backend, tokenizer, folder: Path, step: int, best: BestMetric, metrics: dict[str, Any]) -> None:
    """All ranks call this (the export gathers shards); rank 0 writes the files."""
    backend.export_pretrained(folder, tokenizer)
    backend.barrier()
    if backend.ctx.is_main:
        record = {"step": step, "metric": best.name, "mode": best.mode, "value": metrics[best.name], "metrics": metrics}
        (folder / "best.json").write_text(json.dumps(record, indent=1))
        log.info("best %s=%.6g at step %d: model exported to %s", best.name, metrics[best.name], step, folder)
    backend.barrier()
