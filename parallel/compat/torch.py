"""torch internals: FSDP2's private collective hooks (gloo runs), the weights-only `torch.load` patch, and
the distributed checkpoint reader's metadata path."""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from parallel.compat import available, register, resolve

TORCH = {"torch": "2.13.0"}
FSDP_API = "torch.distributed.fsdp._fully_shard._fsdp_api"
FSDP_COLLECTIVES = "torch.distributed.fsdp._fully_shard._fsdp_collectives"

CUSTOM_COLLECTIVES = register(
    "torch.fsdp2_custom_collectives",
    targets=(
        f"{FSDP_API}:AllGather",
        f"{FSDP_API}:ReduceScatter",
        "torch.distributed.fsdp:FSDPModule.set_custom_all_gather",
        "torch.distributed.fsdp:FSDPModule.set_custom_reduce_scatter",
        "torch.distributed.fsdp:FSDPModule._get_fsdp_state",
        "torch.autograd:_unsafe_preserve_version_counter",
    ),
    why="on gloo, FSDP2's all-gather and reduce-scatter run as in-place broadcasts / reduces "
    "(parallel/fsdp_gloo.py): gloo's own stage a whole copy of each unit in host memory",
    verified=TORCH,
    without="gloo runs of fsdp use gloo's own collectives: one more whole copy of the largest unit per "
    "collective in host memory (NCCL runs never use these)",
)
ADOPT_GRADIENT = register(
    "torch.fsdp2_reduce_scatter_copy_in",
    targets=(f"{FSDP_COLLECTIVES}:foreach_reduce_scatter_copy_in",),
    why="a one-gradient unit's reduce-scatter input takes over the gradient's memory instead of a copy",
    verified=TORCH,
    without="every reduce-scatter input is a copy of the unit's gradients, as FSDP2 does itself",
)
WEIGHTS_ONLY = register(
    "torch.load_weights_only",
    targets=("torch:load", "torch.serialization:safe_globals"),
    why="engines load their own checkpoint files with weights_only=False; inside `weights_only_loads` every "
    "torch.load is made weights-only, so a planted pickle is refused instead of run",
    verified=TORCH,
)
DCP_METADATA = register(
    "torch.dcp_metadata_path",
    targets=("torch.distributed.checkpoint:FileSystemReader._get_metadata_path",),
    why="fsdp checkpoints' .metadata is read by a restricted unpickler, from the path torch's reader uses",
    verified=TORCH,
    without="torch < 2.9 has no such method and no per-rank metadata: the folder's .metadata is read, as "
    "torch's own reader of those versions does",
)


def fsdp2_collective_bases() -> tuple[type, type]:
    """FSDP2's private `AllGather` and `ReduceScatter` hook classes (torch >= 2.9), for fsdp_gloo to subclass.
    ImportError where this torch lacks them (then `parallel.fsdp_gloo` cannot be imported)."""
    try:
        return resolve(f"{FSDP_API}:AllGather"), resolve(f"{FSDP_API}:ReduceScatter")
    except (ImportError, AttributeError) as err:
        raise ImportError(f"torch lacks FSDP2's private collective classes ({err})") from None


def chunked_collectives_available() -> bool:
    """Whether gloo runs of fsdp can install the in-place collectives; where not, a warning says so once
    and FSDP2's own (gloo's, with their staging copies) run."""
    return available(CUSTOM_COLLECTIVES.name)


def fsdp_unit_params(module: Any) -> list[Any]:
    """The FSDP parameter records (`FSDPParam`) of a `fully_shard` unit with one parameter group, else []."""
    groups = getattr(module._get_fsdp_state(), "_fsdp_param_groups", [])
    return list(groups[0].fsdp_params) if len(groups) == 1 else []


def preserve_version_counter(tensor: Any) -> Any:
    """torch's own context for refilling a saved tensor's memory with the same values, no version bump."""
    import torch

    return torch.autograd._unsafe_preserve_version_counter(tensor)


def fsdp_reduce_scatter_copy_in() -> Callable[..., None] | None:
    """FSDP2's own copy of a unit's gradients into the reduce-scatter input, or None where this torch has none."""
    try:
        return resolve(f"{FSDP_COLLECTIVES}:foreach_reduce_scatter_copy_in")
    except (ImportError, AttributeError):
        return None


def route_reduce_scatter_copy_in(replacement: Callable[..., None]) -> bool:
    """Make FSDP2 call `replacement` where it copies a unit's gradients into the reduce-scatter input (it
    looks the function up by name at each reduce); False where this torch has no such function (then the
    inputs stay copies, and a warning says so once)."""
    if not available(ADOPT_GRADIENT.name):
        return False
    resolve(FSDP_COLLECTIVES).foreach_reduce_scatter_copy_in = replacement
    return True


@contextmanager
def torch_load_weights_only(
    allowed: Sequence[Any], refused: Callable[[Any, BaseException], Exception]
) -> Iterator[None]:
    """Every `torch.load` inside the block is weights-only (tensors, containers and `allowed`), whatever
    its caller asks for; an unpickling refusal becomes `refused(file, error)`."""
    import torch

    available(WEIGHTS_ONLY.name)
    original = torch.load

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        kwargs.pop("pickle_module", None)  # weights-only loading brings its own unpickler
        try:
            with torch.serialization.safe_globals(list(allowed)):
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as err:
            raise refused(f, err) from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def dcp_metadata_path(reader: Any, rank: int | None = None) -> Any:
    """The `.metadata` file torch's `FileSystemReader` would read."""
    if available(DCP_METADATA.name):
        return reader._get_metadata_path(rank)
    return reader.fs.concat_path(reader.path, ".metadata")  # torch < 2.9's reader: one file, at the root
