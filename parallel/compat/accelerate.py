"""accelerate internals: its DeepSpeed availability check, made not to import DeepSpeed."""

from __future__ import annotations

import sys

from parallel.compat import available, register, resolve

DEFER_DEEPSPEED = register(
    "accelerate.defer_deepspeed_import",
    targets=("accelerate.utils.other:is_deepspeed_available",),
    why="transformers' save_pretrained unwraps the model with accelerate's extract_model_from_parallel, "
    "which imports DeepSpeed whenever it is installed: seconds and a warning in runs that never use it",
    verified={"accelerate": "1.16.0"},
    without="saving a model imports DeepSpeed (seconds, and a 'Setting accelerator to CPU' warning)",
)


def defer_deepspeed_import() -> None:
    """Import DeepSpeed only for the zero3 backend or its launcher.

    accelerate asks `is_deepspeed_available()` (which imports it) to test `isinstance(model, DeepSpeedEngine)`.
    A model can only be a DeepSpeedEngine once deepspeed has been imported, so asking `sys.modules` gives
    the same answer without the import. Without accelerate there is nothing to do."""
    try:
        import accelerate.utils.other  # noqa: F401
    except ImportError:  # no accelerate: transformers unwraps without it
        return
    if available(DEFER_DEEPSPEED.name):
        resolve("accelerate.utils.other").is_deepspeed_available = lambda: "deepspeed" in sys.modules
