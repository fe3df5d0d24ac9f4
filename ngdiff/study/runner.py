"""Running the grid: validate every run's config first, build the world, then one run after another
(finished runs are skipped, so an interrupted study resumes), each in its own folder under `runs/`.

A run is finished when its folder holds `done.json` (written after the run's final evaluation); an
unfinished folder is started again from scratch (runs are short; a Slurm requeue does the same).

A staged study runs its selection (and claim-2) runs first; once every selection run has finished, each
method's lr is picked (`selection.json`, written once) and the confirmation runs join the grid at its end.
Each run keeps its selected point's and its end point's weights in bf16 under `weights/` (unless the
study says `keep_weights: false`), so later attacks and privacy metrics can score them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ngdiff.config import ExperimentConfig, load_config
from ngdiff.locks import clear_locked_folder, lock_output_dir
from ngdiff.study.muse_world import MUSE_DISTANCE, verbmem_distance, with_distance
from ngdiff.study.results import Row, _number, collect
from ngdiff.study.spec import BASE_WORLD, RunSpec, StudyError, StudySpec, WorldSpec, same_setting, spec_to_dict
from ngdiff.study.world import WORLD_FILE, World, check_world, load_or_build, placeholder_overrides

if TYPE_CHECKING:
    from ngdiff.eval.during_training import EvaluateFactory

log = logging.getLogger("ngdiff.study")

DONE = "done.json"
STUDY_FILE = "study.json"
SELECTION_FILE = "selection.json"  # the lr each method's confirmation runs at, written once
WEIGHTS = "weights"  # runs/<run>/weights/{selected,end}: bf16 safetensors
QUIET = ("logging.progress=false", "logging.wandb=false")
# the run defaults the study's methods were written against (AdamW, AutoLR off, 1 epoch, no periodic
# checkpoints): `ngdiff train`'s own defaults run NGDiff + AutoLR under SGD, so a method that names no
# optimizer keeps its meaning only with these first (every study key overrides them)
STUDY_RUN_DEFAULTS = ("optim.name=adamw", "optim.lr=1e-5", "autolr.enabled=false", "train.epochs=1",
                      "train.save_every=0")  # fmt: skip


@dataclass(frozen=True)
class Plan:
    spec: StudySpec
    study_dir: Path
    runs: list[RunSpec]

    def run_dir(self, run: RunSpec) -> Path:
        return run_folder(self.study_dir / "runs", run)

    def pending(self) -> list[RunSpec]:
        return [r for r in self.runs if not (self.run_dir(r) / DONE).is_file()]


def run_folder(runs: Path, run: RunSpec) -> Path:
    """`runs/<run_id>`, or the run's one-digit-lr folder of a study begun before run names carried the
    whole lr (its config.yaml has this run's lr), so such a study resumes and reports as before."""
    folder, legacy = runs / run.run_id, runs / run.legacy_run_id
    saved = _saved_lr(folder)
    if saved is not None and saved != run.lr:  # an old one-digit name that is now another lr's name
        raise StudyError(
            f"{folder} holds the run of lr {saved:g} (named by an earlier ngdiff), not lr {run.lr:g}; "
            f"rename it to {runs / RunSpec(run.method, saved, run.seed, ()).run_id}"
        )
    if folder.exists() or legacy == folder or _saved_lr(legacy) != run.lr:
        return folder
    return legacy


def _saved_lr(folder: Path) -> float | None:
    config = folder / "config.yaml"
    if not config.is_file():
        return None
    return ((yaml.safe_load(config.read_text()) or {}).get("optim") or {}).get("lr")


def shared_folder_error(spec: StudySpec, runs: list[RunSpec]) -> StudyError | None:
    """Two runs of the grid whose folder names are equal (their method names clean to one name)."""
    seen: dict[str, RunSpec] = {}
    for run in runs:
        other = seen.setdefault(run.run_id, run)
        if other is not run:
            return StudyError(
                f"{spec.source}: runs {other.method!r} and {run.method!r} (lr {run.lr:g}, seed {run.seed}) would "
                f"share the folder runs/{run.run_id}: a folder name keeps only letters, digits and +-_. of a method "
                "name; rename one of the methods"
            )
    return None


def world_spec(spec: StudySpec, label: str, study_dir: Path) -> StudySpec:
    """The study as one world sees it: `world` replaced by the labelled world, each in a folder of its own
    (`<study>/world` for the study's own world, `<study>/worlds/<label>` for the others)."""
    world = spec.world_spec(label)
    if label != BASE_WORLD and not world.cache_dir:
        world = replace(world, cache_dir=str(study_dir / "worlds" / label))
    return replace(spec, world=world)


def world_dir(spec: StudySpec, label: str, study_dir: Path) -> Path:
    world = world_spec(spec, label, study_dir).world
    return Path(world.cache_dir) if world.cache_dir else study_dir / "world"


def world_records(spec: StudySpec, study_dir: Path) -> dict[str, dict[str, Any]]:
    """world.json of every world already built, by label."""
    labels = {BASE_WORLD, *(label for label, _ in spec.worlds)}
    out = {}
    for label in sorted(labels):
        path = world_dir(spec, label, study_dir) / WORLD_FILE
        if path.is_file():
            out[label] = json.loads(path.read_text())
    return out


def study_rows(spec: StudySpec, study_dir: Path, records: dict[str, dict[str, Any]] | None = None) -> list[Row]:
    """The rows of every finished run, each run's step 0 its world's target and, in a MUSE world, every row's
    D against its world's retain model: one reading for the lr selection and the report, so that both rank
    the same numbers (`records`: world_records, when the caller has them)."""
    records = world_records(spec, study_dir) if records is None else records
    starts = {}
    for label, record in records.items():
        start = dict(record.get("target_metrics") or {})
        reference = _number((record.get("reference_metrics") or {}).get(spec.summary.utility_metric))
        if start and reference is not None:
            start["retain_model_utility"] = reference  # so the rows alone can draw the retain model
        calibration = record.get("calibration") or {}
        if start and calibration.get("d_retain_retain") is not None:  # a second retain model: the retrain floor
            start["retrain_ks_d"] = calibration["d_retain_retain"]
            start["retrain_forget_quality"] = calibration.get("forget_quality_ceiling")
        starts[label] = start
    rows = collect(study_dir, starts)
    if spec.world.kind == "muse":  # D against each world's retain model, kept in the rows
        rows = with_distance(rows, {k: r.get("reference_metrics") or {} for k, r in records.items()})
    return rows


def current_selection(spec: StudySpec, study_dir: Path) -> dict[str, float] | None:
    """Each method's selected lr once every selection run has finished (saved in selection.json the first
    time, so the confirmation's lrs never move), else None. A study without stages has none."""
    if not spec.staged:
        return None
    path = study_dir / SELECTION_FILE
    if path.is_file():
        return {k: float(v) for k, v in json.loads(path.read_text())["lrs"].items()}
    selection = [r for r in spec.runs() if r.stage == "selection"]
    if not all((run_folder(study_dir / "runs", r) / DONE).is_file() for r in selection):
        return None
    from ngdiff.study.endpoints import endpoints, of_stage
    from ngdiff.study.summary import rule_of, selected_lrs

    lrs = selected_lrs(of_stage(endpoints(study_rows(spec, study_dir), rule_of(spec)), "selection"), spec)
    record = {"endpoint": spec.summary.select_on, "fraction": spec.summary.utility_fraction, "lrs": lrs}
    path.write_text(json.dumps(record, indent=1))
    return lrs


def run_config(
    spec: StudySpec, run: RunSpec, base: list[str], output_dir: Path, check_sources: bool = True
) -> ExperimentConfig:
    """The run's full config: world keys, the study's common keys and budget, the method, lr and seed.
    `check_sources=False` for placeholder paths (a CPU world's model and splits do not exist yet)."""
    overrides = [*STUDY_RUN_DEFAULTS, *base, *spec.run_overrides(run), *QUIET, f"output_dir={output_dir}"]
    return load_config(None, overrides, check_sources=check_sources)


def plan_study(spec: StudySpec, study_dir: Path) -> Plan:
    """Check the world section and every run's config (with placeholder paths) before anything heavy."""
    check_world(spec.world)
    for _label, world in spec.worlds:
        check_world(world)
    # every run the study can run: the confirmation's at each method's first lr stands in for the selected one
    runs = spec.runs({m.name: m.lrs[0] for m in spec.methods})
    clash = shared_folder_error(spec, runs)
    if clash is not None:
        raise clash
    placeholders = placeholder_overrides(spec)
    real_paths = spec.world.kind == "cluster"  # a cluster world's target and data exist: check them too
    for run in runs:
        try:
            run_config(spec, run, placeholders, study_dir / "runs" / run.run_id, check_sources=real_paths)
        except StudyError:
            raise
        except Exception as err:  # ConfigError and friends: name the method
            raise StudyError(f"{spec.source}: method {run.method!r} (lr {run.lr:g}): {err}") from err
    return Plan(spec, study_dir, spec.runs(current_selection(spec, study_dir)))


def replan(plan: Plan) -> Plan:
    """The plan again: a staged study's confirmation runs join once its selection has finished."""
    return Plan(plan.spec, plan.study_dir, plan.spec.runs(current_selection(plan.spec, plan.study_dir)))


def claim_study_dir(plan: Plan) -> None:
    """Write study.json; refuse a folder that holds a different study (same world and grid, or nothing)."""
    study_dir = plan.study_dir
    study_dir.mkdir(parents=True, exist_ok=True)
    path = study_dir / STUDY_FILE
    record = spec_to_dict(plan.spec)
    defaults = {"world": json.loads(json.dumps(asdict(WorldSpec())))}
    if path.is_file():
        saved = json.loads(path.read_text())
        for key in ("world", "budget_epochs", "eval_every", "common"):
            if not same_setting(saved.get(key), record.get(key), defaults.get(key)):
                raise StudyError(
                    f"{study_dir} holds a study with a different {key}; choose another --output-dir "
                    "(runs of a different world, budget or cadence cannot be compared)"
                )
    path.write_text(json.dumps(record, indent=1))


def prepare_world(plan: Plan, progress: bool = True) -> World:
    """The study's own world (built now unless cached)."""
    return prepare_worlds(plan, [BASE_WORLD], progress)[BASE_WORLD]


def prepare_worlds(plan: Plan, labels: Iterable[str] | None = None, progress: bool = True) -> dict[str, World]:
    """Every world the plan's runs use (or `labels`), by label, each built now unless cached. A staged
    study's confirmation worlds are built with the selection's, so the study needs no second build step."""
    spec = plan.spec
    if labels is None:
        labels = {r.world for r in spec.runs({m.name: m.lrs[0] for m in spec.methods})}
    placeholders = placeholder_overrides(spec)
    # the formatting every run trains on (the paths are placeholders until the world exists)
    data_cfg = load_config(None, [*placeholders, *spec.common], check_sources=False).data
    return {
        label: load_or_build(world_spec(spec, label, plan.study_dir), plan.study_dir, data_cfg, progress)
        for label in sorted(labels)
    }


def run_one(plan: Plan, world: World, run: RunSpec) -> dict[str, Any]:
    """One unlearning run with periodic evaluation; writes `done.json` when it completed. Holds the run's
    lock, so a second study process on the same folder neither runs nor clears it."""
    from ngdiff.eval.during_training import evaluation_factory
    from ngdiff.finite import NonFiniteError
    from ngdiff.pipeline import run_training
    from parallel.base import DistContext

    out = plan.run_dir(run)
    cfg = run_config(plan.spec, run, list(world.overrides), out)
    with lock_output_dir(out):
        if (out / DONE).is_file():  # finished by another process since this one looked
            return json.loads((out / DONE).read_text())
        _restart(cfg)
        started = time.time()
        factory = evaluation_factory(cfg)
        if plan.spec.keep_weights and factory is not None:
            rule = plan.spec.summary
            factory = keep_selected_weights(
                factory,
                out / WEIGHTS / "selected",
                world.target_metrics,
                rule.utility_fraction,
                rule.utility_metric,
                world_distance(plan.spec, world),
            )
        record = {
            "method": run.method,
            "lr": run.lr,
            "seed": run.seed,
            "stage": run.stage,
            "world": run.world,
            "budget_epochs": plan.spec.budget_epochs,
        }
        try:
            outcome = run_training(cfg, DistContext(), evaluate_factory=factory)
        except NonFiniteError as err:  # an lr too large for this method: a result of the grid, not a failure
            log.warning("run %s diverged: %s", run.run_id, err)
            record |= {"steps": err.step, "diverged": {"step": err.step, "reason": str(err)}} | _timing(started)
            _mark_done(plan, world, out, record)
            return record
        record |= {"steps": outcome.trainer.step_index, "final_lr": outcome.trainer.lr} | _timing(started)
        if outcome.final_dir is not None:
            if plan.spec.keep_weights:  # the end point, already bf16 (export.dtype)
                (out / WEIGHTS).mkdir(exist_ok=True)
                os.replace(outcome.final_dir, out / WEIGHTS / "end")
            else:
                shutil.rmtree(outcome.final_dir)  # the trajectory is the result
            _mark_done(plan, world, out, record)
    return record


def _mark_done(plan: Plan, world: World, out: Path, record: dict[str, Any]) -> None:
    """Finish a run's folder: when no evaluation beat the target, the target is its selected point; then
    done.json, last, so a run is finished only once its weights are in place."""
    if plan.spec.keep_weights and not (out / WEIGHTS / "selected").exists():
        _write_selected_is_target(out / WEIGHTS / "selected", world)
    (out / DONE).write_text(json.dumps(record, indent=1))


def _timing(started: float) -> dict[str, float]:
    now = time.time()
    # finished_at is seconds since the epoch: the study's cost timeline (ngdiff.study.cost)
    return {"seconds": round(now - started, 2), "finished_at": round(now, 2)}


Distance = tuple[str, Callable[[dict[str, Any]], float | None]]  # (its name, D of an evaluation's metrics)
KS_DISTANCE: Distance = ("forget_ks_statistic", lambda metrics: metrics.get("forget_ks_statistic"))


def world_distance(spec: StudySpec, world: World) -> Distance:
    """The D a world's runs are ranked by (ngdiff.study.summary.rule_of): TOFU's KS distance, or a MUSE
    world's VerbMem distance to its retain model."""
    if spec.world.kind != "muse":
        return KS_DISTANCE
    return MUSE_DISTANCE, lambda metrics: verbmem_distance(metrics, world.reference_metrics)


def keep_selected_weights(
    factory: EvaluateFactory,
    folder: Path,
    target: dict[str, Any],
    fraction: float,
    utility_metric: str,
    distance: Distance = KS_DISTANCE,
) -> EvaluateFactory:
    """The evaluation, plus: when a point keeps the utility floor and has a smaller distance D than every
    earlier qualifying point (the target's included), its weights replace `folder` (bf16), so the folder
    always holds the run's selected point (ngdiff.study.endpoints' rule) at the cost of one export per
    improvement, and never a half-written model (written beside it, then renamed)."""
    distance_name, distance_of = distance
    best_d = distance_of(target)
    utility = target.get(utility_metric)
    if best_d is None or utility is None:
        return factory
    floor = fraction * float(utility)

    def wrapped(backend, tokenizer):
        evaluate = factory(backend, tokenizer)
        state = {"d": float(best_d)}

        def run(step: int, final: bool = True) -> dict[str, Any]:
            metrics = evaluate(step, final=final)
            d, u = distance_of(metrics), metrics.get(utility_metric)
            if d is not None and u is not None and u >= floor and d < state["d"]:
                state["d"] = float(d)
                point = {"step": step, distance_name: d, utility_metric: u}
                _export_atomically(backend, tokenizer, folder, point)
            return metrics

        return run

    return wrapped


def _export_atomically(backend, tokenizer, folder: Path, record: dict[str, Any]) -> None:
    fresh, old = folder.with_name(folder.name + ".partial"), folder.with_name(folder.name + ".old")
    for leftover in (fresh, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    backend.export_pretrained(fresh, tokenizer, "bf16")
    backend.barrier()
    if backend.ctx.is_main:
        (fresh / "point.json").write_text(json.dumps(record, indent=1))
        if folder.exists():
            os.replace(folder, old)
        os.replace(fresh, folder)
        if old.exists():
            shutil.rmtree(old)
    backend.barrier()


def _write_selected_is_target(folder: Path, world: World) -> None:
    """No evaluation beat the target under the floor: the selected point is step 0, the world's target,
    whose weights the world keeps already."""
    folder.mkdir(parents=True)
    model = next((o.split("=", 1)[1] for o in world.overrides if o.startswith("model.path=")), "")
    (folder / "point.json").write_text(json.dumps({"step": 0, "target": model}, indent=1))


def _restart(cfg: ExperimentConfig) -> None:
    """The run starts in an empty folder: an unfinished one's files are deleted (its lock, held, is kept)."""
    from ngdiff.outputs import write_output_dir

    clear_locked_folder(cfg.output_dir)
    write_output_dir(cfg, overwrite=False)


def priority(spec: StudySpec, run: RunSpec) -> tuple:
    """Local order: every method's first seed before any second seed, the lr.png methods first, so an
    interrupted study has the widest comparison (the Slurm array keeps the grid's order); a staged study
    runs its stages in order (selection, claim 2, confirmation) the same way."""
    method = spec.method(run.method)
    names = [m.name for m in spec.methods]
    if spec.staged or run.stage == "claim2":
        stage = next((s for s in spec.stages if s.name == run.stage), None)
        seeds = stage.seeds if stage is not None else spec.claim2.seeds  # type: ignore[union-attr]
        order = ["selection", "claim2", "confirmation"]
        head: tuple = (order.index(run.stage) if run.stage in order else 0, seeds.index(run.seed))
    else:
        head = (0, method.seeds.index(run.seed))
    lr_index = method.lrs.index(run.lr) if run.lr in method.lrs else 0
    return (*head, 0 if run.method in spec.lr_plot_methods else 1, names.index(run.method), lr_index, run.world)


def run_local(plan: Plan, worlds: dict[str, World], progress: bool = True, workers: int = 1) -> list[str]:
    """Every pending run, with a progress bar over runs: one after another in this process, or
    `workers` at a time on one-thread worker processes (ngdiff.study.workers). Returns the failed runs."""
    from tqdm.auto import tqdm

    pending = sorted(plan.pending(), key=lambda run: priority(plan.spec, run))
    done = len(plan.runs) - len(pending)
    bar = tqdm(total=len(plan.runs), initial=done, desc="study", unit="run", disable=not progress, dynamic_ncols=True)
    failed: list[str] = []
    if workers <= 1:
        for run in pending:
            bar.set_postfix_str(run.run_id)
            run_one(plan, worlds[run.world], run)
            bar.update(1)
    else:
        from ngdiff.study.workers import LOGS, run_pool

        def finished(index: int, ok: bool) -> None:
            run = plan.runs[index]
            if not ok or not (plan.run_dir(run) / DONE).is_file():
                failed.append(run.run_id)
                log.error("run %s failed; see %s", run.run_id, plan.study_dir / LOGS / f"{run.run_id}.log")
            bar.update(1)
            bar.set_postfix_str(run.run_id)

        run_pool(plan.study_dir, [plan.runs.index(run) for run in pending], workers, finished)
    bar.close()
    return failed
