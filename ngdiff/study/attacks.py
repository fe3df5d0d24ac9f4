"""Privacy and robustness of the weights a study keeps: `ngdiff study attack DIR` scores each verdict run's
selected point (`runs/<run>/weights/selected`) and the world's retain model (the yardstick) with the
membership-inference metrics of `ngdiff eval` and the attacks of `ngdiff attack`, into `attacks.jsonl`;
the summary then reports them per method under the statistics of forget quality (ngdiff.study.inference).

Per scored model, on the world's forget evaluation items (question, answer) and as many evenly spaced rows
of TOFU's matching holdout split (authors no model of the world saw):
- `mia_*_auc`: open-unlearning's membership-inference AUCs, forget vs holdout (ngdiff.eval.mia);
- `privleak`: TOFU PrivLeak of the Min-K% AUC against the retain model's own AUC on the same items
  (open-unlearning src/evals/metrics/privacy.py): 0 is a retrain, negative leaks membership;
  `privleak_abs` = |privleak|, the distance from a retrain in either direction;
- `int4_recovery`: forget ROUGE-L recall after 4-bit RTN quantization minus before (ngdiff.attacks.quantize;
  Zhang et al., ICLR 2025); `int8_recovery` likewise;
- `relearn_recovery`: ROUGE-L recall of the held-out forget rows after `relearn_steps` AdamW steps on the
  other rows minus before (ngdiff.attacks.relearn; Hu et al. 2024). The retain model's own recovery under
  the same steps is what relearning gives a model that never knew the answers.

Which runs: a staged study's confirmation runs, else each method's runs at its selected lr (the runs the
verdicts use). The comparisons are the study's declared ones, each on `privleak_abs`, `int4_recovery` and
`relearn_recovery` with direction `less` (lower is better on all three), Holm-corrected as one family of
their own, so the forget-quality verdicts keep their family.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ngdiff.study.endpoints import median
from ngdiff.study.inference import Comparison, Verdict, verdicts
from ngdiff.study.results import Row, _number
from ngdiff.study.spec import BASE_WORLD, StudyError

log = logging.getLogger("ngdiff.study")

ATTACKS_FILE = "attacks.jsonl"
YARDSTICK = "retain model"  # the `method` of a world's retain-model row
COMPARED = ("privleak_abs", "int4_recovery", "relearn_recovery")  # lower is better on each
COLUMNS = {  # reported per method: row key -> column heading
    "privleak": "PrivLeak (%)",
    "mia_mink_auc": "Min-K% AUC",
    "mia_loss_auc": "LOSS AUC",
    "int4_recovery": "int4: ROUGE-L regained",
    "relearn_recovery": "relearning: ROUGE-L regained",
}


@dataclass(frozen=True)
class AttackSettings:
    """What `ngdiff study attack` does to every model; recorded in each row, the same for every row."""

    relearn_steps: int = 5
    relearn_lr: float = 1e-3  # the worlds' tiny models: 1e-5 (ngdiff attack's default for 7B) moves them little
    relearn_batch_size: int = 4
    batch_size: int = 32

    def __post_init__(self) -> None:
        for name in ("relearn_steps", "relearn_batch_size", "batch_size"):
            if getattr(self, name) < 1:
                raise StudyError(f"study attack: {name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not (math.isfinite(self.relearn_lr) and self.relearn_lr > 0):
            raise StudyError(f"study attack: relearn-lr must be a positive number, got {self.relearn_lr}")


@dataclass(frozen=True)
class AttackPoint:
    """One scored run as the statistics layer sees an end point: a cell key and its values."""

    stage: str | None
    world: Any
    method: str
    lr: float
    seed: int
    values: dict[str, float]

    @property
    def pair_key(self) -> tuple[Any, int]:
        return (self.world, self.seed)

    def value(self, field: str) -> float:
        value = self.values.get(field)
        return float("nan") if value is None else float(value)


# --------------------------------------------------------------------------- scoring


def score_model(
    model,
    tokenizer,
    retain_model,
    model_path: str,
    forget: Sequence[dict[str, Any]],
    holdout: Sequence[dict[str, Any]],
    settings: AttackSettings,
    max_new_tokens: int,
    prompt_template: str = "",
) -> dict[str, float]:
    """Every number of one model (see the module doc); relearning runs last, as it changes `model`."""
    from ngdiff.attacks.quantize import quantized
    from ngdiff.attacks.relearn import RelearnConfig, relearning_curve
    from ngdiff.attacks.scoring import Scoring, forget_scores
    from ngdiff.eval.mia import mia_metrics, mia_records

    mia = {"prompt_template": prompt_template, "batch_size": settings.batch_size, "reference_model": retain_model}
    out = mia_metrics(mia_records(model, tokenizer, forget, **mia), mia_records(model, tokenizer, holdout, **mia))
    out["privleak_abs"] = abs(out["privleak"])
    how = Scoring(max_new_tokens, settings.batch_size, prompt_template)
    before = forget_scores(model, tokenizer, forget, how)["rougeL_recall"]
    out["forget_rougeL_recall"] = before
    for scheme in ("int8", "int4"):
        with quantized(model, scheme):
            out[f"{scheme}_recovery"] = forget_scores(model, tokenizer, forget, how)["rougeL_recall"] - before
    cfg = RelearnConfig(settings.relearn_steps, settings.relearn_lr, settings.relearn_batch_size)
    curve = relearning_curve(model, tokenizer, model_path, forget, cfg, how)["curve"]
    out["relearn_rougeL_recall"] = curve[-1]["rougeL_recall"]
    out["relearn_recovery"] = curve[-1]["rougeL_recall"] - curve[0]["rougeL_recall"]
    return out


def _load(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    from ngdiff.modeling import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).to(torch.float32).eval()  # kept weights are bf16
    return model, load_tokenizer(str(model_dir))


def selected_model(run_dir: Path) -> Path:
    """The folder of a run's selected point: its kept weights, or the world's target when no evaluation beat
    the target above the floor (point.json then names it)."""
    selected = run_dir / "weights" / "selected"
    point = selected / "point.json"
    if not point.is_file():
        raise StudyError(f"{run_dir}: no kept weights (weights/selected/point.json); run the study with keep_weights")
    target = json.loads(point.read_text()).get("target")
    return Path(target) if target else selected


@dataclass(frozen=True)
class WorldData:
    """What one CPU world gives every scored model."""

    retain_model: Path
    forget: list[dict[str, Any]]
    holdout: list[dict[str, Any]]
    max_new_tokens: int
    prompt_template: str


def world_data(world_dir: Path, record: dict[str, Any], prompt_template: str) -> WorldData:
    """The world's retain model, its forget evaluation items and as many rows of the matching holdout split."""
    from ngdiff import TOFU_DIR
    from ngdiff.eval.tofu import holdout_file, load_holdout
    from ngdiff.study.world import evenly_spaced, read_jsonl

    settings = dict(o.split("=", 1) for o in record.get("overrides", []))
    split, data_dir = settings.get("eval.split"), settings.get("eval.data_dir")
    retain = world_dir / "retain_model"
    if not (split and data_dir and retain.is_dir()):
        raise StudyError(
            f"{world_dir}: study attack scores CPU worlds (a retain model folder and evaluation files); for "
            "other worlds run `ngdiff attack` on runs/<run>/weights/selected"
        )
    qa = ("question", "answer")
    forget = [{k: r[k] for k in qa} for r in read_jsonl(Path(data_dir) / f"{split}_perturbed.jsonl")]
    holdout = evenly_spaced(load_holdout(holdout_file(split, TOFU_DIR)), len(forget))
    max_new_tokens = int(settings.get("eval.max_new_tokens", 200))
    return WorldData(retain, forget, holdout, max_new_tokens, prompt_template)


