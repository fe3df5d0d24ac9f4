"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over ranks on dim 0.

Each decoder block is its own unit (all-gathered just before it runs, freed after), then the root.
Gradients are DTensors; `to_local()` is a view of this rank's shard, so the trainer's in-place
combination writes straight into what the optimizer steps with. For accumulation, gradient
reduction is off until the last micro-batch: one reduce-scatter per task per step.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from parallel.base import Backend
from parallel.optim import build_optimizer, grads_of, set_lr

log = logging.getLogger("ngdiff.parallel")


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: HF models name their classes in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        log.warning("no decoder blocks found (%s); sharding the model as one unit", type(model).__name__)
    return blocks


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class FSDPBackend(Backend):
    name = "fsdp"

    def _shard(self, model: nn.Module, mixed: bool) -> nn.Module:
        mesh = init_device_mesh(self.ctx.device.type, (self.ctx.world_size,))
        kwargs = {"mesh": mesh}
        if mixed:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if self.parallel_cfg.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for block in decoder_blocks(model):
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model

    def prepare(self, build_model, gradient_checkpointing=False):
        model = build_model()  # fp32 master weights; bf16 only in the all-gathered compute copies
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not self.parallel_cfg.cpu_offload:
            model.to(self.ctx.device)
        self.model = self._shard(model, mixed=self.precision == "bf16")
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, self.optim_cfg)
        return self.model

    def prepare_frozen(self, build_model):
        model = build_model()
        model.requires_grad_(False)
        if not self.parallel_cfg.cpu_offload:
            model.to(self.ctx.device)
        return self._shard(model, mixed=self.precision == "bf16").eval()

    def autocast(self):
        # the MixedPrecisionPolicy casts parameters; autocast on top would only add casts
        return torch.autocast(self.ctx.device.type, enabled=False)

    def backward(self, loss, *, last_micro_batch):
        self.model.set_requires_gradient_sync(last_micro_batch)
        loss.backward()

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def local_grads(self):
        return [local(g) for g in grads_of(self.params)]

    def local_params(self):
        return [local(p.data) for p in self.params]

    def params_changed(self):
        # The root keeps its parameters gathered after a forward (FSDP2 skips its reshard, expecting the
        # backward): free those stale copies so the next forward gathers the edited shards.
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def step(self, lr):
        set_lr(self.optimizer, lr)
        self.optimizer.step()

    # torch.distributed.checkpoint: each rank writes and reads its own shards (any world size can load)
    def save_checkpoint(self, directory: Path):
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(directory))

    def load_checkpoint(self, directory: Path):
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(directory))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    def full_state_dict(self):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False)
        state = get_model_state_dict(self.model, options=options)
        if not self.ctx.is_main:  # the full dict lands on rank 0 only; tests compare there
            return state
        return {k: v.detach().clone() for k, v in state.items()}

    def export_pretrained(self, directory: Path, tokenizer=None):
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.ctx.is_main:
            self.model.save_pretrained(directory, state_dict=state, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)
