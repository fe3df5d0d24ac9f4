"""DeepSpeed internals: ZeRO-3's fp32 master partition, its communication backend's collective functions,
the optimizer's re-partitioning after AutoLR edits, and zero.Init's leftover on `nn.Module`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from parallel.compat import available, log, register, resolve

DEEPSPEED = {"deepspeed": "0.19.8"}
STAGE3 = "deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3"

FP32_MASTER = register(
    "deepspeed.fp32_master_is_the_partition",
    targets=(f"{STAGE3}._create_fp32_partitions",),
    why="in fp32 the fp32 master partition is the parameter partition itself, as DeepSpeed intends: its "
    "check compares a torch.device with a device-name string and never passes",
    verified=DEEPSPEED,
    without="every fp32 zero3 run keeps a second copy of its parameter partition (1/N of the model per rank)",
)
COLLECTIVES = register(
    "deepspeed.gloo_collectives",
    targets=(
        "deepspeed.comm.comm:cdb",
        "deepspeed.comm.torch:TorchBackend.get_all_gather_function",
        "deepspeed.comm.torch:TorchBackend.get_reduce_scatter_function",
    ),
    why="on gloo, ZeRO-3's whole-tensor all-gather and reduce-scatter run in place (parallel/gloo_comm.py) "
    "through the functions DeepSpeed's torch backend holds",
    verified=DEEPSPEED,
    without="gloo runs of zero3 use gloo's own collectives, with a whole staging copy each in host memory",
)
REPARTITION = register(
    "deepspeed.stage3_repartition",
    targets=(
        f"{STAGE3}._partition_all_parameters",
        f"{STAGE3}._reassign_or_swap_out_partitioned_parameters",
    ),
    why="AutoLR edits the fp32 master partitions; these copy them into the partitions forward passes "
    "gather from and re-gather the persistent parameters, as DeepSpeed's own step does",
    verified=DEEPSPEED,
)
INIT_SUBCLASS = register(
    "deepspeed.zero_init_subclass_leftover",
    targets=("deepspeed.runtime.zero.partition_parameters:InsertPostInitMethodToModuleSubClasses",),
    why="zero.Init, once entered and left, leaves on nn.Module an `__init_subclass__` that does not chain "
    "along the MRO; TorchJD's Module + Generic classes fail to define under it",
    verified=DEEPSPEED,
    without="nothing to undo (this DeepSpeed has no zero.Init that patches nn.Module)",
)


@contextmanager
def fp32_master_is_the_partition() -> Iterator[None]:
    """While an engine is built: ZeRO-3's fp32 master partition is the parameter partition itself where
    both are fp32 on one device, as DeepSpeed intends.

    `DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions` (DeepSpeed 0.19) reuses the partition when
    `partition.device == self.device`, but `self.device` is the accelerator's device *name* ("cpu",
    "cuda:0") and a torch.device never equals a string: every fp32 run keeps a second copy of its
    parameter partition (1/N of the model per rank). Here the comparison sees a torch.device; the
    attribute is restored right after. DeepSpeed's step then copies the master onto itself, a no-op
    (`_reassign_or_swap_out_partitioned_parameters` says so)."""
    if not available(FP32_MASTER.name):
        yield
        return
    import torch

    stage3 = resolve(STAGE3)
    original = stage3._create_fp32_partitions

    def create(optimizer) -> None:
        name = optimizer.device
        if not optimizer.offload_optimizer:  # offloaded: an OffloadDeviceEnum, and a branch of its own
            optimizer.device = torch.device(name)
        try:
            original(optimizer)
        finally:
            optimizer.device = name

    stage3._create_fp32_partitions = create
    try:
        yield
    finally:
        stage3._create_fp32_partitions = original


def use_collectives(all_gather: Callable[..., Any], reduce_scatter: Callable[..., Any]) -> bool:
    """Make DeepSpeed's torch communication backend (`deepspeed.comm.comm.cdb`) run its whole-tensor
    all-gather (ZeRO-3's parameter fetch) and reduce-scatter (its gradient partitioning) with these: they
    are the functions it holds in `all_gather_function` / `reduce_scatter_function`. Call after
    `deepspeed.init_distributed`; False (and a warning) where this DeepSpeed holds no such functions."""
    if not available(COLLECTIVES.name):
        return False
    backend = resolve("deepspeed.comm.comm:cdb")
    missing = [name for name in ("all_gather_function", "reduce_scatter_function") if not hasattr(backend, name)]
    if missing:  # instance attributes: the guard can only see them once DeepSpeed's backend exists
        log.warning("compat patch %s is inactive: %s has no %s. Without it: %s", COLLECTIVES.name,
                    type(backend).__name__, ", ".join(missing), COLLECTIVES.without)  # fmt: skip
        return False
    backend.all_gather_function = all_gather
    backend.reduce_scatter_function = reduce_scatter
    return True


def fp32_partitions(optimizer: Any) -> list[Any]:
    """The live fp32 master partitions (one flat tensor per group) of a ZeRO-3 optimizer."""
    available(REPARTITION.name)
    return list(optimizer.fp32_partitioned_groups_flat)


def repartition(optimizer: Any) -> None:
    """What DeepSpeed's step and checkpoint loading do after an update: release gathered copies, copy the
    fp32 masters into the partitions forward gathers from, then re-gather the small parameters every rank
    keeps whole ("persistent"; all_gather skips those still marked available)."""
    available(REPARTITION.name)
    optimizer._partition_all_parameters()
    for group in range(len(optimizer.fp16_groups)):
        optimizer._reassign_or_swap_out_partitioned_parameters(group)
    persistent = optimizer.persistent_parameters
    if persistent:
        persistent[0].partition(persistent)
        persistent[0].all_gather(persistent)


@contextmanager
def module_subclassing_as_defined() -> Iterator[None]:
    """Classes defined inside the block get nn.Module's own `__init_subclass__`, not the one DeepSpeed's
    zero.Init leaves on it (object's, bound to Module, which does not chain along the MRO: a class that is
    both a Module and a typing.Generic, such as TorchJD's Weighting, then lacks `__parameters__` and fails
    to define). What DeepSpeed left is put back after. Safe where it left nothing."""
    import torch

    module = torch.nn.Module
    leftover = module.__dict__.get("__init_subclass__")
    if leftover is not None:
        delattr(module, "__init_subclass__")
    try:
        yield
    finally:
        if leftover is not None:
            module.__init_subclass__ = leftover
