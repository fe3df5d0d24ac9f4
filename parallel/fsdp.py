"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over ranks on dim 0.

Each decoder block is its own unit (all-gathered just before it runs, freed after), then the root.
Gradients are DTensors; `to_local()` is a view of this rank's shard, so the trainer's in-place
combination writes straight into what the optimizer steps with. For accumulation, gradient
reduction is off until the last micro-batch: one reduce-scatter per task per step.
On gloo (CPU) the units' collectives are `parallel.gloo_comm`'s (hooked in by `parallel.fsdp_gloo`), which
stage no whole-unit copy.
"""

from __future__ import annotations

import logging
import math
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from parallel.base import Backend, check_loaded_keys
from parallel.compat.torch import chunked_collectives_available, dcp_metadata_path
from parallel.export import everything, exported_names, gather_rows_to_main
from parallel.loading import (
    EmptyModel,
    ModelBuilder,
    init_non_persistent_buffers,
    load_shards,
    missing_tensors,
    safetensors_files,
    shard_rows,
)
from parallel.optim import build_optimizer, grads_of, set_lr
from parallel.safe_load import unsafe_file, weights_only_loads

log = logging.getLogger("ngdiff.parallel")


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: HF models name their classes in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        log.warning("no decoder blocks found (%s); sharding the model as one unit", type(model).__name__)
    return blocks


def embedding_units(model: nn.Module) -> list[nn.Module]:
    """The input and output embeddings as units of their own (unless tied): in the root unit they would be
    gathered together, and their gradients unsharded together, which at a 32k vocabulary is a third of a
    small model on every rank at once."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    units = [get() for get in (get_in, get_out) if get is not None]
    units = [u for u in units if isinstance(u, nn.Module)]
    if len(units) == 2 and units[0].weight is units[1].weight:
        return []
    return units


