"""transformers internals: building a model under ZeRO-3's zero.Init from `from_pretrained`, and a model's
own initialiser for the buffers a checkpoint does not store."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from parallel.compat import CompatError, available, register, resolve

TRANSFORMERS = {"transformers": "5.25.0"}

ZERO3_INIT = register(
    "transformers.zero3_init",
    targets=(
        "transformers.integrations:HfDeepSpeedConfig",
        "transformers.integrations.deepspeed:is_deepspeed_zero3_enabled",
    ),
    why="a live HfDeepSpeedConfig (held through a module-level weak reference) makes from_pretrained build "
    "the model under zero.Init, partitioned, and load it on rank 0 only",
    verified=TRANSFORMERS,
)
INIT_WEIGHTS = register(
    "transformers.init_weights",
    targets=("transformers:PreTrainedModel._init_weights",),
    why="after a meta-device build, the non-persistent buffers (rotary tables) are recomputed by the "
    "model's own initialiser",
    verified=TRANSFORMERS,
)


def zero3_init(ds_config: dict[str, Any]) -> Any:
    """Make the next `from_pretrained` / `from_config` build under ZeRO-3's zero.Init with `ds_config`. The
    returned object must be kept alive for as long as that should hold (transformers keeps only a weak
    reference); a CompatError where transformers does not take it up."""
    available(ZERO3_INIT.name)
    handle = resolve(ZERO3_INIT.targets[0])(ds_config)
    if not resolve(ZERO3_INIT.targets[1])():
        raise CompatError(
            f"compat patch {ZERO3_INIT.name}: transformers did not enable ZeRO-3 from HfDeepSpeedConfig; "
            "models would be built whole on every rank"
        )
    return handle


def init_weights_of(model: Any) -> Callable[[Any], None] | None:
    """The model's own per-module initialiser (Hugging Face's `_init_weights`), or None where it has none."""
    available(INIT_WEIGHTS.name)
    return getattr(model, "_init_weights", None)


def rebuild_rotary(module: Any) -> bool:
    """Recompute a rotary embedding's frequency table where `_init_weights` does not (transformers 4.x).

    transformers 5's `_init_weights` recomputes `inv_freq`; 4.x's leaves it as `to_empty` left it (garbage:
    NaN losses or last-digit drift, seen with 4.56). 4.x's rotary modules keep their rope function on the
    instance (`rope_init_fn`) and alias `original_inv_freq` to the table. True where it recomputed."""
    rope = getattr(module, "rope_init_fn", None)
    table = getattr(module, "inv_freq", None)
    if rope is None or table is None or "original_inv_freq" in module._buffers:  # a buffer: 5's, rebuilt
        return False
    inv_freq, _ = rope(module.config, table.device)
    table.copy_(inv_freq)
    module.original_inv_freq = table  # 4.x's alias, still the meta tensor after `to_empty`
    return True
