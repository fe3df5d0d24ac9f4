r"""RMU (Li et al., 2024, WMDP): steer one decoder layer's activations on the forget set toward a fixed
random direction, and keep them on the retain set where the frozen start had them.

As open-unlearning's src/trainer/unlearn/rmu.py (borrowed from centerforaisafety/wmdp rmu/unlearn.py),
configs/trainer/RMU.yaml: module_regex `model.layers.7`, steering_coeff 2, retain_loss_type EMBED_DIFF,
and all parameters trained (`trainable_params_regex: [.*]`, that config's default). `method.rmu_trainable`
names the ones to train instead (regexes on parameter names, as that key; WMDP's choice is
`model\.layers\.(5|6|7)\.mlp\.down_proj\.weight`): the others are frozen before the backend wraps
the model (`TrainOnly`), as rmu.py's create_optimizer leaves them out of the optimizer.

The activations are the layer's output, caught by a forward hook held only during this objective's own
forward: under FSDP2 and ZeRO-3 the hook sees the layer's ordinary (unsharded) output, and a gradient
checkpointing recompute in the backward does not fire it again. The layer is looked up by name suffix,
so `model.layers.7` also finds it inside DeepSpeed's engine (`module.`) or a PEFT model (`base_model.`).

Departure: the random direction is drawn from `train.seed` (uniform in [0, 1)^d, normalised, times c,
as that code's `torch.rand`) instead of the global RNG, so every rank and a resumed run steer toward the
same vector.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import nn

from ngdiff.errors import UserError
from ngdiff.objectives.core import IGNORE, Objective
from parallel.loading import EmptyModel, ModelBuilder

RMU_SEED_OFFSET = 7919  # the direction's generator is seeded with train.seed + this (not the data's seeds)


def module_named(model, name: str) -> nn.Module:
    """The one submodule called `name` or ending in `.name` (inside wrappers); a clear error otherwise."""
    root = getattr(model, "peft_model", model)  # AdaptersDisabled wraps the PEFT model
    found = [m for n, m in root.named_modules() if n == name or n.endswith("." + name)]
    if len(found) != 1:
        raise ValueError(f"method.rmu_layer={name!r} matches {len(found)} modules of the model; name one layer")
    return found[0]


@contextmanager
def caught_output(module: nn.Module):
    """Collects `module`'s forward outputs (the first element of a tuple) while the block runs."""
    caught: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        caught.append(output[0] if isinstance(output, tuple) else output)

    handle = module.register_forward_hook(hook)
    try:
        yield caught
    finally:
        handle.remove()


def layer_activations(model, batch: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    with caught_output(module_named(model, layer)) as caught:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return caught[0].float()


def per_sequence_mse(activations: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """rmu.py's compute_activation_loss before its batch mean: the mean over the hidden size of the squared
    difference, averaged over each row's labelled positions (unshifted labels, as there)."""
    mask = labels != IGNORE
    per_token = ((activations - target) ** 2).mean(-1)
    return (per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1)


class RMUForget(Objective):
    """RMU's forget loss: |h - c u|^2 per token (mean over the hidden size), averaged over each sequence's
    answer tokens and over sequences. Minimised there, so returned negated (the combiner ascends it)."""

    unit = "sequences"

    def __init__(self, layer: str = "model.layers.7", steering_coeff: float = 2.0, seed: int = 0):
        self.layer, self.steering_coeff, self.seed = layer, steering_coeff, seed
        self._direction: torch.Tensor | None = None

    def control_vector(self, dim: int) -> torch.Tensor:
        if self._direction is None or self._direction.numel() != dim:
            generator = torch.Generator().manual_seed(self.seed + RMU_SEED_OFFSET)
            random_vector = torch.rand(dim, generator=generator, dtype=torch.float32)
            self._direction = random_vector / random_vector.norm() * self.steering_coeff
        return self._direction

    def loss_sum(self, model, batch, reference=None):
        activations = layer_activations(model, batch, self.layer)
        target = self.control_vector(activations.shape[-1]).to(activations.device)
        return -per_sequence_mse(activations, target, batch["labels"]).sum()


class RMURetain(Objective):
    """RMU's retain loss (EMBED_DIFF): the same per-sequence squared distance between the layer's
    activations and the frozen start's, to descend."""

    needs_reference = True
    unit = "sequences"

    def __init__(self, layer: str = "model.layers.7"):
        self.layer = layer

    def loss_sum(self, model, batch, reference=None):
        if reference is None:
            raise ValueError("RMU's retain loss needs the frozen reference model")
        activations = layer_activations(model, batch, self.layer)
        with torch.no_grad():
            frozen = layer_activations(reference, batch, self.layer)
        return per_sequence_mse(activations, frozen, batch["labels"]).sum()


class TrainOnly:
    """A model thunk (what backends call, like ngdiff.lora.WithAdapters) that freezes every parameter whose
    name does not fully match one of `patterns` (RMU's trainable_params_regex), before the backend wraps the
    model: the backends train only parameters with requires_grad (FSDP2 shards the frozen ones too, ZeRO-3
    partitions them without optimizer state), so frozen ones get no gradient, no update, no stash."""

    def __init__(self, build, patterns: tuple[str, ...]):
        self.build, self.patterns = build, tuple(re.compile(p) for p in patterns)
        self.path = build.path if isinstance(build, ModelBuilder) else None
        self.trust_remote_code = getattr(build, "trust_remote_code", False)

    def __call__(self) -> nn.Module:
        return self.freeze(self.build())

    def build_empty(self) -> EmptyModel | None:
        """FSDP's shard-by-shard load from a meta model, where the wrapped builder offers one."""
        empty = self.build.build_empty() if isinstance(self.build, ModelBuilder) else None
        if empty is not None:
            self.freeze(empty.module)
        return empty

    def freeze(self, model: nn.Module) -> nn.Module:
        trained = 0
        for name, param in model.named_parameters():
            keep = any(p.fullmatch(name) for p in self.patterns)
            param.requires_grad_(keep)
            trained += keep
        if not trained:
            listed = ", ".join(p.pattern for p in self.patterns)
            raise UserError(f"method.rmu_trainable ({listed}) matches no parameter of the model")
        return model
