"""`ngdiff study`: run a grid of unlearning runs on one world and write its results and pictures.

    ngdiff study [CONFIG.yaml] [--quick] [--output-dir DIR]      run locally, one run after another
    ngdiff study CONFIG.yaml --slurm [--partition P --time T]    world job, one array job, report job
    ngdiff study report DIR                                      aggregate and plot what has finished
    ngdiff study report --results FILE --config STUDY.yaml --out DIR    the same from a results.jsonl alone
    ngdiff study attack DIR [--relearn-steps N ...]              privacy metrics and attacks on the kept weights

Every run's config is validated before the world is built; finished runs are skipped, so the same
command resumes an interrupted study.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

import yaml

from launcher.cli import subcommand
from ngdiff.errors import UserError

log = logging.getLogger("ngdiff.study")

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "study"
RAW_FILE = "study.yaml"  # the study config as given, kept in the study folder (ngdiff.study.report.RAW_FILE)
SLURM_ONLY = ("dry_run", "partition", "time", "account", "gpus_per_task", "cpus_per_task", "python")
ACTIONS = ("report", "world", "run-one", "worker", "attack")


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG | report DIR",
        help=f"a study YAML (default: {CONFIG_DIR / 'default.yaml'}), or `report DIR` to aggregate a study folder",
    )
    parser.add_argument("--quick", action="store_true", help=f"the small smoke-test grid ({CONFIG_DIR / 'quick.yaml'})")
    parser.add_argument("--output-dir", default="", help="the study folder (default: outputs/study/<name>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--workers", type=int, default=1, help="runs at a time, each a one-thread subprocess (default: 1, in process)"
    )
    rebuild = parser.add_argument_group("report from a results file (no run folders needed)")
    rebuild.add_argument(
        "--results", default="", help="a study's results.jsonl (or .jsonl.gz), e.g. docs/study/results.jsonl.gz"
    )
    rebuild.add_argument("--config", default="", help="its study YAML (default: study.yaml beside the results)")
    rebuild.add_argument("--out", default="", help="where summary.md and the plots go (default: beside the results)")
    attack = parser.add_argument_group("ngdiff study attack DIR: membership inference and attacks on the kept weights")
    attack.add_argument("--relearn-steps", type=int, default=5, help="relearning steps per model (default 5)")
    attack.add_argument("--relearn-lr", type=float, default=1e-3, help="relearning AdamW lr (default 1e-3)")
    attack.add_argument("--relearn-batch-size", type=int, default=4, help="forget rows per relearning step")
    slurm = parser.add_argument_group("Slurm (one array job, a task per run)")
    slurm.add_argument("--slurm", action="store_true", help="submit instead of running here")
    slurm.add_argument("--partition", default="")
    slurm.add_argument("--time", default="", help="time limit of each task, e.g. 00:30:00")
    slurm.add_argument("--account", default="")
    slurm.add_argument("--gpus-per-task", type=int, default=0)
    slurm.add_argument("--cpus-per-task", type=int, default=0)
    slurm.add_argument("--python", default="", help="the interpreter on the nodes (default: this one)")
    slurm.add_argument("--dry-run", action="store_true", help="print the scripts; submit nothing")


@subcommand("study", "a grid of methods x lrs x seeds on one world: results, summary, plots", add_study_arguments)
def run_study(args: argparse.Namespace) -> int:
    items = list(args.items)
    if items and items[0] in ACTIONS:
        action, rest = items[0], items[1:]
        if action == "report" and args.results:
            if rest:
                raise UserError("ngdiff study report takes a study folder or --results FILE, not both")
            return results_report_command(Path(args.results), args.config, args.out)
        if not rest:
            raise UserError(f"ngdiff study {action} needs the study folder")
        if action == "report":
            return report_command(Path(rest[0]))
        if action == "world":
            return world_command(Path(rest[0]), not args.no_progress)
        if action == "attack":
            return attack_command(Path(rest[0]), args)
        if action == "worker":
            return worker_command(Path(rest[0]))
        if len(rest) != 2 or not rest[1].isdigit():
            raise UserError("usage: ngdiff study run-one DIR INDEX")
        return run_one_command(Path(rest[0]), int(rest[1]))
    if len(items) > 1:
        raise UserError(f"ngdiff study takes one config file, got {items}")
    if items and args.quick:
        raise UserError("choose a config file or --quick, not both")
    config = Path(items[0]) if items else CONFIG_DIR / ("quick.yaml" if args.quick else "default.yaml")
    return start_study(config, args)


def _setup_logging() -> None:
    from launcher.logs import setup_logging

    setup_logging(0, False)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-run loading bars would bury the study's own
    for name in ("ngdiff", "ngdiff.trainer", "ngdiff.eval"):
        logging.getLogger(name).setLevel(logging.WARNING)


def start_study(config: Path, args: argparse.Namespace) -> int:
    from ngdiff.study.runner import claim_study_dir, plan_study, prepare_worlds, replan, run_local
    from ngdiff.study.spec import load_study

    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if not args.slurm:  # a Slurm option alone would otherwise start the whole study here, e.g. a --dry-run
        given = [f"--{name.replace('_', '-')}" for name in SLURM_ONLY if getattr(args, name)]
        if given:
            raise UserError(f"{', '.join(given)} only apply with --slurm")
    spec = load_study(config)
    study_dir = Path(args.output_dir or f"outputs/study/{spec.name}")
    plan = plan_study(spec, study_dir)  # every run's config validated here, before anything is built
    if args.slurm:
        return submit_study(plan, config, args)
    _setup_logging()
    claim_study_dir(plan)
    (study_dir / RAW_FILE).write_text(Path(config).read_text())
    started = time.time()
    pending = plan.pending()
    print(f"study {spec.name}: {len(plan.runs)} runs ({len(plan.runs) - len(pending)} already finished) in {study_dir}")
    worlds = prepare_worlds(plan, progress=not args.no_progress)
    world_seconds = time.time() - started
    failed = run_local(plan, worlds, progress=not args.no_progress, workers=args.workers)
    if spec.staged and not failed:  # the selection has finished: its lrs are known, the confirmation runs now
        confirmation = replan(plan)
        if len(confirmation.runs) > len(plan.runs):
            print(
                f"selection finished: {len(confirmation.runs) - len(plan.runs)} confirmation runs at the selected lrs"
            )
            failed = run_local(confirmation, worlds, progress=not args.no_progress, workers=args.workers)
    report_command(study_dir)
    print(f"world {world_seconds:.0f} s, study {time.time() - started:.0f} s in all")
    if failed:
        print(f"{len(failed)} runs failed (logs in {study_dir / 'logs'}): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def report_command(study_dir: Path) -> int:
    from ngdiff.study.report import make_report

    report = make_report(study_dir)
    print(f"{len(report.finished)} runs finished, {len(report.missing)} missing; {len(report.rows)} result rows")
    for path in report.files:
        print(f"  {path}")
    return 0


def attack_command(study_dir: Path, args: argparse.Namespace) -> int:
    """Score the kept weights of the verdict runs (resumable), then rewrite the summary with them."""
    from ngdiff.study.attacks import ATTACKS_FILE, AttackSettings, attack_study

    settings = AttackSettings(args.relearn_steps, args.relearn_lr, args.relearn_batch_size)
    _setup_logging()
    rows = attack_study(study_dir, settings, progress=not args.no_progress)
    print(f"{len(rows)} models scored in {study_dir / ATTACKS_FILE}")
    return report_command(study_dir)


def results_report_command(results: Path, config: str, out: str) -> int:
    from ngdiff.study.report import report_from_results

    config_path = Path(config) if config else results.parent / RAW_FILE
    if not config_path.is_file():
        raise UserError(f"{config_path}: no study config: name the study's YAML with --config")
    report = report_from_results(results, config_path, Path(out) if out else results.parent)
    print(f"{len(report.rows)} result rows from {results}")
    for path in report.files:
        print(f"  {path}")
    return 0


def _load_plan(study_dir: Path):
    from ngdiff.study.runner import plan_study
    from ngdiff.study.spec import load_study

    raw = study_dir / RAW_FILE
    if not raw.is_file():
        raise UserError(f"{study_dir} is not a study folder ({RAW_FILE} missing)")
    return plan_study(load_study(raw), study_dir)


def world_command(study_dir: Path, progress: bool) -> int:
    from ngdiff.study.runner import prepare_worlds

    _setup_logging()
    prepare_worlds(_load_plan(study_dir), progress=progress)
    return 0


def worker_command(study_dir: Path) -> int:
    """A local study's worker (ngdiff.study.workers): run indices on stdin, `<index> <exit code>` on stdout."""
    import os

    from ngdiff.study.runner import prepare_worlds, run_one
    from ngdiff.study.workers import LOGS, serve

    replies = os.fdopen(os.dup(1), "w")  # the parent reads only these lines ...
    os.dup2(2, 1)  # ... and anything else printed outside a run goes to the worker's log
    _setup_logging()
    plan = _load_plan(study_dir)
    worlds: dict = {}

    def run(index: int) -> None:
        run = plan.runs[index]
        if run.world not in worlds:
            worlds[run.world] = prepare_worlds(plan, [run.world], progress=False)[run.world]
        run_one(plan, worlds[run.world], run)

    serve(sys.stdin, replies, run, lambda index: study_dir / LOGS / f"{plan.runs[index].run_id}.log")
    return 0


