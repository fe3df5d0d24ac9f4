"""Preemption: USR1 or TERM asks the trainer to finish its step, checkpoint, and stop.

The flag travels in the step's all-reduce, so all ranks stop after the same step even when the
signal reaches them at different times. Under Slurm the job is then requeued and resumes by itself.

Under Slurm, `scancel --signal` and `--signal=USR1@T` reach every process of a job step (the
proctrack plugins follow the process tree, also into the new sessions torchrun gives its workers),
so the workers get the signal themselves. The launcher in between (torchrun, deepspeed) must not
die of it: the sbatch script starts it with USR1 ignored, which the workers inherit until
`install_stop_handlers` replaces it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess

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
