"""Preemption: USR1 or TERM asks the trainer to finish its step, checkpoint, and stop; so does a
first Ctrl-C (INT), which is never requeued, and a second Ctrl-C aborts at once, as Python does.

The flag travels in the step's all-reduce, so all ranks stop after the same step even when the
signal reaches them at different times. Under Slurm the job is then requeued and resumes by itself.

Under Slurm, `scancel --signal` and `--signal=USR1@T` reach every process of a job step (the
proctrack plugins follow the process tree, also into the new sessions torchrun gives its workers),
so the workers get the signal themselves. The launcher in between (torchrun, deepspeed) must not
die of it (USR1's default action): the sbatch script runs it as
`python -m launcher.signals torch.distributed.run ARGS...`, which ignores USR1 and then runs the
launcher module; the workers inherit the ignore until `install_stop_handlers` replaces it. Being a
Python module, this works the same inside a container (pyxis, Apptainer) as outside.

A Ctrl-C under torchrun reaches torchrun alone (its workers run in their own sessions); torchrun
sends INT to every worker, which checkpoint as above, and kills them with KILL after
`--shutdown-timeout` seconds (default 30, or TORCH_ELASTIC_SHUTDOWN_TIMEOUT): raise it when a
step plus a checkpoint take longer. torchrun itself then exits non-zero with its own traceback.
"""

from __future__ import annotations

import logging
import os
import runpy
import shlex
import shutil
import signal
import subprocess
import sys

log = logging.getLogger("ngdiff.signals")
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)  # preemption: requeued under Slurm
_interrupted = False  # a Ctrl-C stopped this run: the user's choice, so not requeued
_previous_sigint = None  # Ctrl-C's handler before `install_stop_handlers`


def install_stop_handlers(trainer) -> None:
    global _interrupted, _previous_sigint
    _interrupted = False

    def request_stop(signum, frame):
        if not trainer.stop_requested:
            log.warning("received %s: checkpointing after the current step", signal.Signals(signum).name)
        trainer.stop_requested = True

    def interrupt(signum, frame):
        global _interrupted
        _interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C aborts at once
        if not trainer.stop_requested:
            log.warning("received SIGINT: checkpointing after the current step (Ctrl-C again aborts at once)")
        trainer.stop_requested = True

    for sig in STOP_SIGNALS:
        signal.signal(sig, request_stop)
    _previous_sigint = signal.signal(signal.SIGINT, interrupt)


def restore_interrupt() -> None:
    """Ctrl-C as before `install_stop_handlers` (a process may go on after its run, e.g. tests)."""
    global _previous_sigint
    if _previous_sigint is not None:
        signal.signal(signal.SIGINT, _previous_sigint)
        _previous_sigint = None


def resume_hint(argv: list[str] | None = None) -> str:
    """How to continue this run: `ngdiff train` (or `ngdiff sequence`) as run, with train.resume=auto and
    without --overwrite."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # a launcher's command (torchrun's) is not ours to know
    if "LOCAL_RANK" in os.environ or not argv or argv[0] not in ("train", "sequence"):
        return "resume with train.resume=auto added to the same command"
    kept = [a for a in argv if a != "--overwrite" and not a.startswith("train.resume=")]
    return "resume with train.resume=auto: ngdiff " + shlex.join([*kept, "train.resume=auto"])


def requeue_if_slurm() -> bool:
    """`scontrol requeue $SLURM_JOB_ID` when running inside a Slurm job (not after a Ctrl-C); True if requeued."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or _interrupted:
        log.warning("stopped after a checkpoint; %s", resume_hint())
        return False
    if shutil.which("scontrol") is None:
        log.warning("stopped after a checkpoint; scontrol not found, so job %s is not requeued", job)
        return False
    # said before the call: the requeue kills this job's tasks, and Slurm's I/O forwarding can drop
    # whatever a task prints after it (seen on 2-node jobs)
    log.warning("requeueing Slurm job %s; it resumes from the checkpoint", job)
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False, timeout=60)
    except subprocess.TimeoutExpired:
        log.error("scontrol requeue %s timed out; resubmit the job to resume from its checkpoint", job)
        return False
    if result.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job, (result.stderr or result.stdout).strip())
        return False
    return True


def run_module_ignoring_usr1(argv: list[str]) -> None:
    """Run the launcher module `argv[0]` as `python -m` would, with USR1 ignored (see the module doc)."""
    if not argv:
        raise SystemExit("usage: python -m launcher.signals MODULE [ARGS...]  (e.g. torch.distributed.run)")
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    sys.argv = list(argv)
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    run_module_ignoring_usr1(sys.argv[1:])