def run_one_command(study_dir: Path, index: int) -> int:
    """One run of the grid by its index (a Slurm array task); a finished run is skipped."""
    from ngdiff.study.runner import DONE, prepare_worlds, run_one

    _setup_logging()
    plan = _load_plan(study_dir)
    if not 0 <= index < len(plan.runs):
        raise UserError(f"run index {index} outside the grid of {len(plan.runs)} runs")
    run = plan.runs[index]
    if (plan.run_dir(run) / DONE).is_file():
        print(f"{run.run_id}: already finished")
        return 0
    record = run_one(plan, prepare_worlds(plan, [run.world], progress=False)[run.world], run)
    print(f"{run.run_id}: {record}")
    return 0


# --------------------------------------------------------------------------- Slurm


def array_ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (sbatch --array syntax)."""
    parts, start = [], None
    for i, value in enumerate(indices):
        if start is None:
            start = value
        if i + 1 == len(indices) or indices[i + 1] != value + 1:
            parts.append(f"{start}" if start == value else f"{start}-{value}")
            start = None
    return ",".join(parts)


def render_study_script(
    kind: str, study_dir: Path, args: argparse.Namespace, *, array: str = "", dependency: str = ""
) -> str:
    """An sbatch script for one step of a study: `world`, `array` (a task per run) or `report`."""
    from launcher.secrets import redact
    from launcher.slurm import SlurmError

    study_dir = study_dir.resolve()
    workdir = Path.cwd().resolve()
    for value, name in ((str(study_dir), "study folder"), (str(workdir), "working directory")):
        if any(ch.isspace() for ch in value):
            raise SlurmError(f"the {name} {value!r} contains whitespace, which #SBATCH lines cannot carry")
    q = shlex.quote
    python = args.python or sys.executable
    name = f"ngdiff-study-{study_dir.name}"[:64]
    directives = [
        f"--job-name={name}-{kind}",
        "--ntasks=1",
        f"--chdir={workdir}",
        f"--output={study_dir}/slurm/%x-%A_%a.out" if array else f"--output={study_dir}/slurm/%x-%j.out",
        "--open-mode=append",
        "--requeue",  # a preempted task runs again; its run restarts, finished runs are skipped
        *([f"--array={array}"] if array else []),
        # a step whose dependency can never be met (the world job failed) is cancelled, not left pending forever
        *([f"--dependency={dependency}", "--kill-on-invalid-dep=yes"] if dependency else []),
        *([f"--partition={args.partition}"] if args.partition else []),
        *([f"--time={args.time}"] if args.time else []),
        *([f"--account={args.account}"] if args.account else []),
        *([f"--gpus-per-task={args.gpus_per_task}"] if args.gpus_per_task and kind != "report" else []),
        *([f"--cpus-per-task={args.cpus_per_task}"] if args.cpus_per_task else []),
    ]
    command = {
        "world": f"{q(python)} -m launcher study world {q(str(study_dir))} --no-progress",
        "array": f'{q(python)} -m launcher study run-one {q(str(study_dir))} "$SLURM_ARRAY_TASK_ID"',
        "report": f"{q(python)} -m launcher study report {q(str(study_dir))}",
    }[kind]
    lines = ["#!/bin/bash", f"# Written by `ngdiff study --slurm`: the study's {kind} step."]
    lines += [f"#SBATCH {d}" for d in directives]
    lines += ["set -euo pipefail", 'export TQDM_MININTERVAL="${TQDM_MININTERVAL:-30}"', f"exec {command}", ""]
    return redact("\n".join(lines))


def submit_study(plan, config: Path, args: argparse.Namespace) -> int:
    """Three jobs: build the world, then one array task per pending run, then the report (afterany)."""
    from launcher.slurm import SlurmError, SubmitOptions, sbatch
    from ngdiff.study.runner import claim_study_dir

    SubmitOptions(partition=args.partition, time=args.time, account=args.account).validate()
    if args.gpus_per_task < 0 or args.cpus_per_task < 0:
        raise SlurmError("--gpus-per-task and --cpus-per-task must not be negative")
    pending = [i for i, run in enumerate(plan.runs) if run in set(plan.pending())]
    if not pending:
        print("every run has finished; nothing to submit (ngdiff study report DIR draws the pictures)")
        return 0
    if plan.spec.staged and not any(run.stage == "confirmation" for run in plan.runs):
        print(
            "this submits the selection stage; once it has finished, the same command submits the confirmation "
            "runs at the selected lrs",
            file=sys.stderr,
        )
    array = array_ranges(pending)
    if args.dry_run:
        for kind in ("world", "array", "report"):
            print(render_study_script(kind, plan.study_dir, args, array=array if kind == "array" else ""))
        return 0
    claim_study_dir(plan)
    (plan.study_dir / RAW_FILE).write_text(Path(config).read_text())
    folder = plan.study_dir / "slurm"
    folder.mkdir(parents=True, exist_ok=True)

    def submit(kind: str, **kw: str) -> str:
        script = folder / f"{kind}.sbatch"
        script.write_text(render_study_script(kind, plan.study_dir, args, **kw))
        return sbatch(script)

    world_job = submit("world")
    array_job = submit("array", array=array, dependency=f"afterok:{world_job}")
    report_job = submit("report", dependency=f"afterany:{array_job}")
    print(yaml.safe_dump({"world": world_job, "array": array_job, "report": report_job, "tasks": len(pending)}))
    print(f"scripts and logs in {folder}", file=sys.stderr)
    return 0
