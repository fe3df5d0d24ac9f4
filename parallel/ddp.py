"""DistributedDataParallel: every rank holds the whole model and, after backward, the averaged gradient.

Gradients are replicated, so each rank adds only a 1/world_size slice of them to the Gram partial
sums (`parallel.grads.own_slice`): the all-reduce then counts every term exactly once, with half the dot
products per rank instead of all of them twice. Everything else is the single-process backend.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from pathlib import Path

from torch.nn.parallel import DistributedDataParallel

from parallel.single import SingleBackend

# torch >= 2.13 renamed the switch (and warns on the old name); older releases know only the old one
NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


class DDPBackend(SingleBackend):
    name = "ddp"
    replicates_grads = True  # parallel/grads.py adds a 1/world_size slice per rank to the Gram sums

    def prepare(self, build_model, gradient_checkpointing=False):
        super().prepare(build_model, gradient_checkpointing)
        device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        # the model's buffers (rotary tables) are constants, identical on every rank: no per-forward sync
        self.model = DistributedDataParallel(self.module, device_ids=device_ids, **NO_BUFFER_SYNC)
        return self.model

    def micro_batch(self, *, last):
        # no_sync must cover the forward too: DDP arms its reducer there
        return nullcontext() if last else self.model.no_sync()

    def save_checkpoint(self, directory: Path):
        if self.ctx.is_main:  # replicated state: rank 0 writes one file, every rank reads it
            super().save_checkpoint(directory)
