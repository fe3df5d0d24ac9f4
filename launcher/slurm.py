"""`ngdiff slurm submit`: render an sbatch script for a run, write it next to the run, submit it.
With `--sequence` the job runs `ngdiff sequence` instead: one job for the whole sequence of requests,
which the requeued job resumes like a run (finished requests skipped, the interrupted one resumed).

The job runs `srun` with one task per node; each task starts torchrun (c10d rendezvous on the first
node of the allocation) or the DeepSpeed launcher (a hostfile, `--no_ssh`, one launcher per node).
It asks Slurm for a warning signal before preemption or the time limit (`--signal=USR1@T`) and to
be requeueable: the workers checkpoint on USR1, rank 0 calls `scontrol requeue`, and the requeued
job resumes from the checkpoint by itself because the script always passes `train.resume=auto`.

The config is validated and the output folder checked before `sbatch` is called, so a typo costs
a second, not a place in the queue.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from launcher.cli import split_config_and_overrides, subcommand
from launcher.secrets import find_secrets, redact
from ngdiff.config import ConfigError, ExperimentConfig, load_config
from ngdiff.errors import UserError

LAUNCHERS = ("torchrun", "deepspeed")
SCRIPT_NAME = "job.sbatch"
# a sequence folder's config.yaml records the sequence without data.forget (so that appending a request
# continues it, ngdiff/sequence/runner.py): the job reads the whole config from its own file
SEQUENCE_CONFIG = "sequence.yaml"
Command = Literal["train", "sequence"]


class SlurmError(UserError):
    """Submission failed: bad options, sbatch missing, or sbatch refusing the job (its message included)."""


@dataclass(frozen=True)
class SubmitOptions:
    nodes: int = 1
    gpus_per_node: int = 1
    partition: str = ""
    time: str = ""
    account: str = ""
    launcher: Literal["torchrun", "deepspeed"] = "torchrun"
    cpus_per_task: int = 0  # 0: leave it to the cluster's default
    signal_seconds: int = 120  # warning before preemption / time limit; time for a step and a checkpoint
    job_name: str = ""
    python: str = ""  # the interpreter on the nodes; default: this one, or `python` inside a container
    container_image: str = ""  # pyxis/enroot: `srun --container-image`
    apptainer: str = ""  # an Apptainer/Singularity .sif the launcher runs in (`apptainer exec --nv`)
    mounts: tuple[str, ...] = ()  # extra SRC[:DST] bind mounts for either container runtime

    @property
    def interpreter(self) -> str:
        if self.python:
            return self.python
        return "python" if (self.container_image or self.apptainer) else sys.executable

    def validate(self) -> None:
        if self.nodes < 1:
            raise SlurmError(f"--nodes must be a positive integer, got {self.nodes}")
        if self.gpus_per_node < 1:
            raise SlurmError(f"--gpus-per-node must be a positive integer, got {self.gpus_per_node}")
        if self.cpus_per_task < 0:
            raise SlurmError(f"--cpus-per-task must not be negative, got {self.cpus_per_task}")
        if self.signal_seconds < 1:
            raise SlurmError(f"--signal-seconds must be positive, got {self.signal_seconds}")
        if self.launcher not in LAUNCHERS:
            raise SlurmError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        for name, value in (("--partition", self.partition), ("--account", self.account), ("--time", self.time)):
            if value and not re.fullmatch(r"[\w.:,+-]+", value):
                raise SlurmError(f"{name} {value!r} contains characters Slurm does not accept")
        if self.container_image and self.apptainer:
            raise SlurmError("choose one container runtime: --container-image (pyxis) or --apptainer")
        for mount in self.mounts:
            if not mount or "," in mount or mount.startswith(":"):
                raise SlurmError(f"--mount {mount!r} must look like SRC or SRC:DST (one per flag)")
        if self.job_name and not re.fullmatch(r"[\w.+-]+", self.job_name):
            raise SlurmError(f"--job-name {self.job_name!r}: use letters, digits, '.', '_', '+' or '-'")


def default_job_name(cfg: ExperimentConfig) -> str:
    """`ngdiff-<output folder name>`: unique enough to spot the run in `squeue`."""
    name = re.sub(r"[^\w.+-]+", "-", Path(cfg.output_dir).resolve().name).strip("-") or "run"
    return f"ngdiff-{name}"[:64]


def job_config(out: Path, command: Command) -> Path:
    """The config file the job reads: the run's config.yaml, or the sequence's own copy under slurm/."""
    return out / "slurm" / SEQUENCE_CONFIG if command == "sequence" else out / "config.yaml"


def render_script(
    cfg: ExperimentConfig, opts: SubmitOptions, workdir: Path | None = None, command: Command = "train"
) -> str:
    """The sbatch script that runs `ngdiff <command>` on `cfg` (read from `job_config` in output_dir)."""
    opts.validate()
    workdir = (workdir or Path.cwd()).resolve()
    out = Path(cfg.output_dir)
    out = out if out.is_absolute() else workdir / out
    slurm_dir = out / "slurm"
    for what, path in (("working directory", workdir), ("output_dir", out)):
        if re.search(r"\s", str(path)):  # #SBATCH lines are split on whitespace; quoting is not honoured
            raise SlurmError(f"the {what} {str(path)!r} contains whitespace, which #SBATCH lines cannot carry")
    q = shlex.quote
    directives = [
        f"--job-name={opts.job_name or default_job_name(cfg)}",
        f"--nodes={opts.nodes}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={opts.gpus_per_node}",
        *([f"--cpus-per-task={opts.cpus_per_task}"] if opts.cpus_per_task else []),
        *([f"--partition={opts.partition}"] if opts.partition else []),
        *([f"--account={opts.account}"] if opts.account else []),
        *([f"--time={opts.time}"] if opts.time else []),
        f"--chdir={workdir}",
        f"--output={slurm_dir}/%x-%j.out",
        "--open-mode=append",  # a requeued job appends instead of truncating its log
        "--requeue",
        f"--signal=USR1@{opts.signal_seconds}",
    ]
    header = [
        "#!/bin/bash",
        f"# Written by `ngdiff slurm submit` on {datetime.now().isoformat(timespec='seconds')}.",
        f"# Resubmit (resumes from the newest complete checkpoint): sbatch {q(str(slurm_dir / SCRIPT_NAME))}",
        *(f"#SBATCH {d}" for d in directives),
    ]
    mounts = ",".join(dict.fromkeys([str(workdir), str(out), *opts.mounts]))
    srun_flags = ""
    if opts.container_image:  # pyxis: srun itself starts each task inside the image
        srun_flags = (
            f" --container-image={q(opts.container_image)} --container-mounts={q(mounts)}"
            f" --container-workdir={q(str(workdir))}"
        )
    runtime = f"apptainer exec --nv --bind {q(mounts)} {q(opts.apptainer)} " if opts.apptainer else ""
    if opts.launcher == "torchrun":
        launch, hostfile = _torchrun_command(opts, command, runtime), []
    else:  # the DeepSpeed launcher reads its nodes and slots from a hostfile
        launch = _deepspeed_command(opts, command, runtime)
        hostfile = [
            f'HOSTFILE={q(str(slurm_dir))}/hostfile-"$SLURM_JOB_ID"',
            f'for node in "${{NODES[@]}}"; do echo "$node slots={opts.gpus_per_node}"; done > "$HOSTFILE"',
        ]
    body = [
        "set -euo pipefail",
        f"CONFIG={q(str(job_config(out, command)))}",
        f"PYTHON={q(opts.interpreter)}",
        'NODES=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))',
        'RDZV_HOST="${NODES[0]}"',
        "RDZV_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        *hostfile,
        'export TQDM_MININTERVAL="${TQDM_MININTERVAL:-30}"  # progress as readable lines in the log file',
        'echo "ngdiff: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${NODES[*]};'
        ' rendezvous $RDZV_HOST:$RDZV_PORT"',
        "",
        "# One launcher per node. USR1 (the preemption warning) reaches every process of the step: the",
        "# launcher ignores it (launcher.signals), the workers finish their step, checkpoint, and rank 0",
        "# requeues the job.",
        f'srun --ntasks="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1{srun_flags} \\',
        f'  bash -c {q(launch)} ngdiff-launch "$PYTHON" "$RDZV_HOST" "$RDZV_PORT" "$CONFIG"'
        + (' "$HOSTFILE"' if hostfile else ""),
    ]
    return redact("\n".join([*header, "", *body, ""]))


def _torchrun_command(opts: SubmitOptions, command: Command, runtime: str = "") -> str:
    # runs inside each srun task: $1 python, $2 rendezvous host, $3 port, $4 config
    return (
        f'exec {runtime}"$1" -m launcher.signals torch.distributed.run --nnodes="$SLURM_NNODES" '
        f'--nproc-per-node={opts.gpus_per_node} --rdzv-backend=c10d --rdzv-endpoint="$2:$3" '
        f'--rdzv-id="$SLURM_JOB_ID" -m launcher {command} "$4" train.resume=auto'
    )


def _deepspeed_command(opts: SubmitOptions, command: Command, runtime: str = "") -> str:
    # $1 python, $2 master host, $3 port, $4 config, $5 hostfile; --no_ssh: srun started us on every node
    return (
        f'exec {runtime}"$1" -m launcher.signals deepspeed.launcher.runner --hostfile="$5" --no_ssh '
        '--node_rank="$SLURM_NODEID" --master_addr="$2" --master_port="$3" '
        f'--module launcher {command} "$4" train.resume=auto'
    )


def refuse_secrets(cfg: ExperimentConfig) -> None:
    leaked = find_secrets(cfg.to_dict())
    if leaked:
        raise ConfigError(
            f"{', '.join(leaked)} holds the value of a credential from the environment; "
            "credentials travel in the environment (the job inherits it), never in the config"
        )


def prepare_run(cfg: ExperimentConfig, overwrite: bool) -> None:
    """Check and claim output_dir now (as the job will), so a clash fails before sbatch is called."""
    from ngdiff.outputs import check_output_dir, write_output_dir

    refuse_secrets(cfg)
    check_output_dir(cfg, overwrite)
    write_output_dir(cfg, overwrite)


def prepare_sequence(cfg: ExperimentConfig, overwrite: bool) -> None:
    """Check and claim the sequence folder as `ngdiff sequence` will (every request's config, the folder and
    the request folders already there), then write the whole config where the job reads it."""
    import yaml

    from ngdiff.secret_formats import mask_values
    from ngdiff.sequence.plan import plan_sequence
    from ngdiff.sequence.runner import guard_folders
    from parallel.base import DistContext

    refuse_secrets(cfg)
    guard_folders(plan_sequence(cfg), DistContext(), overwrite, barrier=lambda: None)
    path = job_config(Path(cfg.output_dir), "sequence")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(mask_values(cfg.to_dict()), sort_keys=False))


def sbatch(script: Path, timeout: float = 60) -> str:
    """Submit `script`; return the job id, or raise with sbatch's own message."""
    exe = shutil.which("sbatch")
    if exe is None:
        raise SlurmError("sbatch not found on PATH: run this on a Slurm login node (or use --dry-run)")
    try:
        result = subprocess.run(
            [exe, "--parsable", str(script)], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise SlurmError(f"sbatch did not answer within {timeout:.0f} s; is slurmctld reachable?") from err
    if result.returncode != 0:
        message = (result.stderr.strip() or result.stdout.strip() or f"exit status {result.returncode}").strip()
        raise SlurmError(f"sbatch refused the job: {message}")
    job_id = result.stdout.strip().split(";")[0]  # --parsable prints `id` or `id;cluster`
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed no job id: {result.stdout.strip()!r}")
    return job_id


def submit(
    cfg: ExperimentConfig,
    opts: SubmitOptions,
    *,
    overwrite: bool = False,
    dry_run: bool = False,
    command: Command = "train",
) -> tuple[str | None, str]:
    """(job id or None for a dry run, the script). Everything cheap is checked before sbatch."""
    cfg.train.resume = "auto"  # a requeued job must continue, never restart
    if command == "sequence":
        from ngdiff.sequence.plan import plan_sequence

        plan_sequence(cfg)  # every request's config, also on a dry run
    processes = opts.nodes * opts.gpus_per_node
    if processes > 1 and cfg.parallel.backend == "single":
        raise ConfigError(
            f"parallel.backend=single runs one process, but {opts.nodes} node(s) x {opts.gpus_per_node} GPU(s) "
            f"start {processes}; choose a sharded backend (parallel.backend=ddp, fsdp or zero3)"
        )
    script = render_script(cfg, opts, command=command)
    if dry_run:
        return None, script
    if shutil.which("sbatch") is None:
        raise SlurmError("sbatch not found on PATH: run this on a Slurm login node (or use --dry-run)")
    (prepare_sequence if command == "sequence" else prepare_run)(cfg, overwrite)
    path = Path(cfg.output_dir) / "slurm" / SCRIPT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    path.chmod(0o755)
    return sbatch(path), script


# --------------------------------------------------------------------------- command line


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="slurm_action", required=True, metavar="ACTION")
    sub = actions.add_parser("submit", help="validate the config, write the sbatch script next to the run, submit it")
    sub.add_argument("items", nargs="+", metavar="[CONFIG] KEY=VALUE", help="YAML file, then dotted overrides")
    sub.add_argument("--nodes", type=int, required=True, help="nodes to allocate (one launcher per node)")
    sub.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node = processes per node")
    sub.add_argument("--partition", default="", help="Slurm partition")
    sub.add_argument("--time", default="", help="time limit, e.g. 04:00:00 (the job is warned before it)")
    sub.add_argument("--account", default="", help="Slurm account to charge")
    sub.add_argument("--launcher", choices=LAUNCHERS, default="torchrun", help="per-node launcher")
    sub.add_argument("--cpus-per-task", type=int, default=0, help="CPUs for each node's launcher and its workers")
    sub.add_argument("--signal-seconds", type=int, default=120, help="USR1 this long before preemption/time limit")
    sub.add_argument("--job-name", default="", help="default: ngdiff-<output folder name>")
    sub.add_argument("--python", default="", help="Python on the nodes (default: this one; `python` in a container)")
    sub.add_argument("--container-image", default="", help="run each node's launcher in this image (pyxis/enroot)")
    sub.add_argument("--apptainer", default="", help="run each node's launcher in this Apptainer .sif image")
    sub.add_argument(
        "--mount", action="append", default=[], help="extra SRC[:DST] bind mount in the container (repeatable)"
    )
    sub.add_argument(
        "--sequence",
        action="store_true",
        help="run `ngdiff sequence` (data.forget's sets as requests), one job for the whole sequence",
    )
    sub.add_argument("--overwrite", action="store_true", help="replace an earlier run in output_dir")
    sub.add_argument("--dry-run", action="store_true", help="print the script; submit nothing")


@subcommand("slurm", "submit a run to Slurm (requeued and resumed after preemption)", add_slurm_arguments)
def run_slurm(args: argparse.Namespace) -> int:
    opts = SubmitOptions(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        partition=args.partition,
        time=args.time,
        account=args.account,
        launcher=args.launcher,
        cpus_per_task=args.cpus_per_task,
        signal_seconds=args.signal_seconds,
        job_name=args.job_name,
        python=args.python,
        container_image=args.container_image,
        apptainer=args.apptainer,
        mounts=tuple(args.mount),
    )
    opts.validate()  # before the config: option mistakes are the cheapest to report
    config_path, overrides = split_config_and_overrides(args.items)
    cfg = load_config(config_path, overrides, single_run=not args.sequence)
    command: Command = "sequence" if args.sequence else "train"
    job_id, script = submit(cfg, opts, overwrite=args.overwrite, dry_run=args.dry_run, command=command)
    if job_id is None:
        print(script, end="")
        return 0
    print(job_id)
    where = Path(cfg.output_dir) / "slurm"
    print(f"submitted job {job_id}: script and logs in {where}", file=sys.stderr)
    return 0
