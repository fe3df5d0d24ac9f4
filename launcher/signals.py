"""Preemption: USR1 or TERM asks the trainer to finish its step, checkpoint, and stop.

The flag travels in the step's all-reduce, so all ranks stop after the same step even when the
signal reaches them at different times. Under Slurm the job is then requeued and resumes by itself.

Under Slurm, `scancel --signal` and `--signal=USR1@T` reach every process of a job step (the
proctrack plugins follow the process tree, also into the new sessions torchrun gives its workers),
so the workers get the signal themselves. The launcher in between (torchrun, deepspeed) must not
die of it (USR1's default action): the sbatch script runs it as
`python -m launcher.signals torch.distributed.run ARGS...`, which ignores USR1 and then runs the
launcher module; the workers inherit the ignore until `install_stop_handlers` replaces it. Being a
Python module, this works the same inside a container (pyxis, Apptainer) as outside.
"""

from __future__ import annotations

import logging
import os
import runpy
import shutil
import signal
import subprocess
import sys

log = logging.getLogger("ngdiff.signals")
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def install_stop_handlers(trainer) -> None:
    def request_stop(signum, frame):
        if not trainer.stop_requested:
            log.warning("received %s: checkpointing after the current step", signal.Signals(signum).name)
        trainer.stop_requested = True

    for sig in STOP_SIGNALS:
        signal.signal(sig, request_stop)


def requeue_if_slurm() -> bool:
    """`scontrol requeue $SLURM_JOB_ID` when running inside a Slurm job; True if requeued."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        log.warning("stopped after a checkpoint; resume with train.resume=auto")
        return False
    if shutil.which("scontrol") is None:
        log.warning("stopped after a checkpoint; scontrol not found, so job %s is not requeued", job)
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False, timeout=60)
    except subprocess.TimeoutExpired:
        log.error("scontrol requeue %s timed out; resubmit the job to resume from its checkpoint", job)
        return False
    if result.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job, (result.stderr or result.stdout).strip())
        return False
    log.warning("requeued Slurm job %s; it resumes from the checkpoint", job)
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
