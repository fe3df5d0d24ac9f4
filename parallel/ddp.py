"""DistributedDataParallel: every rank holds the whole model and, after backward, the averaged gradient.

Gradients are replicated, so each rank adds only a 1/world_size slice of them to the Gram partial
sums (`inner_product_views`): the all-reduce then counts every term exactly once, with half the dot
products per rank instead of all of them twice.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from parallel.base import Backend
from parallel.optim import build_optimizer, set_lr


class DDPBackend(Backend):
    name = "ddp"

    def prepare(self, build_model, gradient_checkpointing=False):
        module = build_model().to(self.ctx.device)
        if gradient_checkpointing:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        module.train()
        self.module = module
        device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        # broadcast_buffers off: the model's buffers (rotary tables) are constants, identical on every rank
        self.model = DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, self.optim_cfg)
        return self.model

    def prepare_frozen(self, build_model):
        model = build_model().to(self.ctx.device).eval()
        model.requires_grad_(False)
        return model

    def micro_batch(self, *, last):
        # no_sync must cover the forward too: DDP arms its reducer there
        return nullcontext() if last else self.model.no_sync()

    def backward(self, loss, *, last_micro_batch):
        loss.backward()

    def zero_grad(self):
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()

    def local_grads(self):
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self.params]

    def inner_product_views(self, tensors):
        rank, world = self.ctx.rank, self.ctx.world_size
        return [t.reshape(-1).tensor_split(world)[rank] for t in tensors]

    def local_params(self):
        return [p.data for p in self.params]

    def step(self, lr):
        set_lr(self.optimizer, lr)
        self.optimizer.step()

    # Replicated state: rank 0 writes one file, every rank reads it.
    def save_checkpoint(self, directory: Path):
        if self.ctx.is_main:
            state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
            torch.save(state, directory / "model_optimizer.pt")

    def load_checkpoint(self, directory: Path):
        state = torch.load(directory / "model_optimizer.pt", map_location=self.ctx.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def full_state_dict(self):
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def export_pretrained(self, directory: Path, tokenizer=None):
        if self.ctx.is_main:
            self.module.save_pretrained(directory, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)
