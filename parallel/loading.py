"""Filling a sharded model from a safetensors checkpoint, each rank reading only its own rows.

A model built on the `meta` device and sharded (FSDP2 `fully_shard`, then `to_empty`) holds
uninitialised local shards. `load_shards` copies into each one the rows of the checkpoint tensor
that the shard covers, read through safetensors' lazy slices (a memory map: only those rows are
paged in), so no rank ever holds more than its shards plus one slice in flight. Nothing is
communicated: every rank reads the files itself (they must be visible on every node, as the model
folder already is for the tokenizer).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from parallel.compat.transformers import init_weights_of, rebuild_rotary

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def same_name(name: str) -> str:
    return name


@dataclass
class EmptyModel:
    """A model built on the `meta` device (no memory, no initialisation) and what filling it needs besides the
    checkpoint: the checkpoint's name of each tensor (a wrapper such as peft renames the base's), and the
    whole initial values of the tensors the checkpoint does not hold (LoRA adapters: small, and equal on
    every rank, so each rank copies its rows of them like those of the checkpoint's tensors)."""

    module: nn.Module
    checkpoint_name: Callable[[str], str] = same_name
    initial: dict[str, torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class ModelBuilder(Protocol):
    """What a backend's `prepare` is given (beyond a plain thunk): calling it builds the whole model, loaded;
    `build_empty` builds it on `meta` for a backend that fills each rank's shards itself from the
    safetensors under `path`, or returns None where that is not possible (the backend then calls it)."""

    path: str | None

    def __call__(self) -> nn.Module: ...

    def build_empty(self) -> EmptyModel | None: ...


def safetensors_files(path: str | Path) -> dict[str, Path] | None:
    """tensor name -> file for a local model folder with safetensors weights; None when there are none
    (a hub id, or .bin weights: those load the whole-copy way)."""
    folder = Path(path)
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    if (folder / SINGLE_FILE).is_file():
        from safetensors import safe_open

        with safe_open(str(folder / SINGLE_FILE), framework="pt") as f:
            return dict.fromkeys(f.keys(), folder / SINGLE_FILE)
    return None


def missing_tensors(
    model: nn.Module,
    files: dict[str, Path],
    checkpoint_name: Callable[[str], str] = same_name,
    initial: Mapping[str, torch.Tensor] | None = None,
) -> list[str]:
    """Names of the model's parameters and persistent buffers neither the checkpoint (under
    `checkpoint_name`) nor `initial` holds (renamed or legacy layouts, which only `from_pretrained`'s key
    conversions understand)."""
    initial = initial or {}
    return [name for name in model.state_dict() if name not in initial and checkpoint_name(name) not in files]


def shard_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int | None]:
    """(local tensor, first global row) of a parameter sharded on dim 0 (FSDP2 splits like torch.chunk:
    ceil(rows / ranks) each, the last ranks shorter or empty); (tensor, None) for a whole tensor."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(tensor, DTensor):
        return tensor, None
    placements = tensor.placements
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(f"only 1-D meshes sharded on dim 0 are supported, got {placements}")
    rank = tensor.device_mesh.get_local_rank()
    rows = math.ceil(tensor.shape[0] / tensor.device_mesh.size())
    return tensor.to_local(), rank * rows


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def read_header(file: Path) -> tuple[dict, int]:
    """(tensor entries, offset of the data) of a safetensors file: an 8-byte little-endian header length,
    then the JSON header (https://github.com/huggingface/safetensors#format)."""
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def read_rows(file: Path, entry: dict, data_start: int, start: int | None, count: int) -> torch.Tensor:
    """Rows [start, start + count) of one tensor (the whole tensor when start is None), read with plain
    file reads: no memory map, so no file pages of other ranks' rows count in this process's memory."""
    shape = entry["shape"]
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    begin, end = entry["data_offsets"]
    if start is None:
        offset, length, out_shape = begin, end - begin, shape
    else:
        row_bytes = (end - begin) // shape[0] if shape[0] else 0
        offset, length, out_shape = begin + start * row_bytes, count * row_bytes, [count, *shape[1:]]
    buffer = bytearray(length)
    with open(file, "rb") as f:
        f.seek(data_start + offset)
        f.readinto(buffer)
    return torch.frombuffer(buffer, dtype=dtype).reshape(out_shape) if length else torch.empty(out_shape, dtype=dtype)


@torch.no_grad()
def load_shards(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    files: dict[str, Path],
    checkpoint_name: Callable[[str], str] = same_name,
    initial: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Copy each tensor's rows into this rank's shard, one slice at a time: from `initial` where it holds the
    tensor, else from the checkpoint's tensor `checkpoint_name(name)`."""
    initial = initial or {}
    headers: dict[Path, tuple[dict, int]] = {}
    for name, tensor in named_tensors:
        target, start = shard_rows(tensor)
        if start is not None and target.shape[0] == 0:
            continue
        rows = target.shape[0] if target.dim() else 0
        if name in initial:
            where, value = "initial values", initial[name] if start is None else initial[name][start : start + rows]
        else:
            key = checkpoint_name(name)
            where = files[key]
            if where not in headers:
                headers[where] = read_header(where)
            entries, data_start = headers[where]
            value = read_rows(where, entries[key], data_start, start, rows)
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{where}: {name} has rows of shape {tuple(value.shape)}, the shard {tuple(target.shape)}")
        target.copy_(value)


@torch.no_grad()
def init_non_persistent_buffers(model: nn.Module) -> None:
    """Recompute the buffers a checkpoint does not store (rotary frequency tables) after `to_empty`,
    with the model's own initialiser (Hugging Face's `_init_weights` computes them from the config)."""
    init = init_weights_of(model)
    for module in model.modules():
        if module._non_persistent_buffers_set:
            if init is None:
                raise ValueError(
                    f"{type(model).__name__} has non-persistent buffers and no _init_weights to rebuild them"
                )
            init(module)
            rebuild_rotary(module)
