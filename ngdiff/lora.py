"""LoRA adapters (peft) on the trained model, and the base model with adapters disabled as NPO / KL's reference.

With LoRA only the adapter matrices require gradients, so every backend's trainable-parameter list (and with
it the per-task gradients, the Gram sums, the retain-gradient stash and AutoLR's copy) covers just them. The
frozen reference of NPO / KL is the same module run under `disable_adapter()`: no second copy of the model.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ngdiff.errors import UserError
from ngdiff.modeling import model_factory
from parallel.loading import EmptyModel, ModelBuilder, same_name


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


PEFT_PREFIX = "base_model.model."


def base_name(peft_name: str) -> str:
    """The plain model's (and its checkpoint's) name of a peft model's tensor: peft nests the model under
    `base_model.model.` and an adapted layer's own weight under `base_layer`."""
    return peft_name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def attach_adapters_empty(model: nn.Module, lora_cfg, seed: int) -> EmptyModel:
    """`attach_adapters` on a base built on `meta`: the same adapters, from the same draws, as on the loaded
    base. peft creates each adapter on its base layer's device, so during the injection every (untied)
    Linear weight stands in as a CPU tensor of one element broadcast to its shape (no memory), then goes
    back to `meta`; the adapters' values are kept whole as the initial values, and the model is left all
    on `meta`, its base tensors named as in the checkpoint by `base_name`."""
    uses = Counter(id(param) for _, param in model.named_parameters(remove_duplicate=False))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.is_meta and uses[id(m.weight)] == 1]
    for linear in linears:
        w = linear.weight
        linear.weight = nn.Parameter(torch.zeros((), dtype=w.dtype).expand(w.shape), requires_grad=w.requires_grad)
    try:
        peft_model = attach_adapters(model, lora_cfg, seed)
    finally:
        for linear in linears:  # frozen by peft meanwhile: keep its requires_grad
            w = linear.weight
            linear.weight = nn.Parameter(torch.empty_like(w, device="meta"), requires_grad=w.requires_grad)
    initial = {name: t.detach().clone() for name, t in peft_model.state_dict().items() if not t.is_meta}
    peft_model.to("meta")
    return EmptyModel(peft_model, checkpoint_name=base_name, initial=initial)


class WithAdapters:
    """A model thunk (what backends call) that builds the base with `build`, then attaches adapters. It
    exposes the base's `path` (ZeRO-3 sizes its buckets from its config) and, where the base builder can
    build on `meta`, `build_empty`: FSDP then loads only each rank's rows of the base from the checkpoint
    and of the adapters from their initial values, which equal those of the whole build."""

    def __init__(self, build: Callable[[], nn.Module], lora_cfg, seed: int):
        self.build, self.lora_cfg, self.seed = build, lora_cfg, seed
        self.path = build.path if isinstance(build, ModelBuilder) else None
        self.trust_remote_code = getattr(build, "trust_remote_code", False)

    def __call__(self) -> nn.Module:
        return attach_adapters(self.build(), self.lora_cfg, self.seed)

    def build_empty(self) -> EmptyModel | None:
        base = self.build.build_empty() if isinstance(self.build, ModelBuilder) else None
        if base is None:
            return None
        if base.initial or base.checkpoint_name is not same_name:
            return None  # a base with renames or initial values of its own: not composed with peft's here
        return attach_adapters_empty(base.module, self.lora_cfg, self.seed)


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
