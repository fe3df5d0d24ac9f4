"""Streaming export: the final model written tensor by tensor into sharded safetensors files.

Sharded engines gather one parameter at a time to rank 0 (`gather_rows_to_main`); rank 0 appends it
to the current output shard and writes the shard once it is full, so rank 0's extra memory is one
output shard (plus the tensor in flight), never the model, and the other ranks hold only their own
partitions. The files and index are laid out as `save_pretrained` writes them
(model-0000k-of-0000n.safetensors + model.safetensors.index.json, or one model.safetensors), so
`from_pretrained` reads the result unchanged.
"""

from __future__ import annotations

import copy
import errno
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ngdiff.errors import UserError
from parallel.loading import INDEX_FILE, SINGLE_FILE

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_SHARD_BYTES = 2 * 2**30  # bounds rank 0's buffer; save_pretrained's default is 50 GB


def everything(name: str) -> bool:
    """The default selection of `Backend.full_tensors`: every exported tensor."""
    return True


def is_adapter(name: str) -> bool:
    """A LoRA adapter tensor of a peft model (what `export.lora=adapter` writes)."""
    return ".lora_" in name


def exported_names(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """What `save_pretrained` stores: parameters (a tied one once, under its first name) and the
    persistent buffers, in module order."""
    yield from module.named_parameters()
    for name, buffer in module.named_buffers():
        owner, _, leaf = name.rpartition(".")
        if leaf not in module.get_submodule(owner)._non_persistent_buffers_set:
            yield name, buffer


def gather_rows_to_main(
    local: torch.Tensor, shape: torch.Size, rows_per_rank: int, device: torch.device
) -> torch.Tensor | None:
    """The whole tensor of `shape` on rank 0 (CPU), None elsewhere, from row blocks: rank r holds rows
    [r * rows_per_rank, ...) (FSDP2's dim-0 shards; ZeRO-3's flat partitions, where a row is an element),
    the last ones possibly short or empty. One `gather`: the other ranks send their block and keep nothing."""
    world, rank = dist.get_world_size(), dist.get_rank()
    block = torch.zeros((rows_per_rank, *shape[1:]), dtype=local.dtype, device=device)
    block[: local.shape[0]].copy_(local)
    blocks = [torch.empty_like(block) for _ in range(world)] if rank == 0 else None
    dist.gather(block, blocks, dst=0)
    return torch.cat(blocks)[: shape[0]].cpu() if rank == 0 else None


class ShardedSafetensorsWriter:
    """Appends named tensors to output shards of at most `max_shard_bytes` (a bigger tensor gets a shard
    of its own); `close` names the shards, writes the index and returns the total bytes."""

    def __init__(self, directory: Path, dtype: str = "fp32", max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        if dtype not in EXPORT_DTYPES:
            raise ValueError(f"export.dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dtype = EXPORT_DTYPES[dtype]
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []  # tensor names per written shard
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        tensor = tensor.detach().cpu().contiguous()
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        path = self._temporary(len(self.shards))
        try:
            save_file(self.pending, str(path), metadata={"format": "pt"})
        except SafetensorError as err:  # safetensors reports a failed write as its own error, not an OSError
            if "IoError" not in str(err):
                raise
            code = errno.ENOSPC if "StorageFull" in str(err) or "code: 28" in str(err) else errno.EIO
            raise OSError(code, str(err), str(path)) from err
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def _temporary(self, index: int) -> Path:
        return self.directory / f".shard-{index:05d}.safetensors.partial"

    def close(self) -> int:
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        if count == 1:
            self._temporary(0).rename(self.directory / SINGLE_FILE)
            return self.total_bytes
        weight_map = {}
        for index, names in enumerate(self.shards):
            final = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            self._temporary(index).rename(self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        index_doc = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / INDEX_FILE).write_text(json.dumps(index_doc, indent=2, sort_keys=True) + "\n")
        return self.total_bytes


def export_failure(directory: Path, err: OSError) -> UserError:
    reason = "no space left on device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
    return UserError(f"{directory}: could not write the exported model: {reason}")


def write_pretrained(
    directory: Path,
    module: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor | None]],
    *,
    is_main: bool,
    dtype: str = "fp32",
    tokenizer: Any = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """Every rank iterates `tensors` (the gathers are collectives); rank 0 writes them, the model's
    config (its dtype set to the exported one), generation config and tokenizer."""
    writer = ShardedSafetensorsWriter(directory, dtype, max_shard_bytes) if is_main else None
    failed: OSError | None = None
    for name, tensor in tensors:  # after a failed write rank 0 still takes part in every gather
        if writer is not None and failed is None:
            try:
                writer.add(name, tensor)
            except OSError as err:
                failed = err
    if writer is None:
        return
    try:
        if failed is not None:
            raise failed
        writer.close()
    except OSError as err:
        for partial in directory.glob(".shard-*.safetensors.partial"):
            partial.unlink(missing_ok=True)
        if not any(directory.iterdir()):
            directory.rmdir()  # nothing of an earlier export was in it
        raise export_failure(directory, err) from None
    config = getattr(module, "config", None)
    if config is not None:
        config = copy.deepcopy(config)  # the live model keeps its dtype
        config.dtype = EXPORT_DTYPES[dtype]
        config.save_pretrained(directory)
    generation = getattr(module, "generation_config", None)
    if generation is not None and getattr(module, "can_generate", lambda: False)():
        generation.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


# --- LoRA (peft) models: the merged plain model, or the adapter alone -------------------------------------
PEFT_PREFIX = "base_model.model."
ADAPTER = "default"  # peft's name of the one adapter a model gets from get_peft_model
ADAPTER_FILE = "adapter_model.safetensors"


def lora_scalings(module: nn.Module) -> dict[str, float]:
    """Plain-model module name -> LoRA scaling (alpha / r) of each adapted layer; empty without adapters."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {
        name.removeprefix(PEFT_PREFIX): float(layer.scaling[ADAPTER])
        for name, layer in module.named_modules()
        if isinstance(layer, LoraLayer) and ADAPTER in layer.scaling
    }


def merged_tensors(
    tensors: Iterable[tuple[str, torch.Tensor | None]], scalings: dict[str, float]
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """The plain model's tensors from a peft model's stream: W + scaling * B @ A under the base layer's name
    (what peft's `merge_and_unload` computes for a Linear), other tensors renamed. A layer's base weight is
    held until its lora_B arrives (module order: base_layer, lora_A, lora_B), so at most one layer waits."""
    base: dict[str, torch.Tensor | None] = {}
    lora_a: dict[str, torch.Tensor | None] = {}
    for peft_name, tensor in tensors:
        name = peft_name.removeprefix(PEFT_PREFIX)
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(f".lora_A.{ADAPTER}"):
            lora_a[owner.removesuffix(f".lora_A.{ADAPTER}")] = tensor
        elif owner.endswith(f".lora_B.{ADAPTER}"):
            layer = owner.removesuffix(f".lora_B.{ADAPTER}")
            weight, a = base.pop(layer), lora_a.pop(layer)
            merged = None
            if tensor is not None:
                delta = (tensor.double() @ a.double()) * scalings[layer]
                merged = (weight.double() + delta).to(weight.dtype)
            yield f"{layer}.weight", merged
        elif owner.endswith(".base_layer") and leaf == "weight" and owner.removesuffix(".base_layer") in scalings:
            base[owner.removesuffix(".base_layer")] = tensor
        else:
            yield name.replace(".base_layer.", "."), tensor
    if base or lora_a:
        raise ValueError(f"LoRA layers without both adapter matrices: {sorted({*base, *lora_a})[:3]}")


def write_adapter(
    directory: Path, module: nn.Module, tensors: Iterable[tuple[str, torch.Tensor | None]], *, is_main: bool
) -> None:
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors, the layout `PeftModel
    .save_pretrained` writes and `PeftModel.from_pretrained` reads): only the adapter tensors are kept."""
    from safetensors.torch import save_file

    marker = f".{ADAPTER}."
    adapter = {
        name.replace(marker, "."): tensor.detach().cpu().contiguous()
        for name, tensor in tensors
        if tensor is not None and is_adapter(name)
    }
    if not is_main:
        return
    directory.mkdir(parents=True, exist_ok=True)
    save_file(adapter, str(directory / ADAPTER_FILE), metadata={"format": "pt"})
    module.peft_config[ADAPTER].save_pretrained(str(directory))