def score_folder(model_dir: Path, data: WorldData, retain_model, settings: AttackSettings) -> dict[str, float]:
    """score_model on a model folder against the world's (already loaded) retain model."""
    import torch

    torch.manual_seed(0)
    model, tokenizer = _load(model_dir)
    return score_model(
        model,
        tokenizer,
        retain_model,
        str(model_dir),
        data.forget,
        data.holdout,
        settings,
        data.max_new_tokens,
        data.prompt_template,
    )


# --------------------------------------------------------------------------- the study's file


def read_attack_rows(path: Path) -> list[Row]:
    from ngdiff.metrics_log import read_jsonl

    return read_jsonl(path) if path.is_file() else []


def check_settings(rows: Iterable[Row], settings: AttackSettings, path: Path) -> None:
    """Rows scored with other settings cannot be pooled with new ones: refuse rather than mix."""
    wanted = asdict(settings)
    for row in rows:
        if row.get("settings") != wanted:
            raise StudyError(
                f"{path} was scored with {row.get('settings')}, not {wanted}: pass the same settings to continue "
                "it, or move the file away to score again"
            )


def attack_study(study_dir: Path, settings: AttackSettings, progress: bool = True) -> list[Row]:
    """Score every verdict run's selected point (and each world's retain model once) not yet in
    attacks.jsonl, rewriting the file after each model, so an interrupted call continues where it stopped."""
    from tqdm.auto import tqdm

    from ngdiff.run_folder import write_atomically
    from ngdiff.study.report import open_study
    from ngdiff.study.runner import DONE, world_dir

    spec, records = open_study(study_dir)
    if spec.world.kind == "muse":
        raise StudyError(
            f"{study_dir}: study attack scores TOFU worlds (its attacks read TOFU's forget items); a MUSE world's "
            "rows hold PrivLeak already: run `ngdiff attack` on runs/<run>/weights/selected for the others"
        )
    path = study_dir / ATTACKS_FILE
    rows = read_attack_rows(path)
    check_settings(rows, settings, path)
    verdict_stage, selected = verdict_runs(spec, study_dir, records)
    done_runs = [json.loads(p.read_text()) | {"dir": p.parent} for p in sorted((study_dir / "runs").glob(f"*/{DONE}"))]
    todo = [
        d for d in done_runs if d.get("stage", "grid") == verdict_stage and selected.get(d["method"]) == float(d["lr"])
    ]
    if not todo:
        raise StudyError(f"{study_dir}: no finished {verdict_stage} runs at a selected lr to attack yet")
    template = _prompt_template(spec)
    scored = {(r.get("world"), r.get("run")) for r in rows}
    jobs = [(d.get("world", BASE_WORLD), d["dir"].name, d) for d in todo]
    jobs = [(w, YARDSTICK, None) for w in sorted({w for w, _, _ in jobs})] + jobs
    jobs = [j for j in jobs if (j[0], j[1]) not in scored]
    worlds: dict[str, tuple[WorldData, Any]] = {}  # each world's items read and retain model loaded once
    bar = tqdm(total=len(jobs), desc="study attack", unit="model", disable=not progress, dynamic_ncols=True)
    for world, run, done in jobs:
        if world not in worlds:
            data = world_data(world_dir(spec, world, study_dir), records[world], template)
            worlds[world] = (data, _load(data.retain_model)[0])
        data, retain_model = worlds[world]
        model_dir = data.retain_model if done is None else selected_model(done["dir"])
        bar.set_postfix_str(run)
        values = score_folder(model_dir, data, retain_model, settings)
        row = {"world": world, "run": run, "settings": asdict(settings), "forget_items": len(data.forget), **values}
        if done is not None:
            row |= {k: done[k] for k in ("stage", "method", "lr", "seed")}
        else:
            row |= {"stage": verdict_stage, "method": YARDSTICK, "lr": None, "seed": None}
        rows.append(row)
        write_atomically(path, "".join(json.dumps(r) + "\n" for r in rows))
        bar.update(1)
    bar.close()
    return rows


