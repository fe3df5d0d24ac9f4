"""One process, the whole model: the reference every sharded backend must equal."""

from __future__ import annotations

from pathlib import Path

import torch

from parallel.base import Backend, check_loaded_keys, frozen_names
from parallel.export import everything, exported_names
from parallel.optim import build_optimizer, grads_of, set_lr
from parallel.safe_load import load_weights_only


class SingleBackend(Backend):
    """The whole model and its gradient on this process. `module` is the plain model; `model` is what
    forward passes call (the same object here, a wrapper in subclasses such as DDP)."""

    name = "single"
    releases_grads = True  # zero_grad drops the tensors: a stash may keep them

    def prepare(self, build_model, gradient_checkpointing=False):
        module = build_model().to(self.ctx.device)
        if gradient_checkpointing:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        module.train()
        self.module = self.model = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, self.optim_cfg)
        return self.model

    def prepare_frozen(self, build_model):
        model = build_model().to(self.ctx.device).eval()
        model.requires_grad_(False)
        return model

    def backward(self, loss, *, last_micro_batch):
        loss.backward()

    def zero_grad(self):
        # drop the tensors: the next backward writes fresh gradients instead of adding into zeroed ones
        for p in self.params:
            p.grad = None

    def local_grads(self):
        return grads_of(self.params)

    def local_params(self):
        return [p.data for p in self.params]

    def step(self, lr):
        set_lr(self.optimizer, lr)
        self.optimizer.step()

    def save_checkpoint(self, directory: Path):
        # frozen parameters (a LoRA run's base model) are rebuilt from model.path: only what trains is saved
        frozen = frozen_names(self.module)
        model_state = {k: v for k, v in self.module.state_dict().items() if k not in frozen}
        torch.save({"model": model_state, "optimizer": self.optimizer.state_dict()}, directory / "model_optimizer.pt")

    def load_checkpoint(self, directory: Path):
        state = load_weights_only(directory / "model_optimizer.pt", map_location=self.ctx.device)
        check_loaded_keys(directory, self.module, *self.module.load_state_dict(state["model"], strict=False))
        self.optimizer.load_state_dict(state["optimizer"])

    def full_tensors(self, names=everything):
        for name, tensor in exported_names(self.module):
            if names(name):
                yield name, tensor.detach().cpu()
