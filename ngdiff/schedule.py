"""The learning-rate schedule: a multiplier on the lr at step t, a pure function of t.

Matches Hugging Face's `get_linear_schedule_with_warmup` / `get_constant_schedule_with_warmup`, which
TOFU (forget.py: `warmup_steps=max(1, steps_per_epoch)`, the default linear schedule) and open-unlearning
(src/trainer/__init__.py: `warmup_epochs` -> `warmup_steps`) run through the HF Trainer: during warmup the
factor is t / W (so the first step, t = 0, moves at lr 0, as in HF), then 1 (constant) or a linear decay
to 0 at the last step. The trainer's step index drives it, so a resumed run and every rank get the same
factor with no state to save.
"""

from __future__ import annotations

SCHEDULES = ("constant", "linear")


def lr_factor(schedule: str, step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base lr at 0-based optimizer step `step` of `total_steps`."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    raise ValueError(f"unknown optim.schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")


def warmup_steps_of(warmup_steps: int, warmup_epochs: float, steps_per_epoch: int) -> int:
    """Warmup in steps, given directly or in epochs over the forget set (floored, as open-unlearning)."""
    return warmup_steps if warmup_steps > 0 else int(warmup_epochs * steps_per_epoch)