def _prompt_template(spec) -> str:
    from ngdiff.config import load_config
    from ngdiff.study.world import placeholder_overrides

    return load_config(None, [*placeholder_overrides(spec), *spec.common], check_sources=False).data.prompt_template


def verdict_runs(spec, study_dir: Path, records: dict[str, dict[str, Any]]) -> tuple[str, dict[str, float]]:
    """(the stage whose runs the verdicts use, each method's lr there), as the study picks them: a staged
    study's selection.json, else the selection rule over the grid's runs."""
    from ngdiff.study.endpoints import endpoints
    from ngdiff.study.runner import current_selection, study_rows
    from ngdiff.study.summary import rule_of, selected_lrs

    if spec.staged:
        return "confirmation", current_selection(spec, study_dir) or {}
    return "grid", selected_lrs(endpoints(study_rows(spec, study_dir, records), rule_of(spec)), spec)


# --------------------------------------------------------------------------- the summary's section


def attack_points(rows: Iterable[Row]) -> list[AttackPoint]:
    return [
        AttackPoint(r.get("stage"), r.get("world"), r["method"], float(r["lr"]), int(r["seed"]), r)
        for r in rows
        if r.get("method") != YARDSTICK
    ]


def attack_verdicts(rows: Sequence[Row], comparisons: Sequence[Comparison], n_boot: int = 10_000) -> list[Verdict]:
    """Each declared comparison on each of COMPARED (lower is better), one Holm family."""
    family = [
        Comparison(c.method, c.reference, field, "less", c.method_lr, c.reference_lr)
        for c in comparisons
        for field in COMPARED
    ]
    points = attack_points(rows)
    ran = {p.method for p in points}
    family = [c for c in family if c.method in ran and c.reference in ran]
    return verdicts(points, family, n_boot=n_boot) if family else []


