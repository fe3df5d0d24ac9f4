"""ZeRO-3's bucket and residency sizes: the one place that decides them, for the zero3 backend (which
writes them into the DeepSpeed config it builds) and for `ngdiff plan` (which predicts the memory they
take). Imports nothing heavy (no DeepSpeed, no torch), so planning a run stays cheap.

A size in the user's `zero_optimization` section is a number of elements, or `"auto"`. `"auto"` and an
absent key mean the same thing: sized to the model's hidden size h when it is known (`model_sized`),
else DeepSpeed's own default (`DEEPSPEED_DEFAULTS`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ngdiff.errors import UserError

SIZED_KEYS = (
    "reduce_bucket_size",
    "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold",
    "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
)

# DeepSpeed's defaults for those keys (`DeepSpeedZeroConfig`, verified on 0.19.8; a test compares them
# with the installed DeepSpeed's, so an upgrade that changes one fails there instead of here).
DEEPSPEED_DEFAULTS: dict[str, int] = {
    "reduce_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
}


class DeepSpeedConfigError(UserError):
    pass


def model_sized(hidden_size: int) -> dict[str, int]:
    """The sizes for a model of hidden size h.

    The first three as transformers' DeepSpeed integration fills "auto" (`trainer_config_finalize` in
    transformers/integrations/deepspeed.py): a reduce bucket of h^2 elements, not DeepSpeed's 5e8, which
    holds every full gradient of a smaller model until the backward ends. The last two are ngdiff's:
    DeepSpeed's 1e9 keeps every parameter gathered in the forward until its reuse in the backward, i.e.
    the whole model on every rank; 10 h^2 (about one decoder block) releases them as FSDP does."""
    square = hidden_size * hidden_size
    return {
        "reduce_bucket_size": square,
        "stage3_prefetch_bucket_size": int(0.9 * square),
        "stage3_param_persistence_threshold": 10 * hidden_size,
        "stage3_max_live_parameters": 10 * square,
        "stage3_max_reuse_distance": 10 * square,
    }


def read_user_config(path: str) -> dict[str, Any]:
    """The user's DeepSpeed JSON (`parallel.deepspeed_config`), or {} without one; a clear error when it
    is not a JSON object."""
    if not path:
        return {}
    try:
        user = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DeepSpeedConfigError(f"parallel.deepspeed_config {path}: not a readable JSON file: {err}") from None
    if not isinstance(user, dict):
        raise DeepSpeedConfigError(
            f"parallel.deepspeed_config {path}: expected a JSON object, got {type(user).__name__}"
        )
    return user


def zero_section(user: dict[str, Any], source: str) -> dict[str, Any]:
    """The user's `zero_optimization` section (created empty where absent); a clear error where it is not
    a JSON object."""
    zero = user.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise DeepSpeedConfigError(f"{source}: zero_optimization must be a JSON object, got {zero!r}")
    return zero


def explicit_sizes(zero: dict[str, Any], source: str) -> dict[str, int]:
    """The sizes the user set to a number (not "auto", not absent), as ints; a clear error for anything
    else. JSON writes 5e8 as a float: an integral float is accepted."""
    out: dict[str, int] = {}
    for key in SIZED_KEYS:
        value = zero.get(key, "auto")
        if value == "auto":
            continue
        integral = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())
        if isinstance(value, bool) or not integral or value < 0:
            raise DeepSpeedConfigError(
                f'{source}: zero_optimization.{key}={value!r}: give a whole number of elements (>= 0) or "auto"'
            )
        out[key] = int(value)
    return out


def zero_sizes(
    zero: dict[str, Any], hidden_size: int | None, source: str = "parallel.deepspeed_config"
) -> dict[str, int]:
    """Every sized key as DeepSpeed will run with it: the user's number, else (for "auto" or an absent
    key) `model_sized(hidden_size)`, else DeepSpeed's default."""
    fallback = model_sized(hidden_size) if hidden_size else DEEPSPEED_DEFAULTS
    return {**fallback, **explicit_sizes(zero, source)}


def hidden_size_of(hf_config: Any) -> int | None:
    """The hidden size that sizes the buckets, from a Hugging Face config (its text config where it has
    one; the largest of `hidden_sizes` for models that list several)."""
    config = getattr(hf_config, "text_config", None) or hf_config
    sizes = getattr(config, "hidden_sizes", None)
    return getattr(config, "hidden_size", None) or (max(sizes) if sizes else None)
