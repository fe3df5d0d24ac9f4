"""LoRA adapters (peft) on the trained model, and the base model with adapters disabled as NPO / KL's reference.

With LoRA only the adapter matrices require gradients, so every backend's trainable-parameter list (and with
it the per-task gradients, the Gram sums, the retain-gradient stash and AutoLR's copy) covers just them. The
frozen reference of NPO / KL is the same module run under `disable_adapter()`: no second copy of the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ngdiff.errors import UserError


class LoraTargetError(UserError):
    """`model.lora.target_modules` names no module of the model."""


def peft_lora_config(lora_cfg) -> Any:
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
        task_type=TaskType.CAUSAL_LM,
    )


def attach_adapters(model: nn.Module, lora_cfg, seed: int) -> nn.Module:
    """`model` wrapped by peft with fresh adapters, the base frozen. The adapters' random initialisation is
    drawn from `seed` in a forked RNG: every rank (and a resumed run) builds the same adapters, and the
    global RNG stream is the same as without LoRA."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, peft_lora_config(lora_cfg))
        except ValueError as err:
            if "target" not in str(err).lower():
                raise
            raise LoraTargetError(f"model.lora.target_modules={list(lora_cfg.target_modules)}: {err}") from None


def with_adapters(build: Callable[[], nn.Module], lora_cfg, seed: int) -> Callable[[], nn.Module]:
    """A model thunk (what backends call) that builds the base with `build`, then attaches adapters."""

    def run() -> nn.Module:
        return attach_adapters(build(), lora_cfg, seed)

    return run


class AdaptersDisabled:
    """The reference model of NPO / SimNPO / KL for a LoRA run: the trained module's forward with its
    adapters switched off, i.e. the frozen base. Objectives call it under `no_grad`; under FSDP the forward
    gathers the sharded base weights as usual."""

    def __init__(self, peft_model: nn.Module):
        self.peft_model = peft_model

    def __call__(self, **inputs: Any) -> Any:
        with self.peft_model.disable_adapter():
            return self.peft_model(**inputs)


def has_adapters(module: nn.Module) -> bool:
    return hasattr(module, "peft_config") and hasattr(module, "disable_adapter")