def lookup_only(module: nn.Module) -> bool:
    """A plain embedding: its backward scatters into the gradient by token id and never reads the weight."""
    return isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class MetadataUnpickler(pickle.Unpickler):
    """Reads a distributed checkpoint's `.metadata` (a plain pickle, which torch loads with `pickle.load`):
    only its own record classes, torch's sizes, dtypes and layouts, and paths may be named in it."""

    RECORDS = "torch.distributed.checkpoint.metadata"
    NAMES = frozenset(
        {
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
            ("torch", "Size"),
            ("torch.serialization", "_get_layout"),
            ("collections", "OrderedDict"),
            *(("pathlib", name) for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name) if module in {self.RECORDS, "torch", *dict(self.NAMES)} else None
        record = isinstance(found, type) and module == self.RECORDS and found.__module__ == module
        torch_constant = module == "torch" and isinstance(found, torch.dtype | torch.layout | torch.memory_format)
        if record or torch_constant or (module, name) in self.NAMES:
            return found
        raise pickle.UnpicklingError(f"Unsupported GLOBAL {module}.{name} in a checkpoint's metadata")


class SafeCheckpointReader(dcp.FileSystemReader):
    """torch's file reader, its metadata read by `MetadataUnpickler` instead of `pickle.load`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = pathlib.Path(dcp_metadata_path(self, kwargs.get("rank")))
        with self.fs.create_stream(path, "rb") as stream:
            try:
                metadata = MetadataUnpickler(stream).load()
            except pickle.UnpicklingError as err:
                raise unsafe_file(path, err) from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load_distributed_checkpoint(state: dict[str, Any], directory: Path) -> None:
    """`dcp.load` reading no pickle beyond tensors and plain data: the metadata through
    `SafeCheckpointReader`, the non-tensor values (optimizer settings) weights-only."""
    reader = SafeCheckpointReader(str(directory))
    reader.read_metadata()  # here a refusal names the file; inside dcp.load it comes wrapped in rank tracebacks
    with weights_only_loads(where=directory):
        dcp.load(state, storage_reader=reader)


class FSDPBackend(Backend):
    name = "fsdp"
    shards_parameters = True

    def _shard(self, model: nn.Module, mixed: bool) -> nn.Module:
        mesh = init_device_mesh(self.ctx.device.type, (self.ctx.world_size,))
        kwargs = {"mesh": mesh}
        if mixed:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if self.parallel_cfg.cpu_offload:
            # pinned memory needs an accelerator; on a CPU-only machine offloading is a no-op anyway
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        embeddings = embedding_units(model)
        units = [*decoder_blocks(model), *embeddings, model]
        for unit in units:
            fully_shard(unit, **kwargs)
        if embeddings and lookup_only(embeddings[0]):
            # the input embedding's backward needs only the token ids: no all-gather of the table in backward
            embeddings[0].set_unshard_in_backward(False)
        if torch.distributed.get_backend(mesh.get_group()) == "gloo":
            # fsdp_gloo subclasses FSDP2's private collective classes (torch >= 2.9), which NCCL runs never
            # need: imported only here, and only where this torch has them (else a warning, gloo's own)
            chunked = chunked_collectives_available()
            for unit in units:
                if chunked:
                    from parallel.fsdp_gloo import use_chunked_collectives

                    use_chunked_collectives(unit)
                # gloo's collectives block this thread, so prefetching the next unit in backward overlaps
                # nothing and only holds it gathered beside the current one: an explicit prefetch list
                # replaces FSDP's default, and the unit itself is already gathered when it is consulted
                unit.set_modules_to_backward_prefetch([unit])
        return model

    @staticmethod
    def _empty(build_model) -> tuple[EmptyModel, dict[str, Path]] | None:
        """The model on `meta` and its checkpoint files, where the builder can build it empty and `path` is a
        local safetensors folder holding every tensor the model does not initialise itself; else None."""
        path = build_model.path if isinstance(build_model, ModelBuilder) else None
        files = safetensors_files(path) if path else None
        empty = build_model.build_empty() if files is not None else None
        if empty is None:
            return None
        if missing := missing_tensors(empty.module, files, empty.checkpoint_name, empty.initial):
            log.warning("%s lacks %s...: loading the whole model on every rank", path, missing[:3])
            return None
        return empty, files

    def _build_sharded(self, build_model, gradient_checkpointing: bool = False) -> nn.Module:
        """Built on `meta` and filled shard by shard from the checkpoint where it is a local safetensors
        folder (no rank holds a whole copy); otherwise built whole on every rank, then sharded."""
        found = self._empty(build_model)
        # fp32 master weights; bf16 only in the all-gathered compute copies
        model = build_model() if found is None else found[0].module
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        device = torch.device("cpu") if self.parallel_cfg.cpu_offload else self.ctx.device
        if found is None:
            model.to(device)
        model = self._shard(model, mixed=self.precision == "bf16")
        if found is not None:
            empty, files = found
            model.to_empty(device=device)
            init_non_persistent_buffers(model)  # before the load: an initialiser may touch parameters too
            load_shards(model.state_dict(keep_vars=True).items(), files, empty.checkpoint_name, empty.initial)
        return model

    def prepare(self, build_model, gradient_checkpointing=False):
        self.model = self.module = self._build_sharded(build_model, gradient_checkpointing)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, self.optim_cfg)
        return self.model

    def prepare_frozen(self, build_model):
        model = self._build_sharded(build_model)
        model.requires_grad_(False)
        return model.eval()

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
        self._reshard()

    def _reshard(self) -> None:
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def step(self, lr):
        set_lr(self.optimizer, lr)
        self.optimizer.step()

    # torch.distributed.checkpoint: each rank writes and reads its own shards (any world size can load)
    # frozen parameters (a LoRA run's base model) are rebuilt from model.path and left out
    STATE_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)

    def save_checkpoint(self, directory: Path):
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self.STATE_OPTIONS)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(directory))

    def load_checkpoint(self, directory: Path):
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self.STATE_OPTIONS)
        state = {"model": model_state, "optimizer": optim_state}
        load_distributed_checkpoint(state, directory)
        loaded = set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=self.STATE_OPTIONS,
        )
        check_loaded_keys(directory, self.model, loaded.missing_keys, loaded.unexpected_keys)

    def full_tensors(self, names=everything):
        self._reshard()  # parameters still gathered after a forward would be the bf16 compute copies
        for name, tensor in exported_names(self.model):
            if not names(name):
                continue
            if isinstance(tensor, DTensor):
                local, _ = shard_rows(tensor)
                rows = math.ceil(tensor.shape[0] / self.ctx.world_size)
                yield name, gather_rows_to_main(local.detach(), tensor.shape, rows, self.ctx.device)
            else:  # buffers: replicated
                yield name, tensor.detach().cpu() if self.ctx.is_main else None
