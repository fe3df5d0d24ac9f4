"""LoRA adapters (peft) on the trained model, and the base model with adapters disabled as NPO / KL's reference.

With LoRA only the adapter matrices require gradients, so every backend's trainable-parameter list (and with
it the per-task gradients, the Gram sums, the retain-gradient stash and AutoLR's copy) covers just them. The
frozen reference of NPO / KL is the same module run under `disable_adapter()`: no second copy of the model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ngdiff.errors import UserError
from ngdiff.modeling import model_factory


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


class WithAdapters:
    """A model thunk (what backends call) that builds the base with `build`, then attaches adapters. It
    exposes the base's `path` (ZeRO-3 sizes its buckets from its config) but no `build_empty`: FSDP builds
    the model with adapters whole, then shards it (the adapters are not in the checkpoint)."""

    def __init__(self, build: Callable[[], nn.Module], lora_cfg, seed: int):
        self.build, self.lora_cfg, self.seed = build, lora_cfg, seed
        self.path = getattr(build, "path", None)
        self.trust_remote_code = getattr(build, "trust_remote_code", False)

    def __call__(self) -> nn.Module:
        return attach_adapters(self.build(), self.lora_cfg, self.seed)


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


ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_folder(path: str | Path) -> bool:
    """A PEFT adapter folder (what `export.lora=adapter` writes) rather than a whole model."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class AdapterSource:
    """A model thunk for a PEFT adapter folder: its base model (the adapter config's
    `base_model_name_or_path`) with the adapter merged in, as a plain Hugging Face model."""

    path: str
    trust_remote_code: bool = False

    def base_path(self) -> str:
        base = json.loads((Path(self.path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if not base:
            raise UserError(f"{self.path}/{ADAPTER_CONFIG}: no base_model_name_or_path to load the adapter onto")
        return base

    def __call__(self) -> nn.Module:
        from peft import PeftModel

        base = model_factory(self.base_path(), self.trust_remote_code)()
        return PeftModel.from_pretrained(base, self.path).merge_and_unload()