def _cell(values: Sequence[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{median(values):.3g} [{min(values):.3g}, {max(values):.3g}]"


def attack_markdown(rows: Sequence[Row], comparisons: Sequence[Comparison], n_boot: int = 10_000) -> str:
    """The summary's section: a table per method (median [min, max] over its runs) with each world's retain
    model beside it, then the verdict lines."""
    if not rows:
        return ""
    settings = rows[0].get("settings", {})
    lines = [
        "",
        "## Privacy and attacks (selected points)",
        "",
        f"`ngdiff study attack` on each verdict run's selected point and each world's retain model: membership "
        f"inference of {rows[0].get('forget_items', 'the')} forget items against TOFU's holdout split, RTN "
        f"quantization, {settings.get('relearn_steps')} relearning steps (AdamW, lr {settings.get('relearn_lr')}, "
        f"{settings.get('relearn_batch_size')} rows a step). Cells: median [min, max] over runs; PrivLeak 0 is a "
        "retrain, negative leaks membership; ROUGE-L regained is recall after the attack minus before.",
        "",
        "| method | runs | " + " | ".join(COLUMNS.values()) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    methods: dict[str, list[Row]] = {}
    for row in rows:
        name = row["method"] if row["method"] != YARDSTICK else f"{YARDSTICK} (world `{row.get('world')}`)"
        methods.setdefault(name, []).append(row)
    for name, mine in methods.items():
        cells = [_cell([v for r in mine if (v := _number(r.get(key))) is not None]) for key in COLUMNS]
        lines.append(f"| {name} | {len(mine)} | " + " | ".join(cells) + " |")
    found = attack_verdicts(rows, comparisons, n_boot)
    if found:
        lines += ["", f"Comparisons (lower is better; Holm over {len(found)}):", ""]
        lines += [f"- {v.sentence()}" for v in found]
    return "\n".join(lines) + "\n"
