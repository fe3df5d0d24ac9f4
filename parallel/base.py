"""The one small interface every sharding engine implements.

The trainer speaks only this: it never knows which engine runs, and the engines never know which
unlearning method runs. "Local" tensors are this rank's shard (the whole tensor on one process or
under DDP); the gradient algebra on them lives in `parallel/grads.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from parallel.compat.accelerate import defer_deepspeed_import
from parallel.export import everything

if TYPE_CHECKING:
    from ngdiff.config import OptimConfig, ParallelConfig


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def frozen_names(module: nn.Module) -> set[str]:
    """Parameters that do not train (a LoRA run's base model): checkpoints leave them out, since the run
    rebuilds them from model.path."""
    return {name for name, p in module.named_parameters() if not p.requires_grad}


def check_loaded_keys(directory: Path, module: nn.Module, missing: Iterable[str], unexpected: Iterable[str]) -> None:
    """A checkpoint may lack only frozen parameters; anything else means it belongs to another model."""
    missing, unexpected = set(missing) - frozen_names(module), list(unexpected)
    if missing or unexpected:
        raise RuntimeError(
            f"{directory}: checkpoint does not match the model (missing {sorted(missing)[:3]}, "
            f"unexpected {unexpected[:3]})"
        )


class Backend(ABC):
    """Wraps a model and its optimizer for one engine."""

    name: str = "base"
    # parameters live in per-rank shards: every forward pass is a collective, so ranks must run equally many
    shards_parameters: bool = False
    # the gradient algebra's questions (parallel/grads.py): every rank holds the whole reduced gradient
    # (DDP), and `zero_grad` lets go of the gradient tensors (a stash may keep them without a copy)
    replicates_grads: bool = False
    releases_grads: bool = False

    def __init__(self, ctx: DistContext, parallel_cfg: ParallelConfig, optim_cfg: OptimConfig, precision: str):
        defer_deepspeed_import()
        self.ctx = ctx
        self.parallel_cfg = parallel_cfg
        self.optim_cfg = optim_cfg
        self.precision = precision
        self.model: nn.Module | None = None  # what forward passes are called on
        self.module: nn.Module | None = None  # the plain (Hugging Face) model inside: what is exported
        self.batch_layout: tuple[int, int] = (1, 1)  # (micro-batch per rank, accumulation steps)

    def set_batch_layout(self, micro_batch: int, accumulation_steps: int) -> None:
        """Per-rank micro-batch size and accumulation steps, for engines that account batches
        themselves (DeepSpeed checks its own batch keys). Called before `prepare`."""
        self.batch_layout = (micro_batch, accumulation_steps)

    @classmethod
    def planned_buffers(cls, parallel_cfg: ParallelConfig | None, hidden_size: int | None) -> dict[str, int]:
        """The engine's own buffer sizes, in elements, exactly as `prepare` would configure them for a model of
        hidden size `hidden_size` (None: unknown) under `parallel_cfg` (None: no user settings), so that
        `ngdiff plan` predicts with the engine's numbers instead of keeping its own copy of them. Keys:
        `reduce_bucket` (gradient elements reduced at once) and `max_live` (gathered parameter elements kept
        for reuse); engines that size no such buffers return {}."""
        return {}

    # --- set-up --------------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, build_model: Callable[[], nn.Module], gradient_checkpointing: bool = False) -> nn.Module:
        """Build (via `build_model`, so big models can be built sharded: a `parallel.loading.ModelBuilder` can
        also build on `meta`), wrap, and create the optimizer."""

    @abstractmethod
    def prepare_frozen(self, build_model: Callable[[], nn.Module]) -> nn.Module:
        """A frozen model for forward passes only (the reference model of NPO / KL), sharded alike."""

    # --- forward / backward ----------------------------------------------------------------------
    def autocast(self):
        """Context for forward passes: bf16 autocast where the engine does not cast by itself."""
        enabled = self.precision == "bf16"
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=enabled)

    @property
    def gradient_scale(self) -> float:
        """Factor on a loss so that the engine's gradient equals the gradient of that loss summed over
        ranks: engines average over data-parallel ranks, so they need `world_size`."""
        return float(self.ctx.world_size)

    def micro_batch(self, *, last: bool) -> AbstractContextManager:
        """Context around one micro-batch's forward *and* backward. DDP must know before the forward
        whether this backward synchronises (`no_sync`); engines that decide in `backward` ignore it."""
        return nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor, *, last_micro_batch: bool) -> None:
        """Accumulate d(loss)/d(params) into the local gradients; reduce across ranks once
        `last_micro_batch` is True."""

    @abstractmethod
    def zero_grad(self) -> None: ...

    @abstractmethod
    def local_grads(self) -> list[torch.Tensor]:
        """This rank's (reduced) gradient shards, fp32. Writes go back with `set_local_grads`; the step's
        algebra on them (stash, Gram sums, combination) is `parallel.grads`'s."""

    def set_local_grads(self, grads: list[torch.Tensor]) -> None:
        """Make `grads` the gradients the next `step` uses (no-op when they alias the engine's)."""
        for live, new in zip(self.local_grads(), grads, strict=True):
            if live.data_ptr() != new.data_ptr():
                live.copy_(new)

    # --- parameters and optimizer ----------------------------------------------------------------
    @abstractmethod
    def local_params(self) -> list[torch.Tensor]:
        """Live fp32 master tensors of this rank's parameter shards, in `local_grads` order.
        In-place edits must be followed by `params_changed()`."""

    def params_changed(self) -> None:
        """Propagate in-place edits of `local_params()` to the copies forward passes use."""

    @abstractmethod
    def step(self, lr: float) -> None:
        """One optimizer step at learning rate `lr` with the current gradients."""

    # --- collectives ---------------------------------------------------------------------------
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.ctx.distributed:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.ctx.distributed:
            torch.distributed.broadcast(tensor, src=src)
        return tensor

    def barrier(self) -> None:
        if self.ctx.distributed:
            torch.distributed.barrier()

    def close(self) -> None:
        """Let go of process-wide state the engine set up (ZeRO-3's zero.Init hook into transformers), so
        that a later model in this process is built normally. Called at the end of a run."""

    # --- checkpoints and export ----------------------------------------------------------------
    @abstractmethod
    def save_checkpoint(self, directory: Path) -> None:
        """Write model and optimizer state (sharded where the engine shards) into `directory`."""

    @abstractmethod
    def load_checkpoint(self, directory: Path) -> None: ...

    def export_pretrained(
        self, directory: Path, tokenizer: Any = None, dtype: str = "fp32", lora: str = "merged"
    ) -> None:
        """Consolidated Hugging Face model (sharded safetensors + index) in `directory`, in `dtype`, written
        by rank 0 tensor by tensor as `full_tensors` gathers them; every rank must call it.

        A model with LoRA adapters is written merged into a plain model (`lora="merged"`), or as a PEFT
        adapter folder (`lora="adapter"`, fp32, with the tokenizer)."""
        from parallel.export import is_adapter, lora_scalings, merged_tensors, write_adapter, write_pretrained

        module, scalings = self.module, lora_scalings(self.module)
        if scalings and lora == "adapter":  # only the adapters are gathered, never the base
            write_adapter(directory, module, self.full_tensors(is_adapter), is_main=self.ctx.is_main)
            if tokenizer is not None and self.ctx.is_main:
                tokenizer.save_pretrained(directory)
            return
        tensors = self.full_tensors()
        if scalings:
            module, tensors = module.get_base_model(), merged_tensors(tensors, scalings)
        write_pretrained(directory, module, tensors, is_main=self.ctx.is_main, dtype=dtype, tokenizer=tokenizer)

    @abstractmethod
    def full_tensors(self, names: Callable[[str], bool] = everything) -> Iterator[tuple[str, torch.Tensor | None]]:
        """(name, whole tensor on CPU) for every exported tensor whose name `names` accepts, one at a time: on
        rank 0; the other ranks get None and hold no whole copy (nor gather the tensors left out). Every rank
        must exhaust it (the gathers are collectives)."""

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's parameters on CPU, on rank 0 (for tests); every rank must call it."""
        return {name: t.detach().clone() for name, t in self.full_tensors() if t is not None}
