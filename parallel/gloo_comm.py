"""All-gather and reduce-scatter over gloo without a whole-tensor staging copy, for FSDP2 and ZeRO-3.

gloo's `all_gather_into_tensor` and `reduce_scatter_tensor` each allocate a scratch tensor the size of
the whole (unsharded) input or output, and FSDP2 keeps its reduce-scatter input alive until the next
unit's backward. On CPU all of that is host memory: for the largest unit (a 32k x 1024 embedding, a
sixth of a 194M model) it is one more whole copy of the unit per collective, measured with 4 ranks in
benchmarks/load_memory.py. The same collectives written as one `broadcast` (all-gather) or `reduce`
(reduce-scatter) per rank's chunk work in place on the engines' own buffers, and are faster on gloo
too. DeepSpeed's ZeRO-3 calls the same two gloo collectives for its largest parameters
(`parallel.compat.deepspeed.use_collectives`). FSDP2's hooks for them are private: `parallel.compat.torch`.

FSDP2 also stages a unit's unsharded gradients in the reduce-scatter input (a copy, then the gradients
are freed). Where a unit has one gradient already laid out as that input (dim-0 shards, no padding: an
embedding, an output projection), the input adopts the gradient's memory instead (`_adopt_or_copy_in`);
likewise such a unit's all-gather writes straight into its unsharded parameter (`ChunkedAllGather`).

Exactness: the all-gather is a copy. The reduce-scatter adds the same terms; at 2 ranks the sum is
bitwise the one gloo's reduce-scatter gives, at more ranks the order of the additions may differ.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from parallel.compat.torch import (
    fsdp2_collective_bases,
    fsdp_reduce_scatter_copy_in,
    fsdp_unit_params,
    preserve_version_counter,
    route_reduce_scatter_copy_in,
)

# FSDP2's private hook classes (torch >= 2.9); without them this module cannot be imported (parallel.fsdp
# then runs gloo's own collectives, see parallel.compat.torch)
AllGather, ReduceScatter = fsdp2_collective_bases()

log = logging.getLogger("ngdiff.parallel")


def _empty(size: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(*size, dtype=dtype, device=device)


def _is_whole(tensor: torch.Tensor, size: Sequence[int], dtype: torch.dtype, device: torch.device) -> bool:
    """`tensor` is a flat tensor of exactly `size`, `dtype`, `device`, alone at the start of its memory."""
    return (
        tuple(tensor.shape) == tuple(size)
        and tensor.dtype == dtype
        and tensor.device == torch.device(device)
        and tensor.storage_offset() == 0
    )


def _dim0(fsdp_param) -> bool:
    placement = getattr(fsdp_param, "fsdp_placement", None)
    return getattr(placement, "dim", None) == 0


def _adopts(buffer: torch.Tensor, grads: list[torch.Tensor]) -> bool:
    """One gradient, alone in its memory, whose bytes are exactly the reduce-scatter input's layout: FSDP's
    copy-in (`chunk_cat` of dim-0 chunks) would be the identity."""
    if len(grads) != 1 or not getattr(buffer, "adopts_gradient", False):
        return False
    grad = grads[0]
    return (
        grad.is_contiguous()
        and grad.dtype == buffer.dtype
        and grad.device == buffer.device
        and grad.numel() == buffer.numel()
        and grad.storage_offset() == 0
        and grad.untyped_storage().nbytes() == grad.numel() * grad.element_size()
    )


_copy_in = fsdp_reduce_scatter_copy_in()


def _adopt_or_copy_in(unsharded_grads: list[torch.Tensor], reduce_scatter_input: torch.Tensor, world_size: int):
    """FSDP's copy of the unsharded gradients into the reduce-scatter input; for our (untouched, so not yet
    resident) input buffers and a lone gradient of the same layout, the input takes over the gradient's
    memory instead. FSDP drops its references to the gradients right after ("clearing the list frees the
    gradients", `foreach_reduce`), so the gradient's memory is the input's alone."""
    if _adopts(reduce_scatter_input, unsharded_grads):
        grad = unsharded_grads[0]
        reduce_scatter_input.set_(grad.untyped_storage(), 0, reduce_scatter_input.shape, (1,))
        return
    _copy_in(unsharded_grads, reduce_scatter_input, world_size)


class _Done:
    """The handle of a collective that has already completed (what an `async_op` caller waits on)."""

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
    """`torch.distributed.all_gather_into_tensor`, as one broadcast per rank's chunk of `output_tensor`."""
    group = group or dist.group.WORLD
    chunks = output_tensor.chunk(group.size())
    own = chunks[group.rank()]
    if own.data_ptr() != input_tensor.data_ptr():  # FSDP's input is already that chunk, DeepSpeed's is not
        own.copy_(input_tensor.reshape(-1))
    for index, chunk in enumerate(chunks):
        dist.broadcast(chunk, src=dist.get_global_rank(group, index), group=group)
    return _Done() if async_op else None


def reduce_scatter_tensor(output_tensor, input_tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
    """`torch.distributed.reduce_scatter_tensor` (SUM or AVG), as one reduce per chunk onto its rank; the
    other chunks of `input_tensor` are left as gloo leaves them."""
    group = group or dist.group.WORLD
    average = op == dist.ReduceOp.AVG
    if not (average or op == dist.ReduceOp.SUM):  # e.g. PREMUL_SUM: gloo's own (with its staging copy)
        return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group, async_op=async_op)
    chunks = input_tensor.reshape(-1).chunk(group.size())
    for index, chunk in enumerate(chunks):
        dist.reduce(chunk, dst=dist.get_global_rank(group, index), op=dist.ReduceOp.SUM, group=group)
    own = chunks[group.rank()]
    if own.data_ptr() != output_tensor.data_ptr():  # DeepSpeed's output is that chunk itself
        output_tensor.copy_(own.view_as(output_tensor))
    if average:
        output_tensor.div_(group.size())
    return _Done() if async_op else None


class ChunkedAllGather(AllGather):
    """For a unit of one parameter (`fsdp_param`, FSDP's record of it), the all-gather output is, from the
    second gather on, the memory of the unsharded parameter itself: FSDP's copy-out into it is then a copy
    onto itself, which `copy_` skips, instead of a second whole copy of the unit."""

    def __init__(self, fsdp_param=None):
        self.fsdp_param = fsdp_param
        self.refill = None  # torch's context that keeps a saved tensor's version while it is refilled

    def allocate(self, size, *, dtype, device):
        outputs = getattr(self.fsdp_param, "all_gather_outputs", None) or []
        if len(outputs) == 1 and _is_whole(outputs[0], size, dtype, device) and _dim0(self.fsdp_param):
            output = outputs[0]
            storage = output.untyped_storage()
            if storage.size() != output.numel() * output.element_size():  # freed by the last reshard
                storage.resize_(output.numel() * output.element_size())
            # Autograd saved the parameter in the forward; refilling its freed memory with the same values is
            # no mutation to it (FSDP's own copy-out says so the same way): its version is kept, from the
            # copy-in of this rank's shard (FSDP, before `__call__`) to the end of the broadcasts.
            self.refill = preserve_version_counter(output)
            return output
        return _empty(size, dtype, device)

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        refill, self.refill = self.refill, None
        with refill or nullcontext():
            all_gather_into_tensor(output_tensor, input_tensor, group)
        return None  # done: FSDP waits only on a returned Work


class ChunkedReduceScatter(ReduceScatter):
    """The input (FSDP's staging copy of the unit's gradients, or the adopted gradient itself) is released
    as soon as the collective returns, instead of when the next unit's reduce-scatter starts."""

    def allocate(self, size, *, dtype, device):
        buffer = _empty(size, dtype, device)
        buffer.adopts_gradient = True  # see _adopt_or_copy_in
        return buffer

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        reduce_scatter_tensor(output_tensor, input_tensor, op, group)
        input_tensor.untyped_storage().resize_(0)  # FSDP reads it no more (1-D mesh: no all-reduce after)
        return None


def use_chunked_collectives(module: FSDPModule) -> None:
    """Install the in-place collectives on one `fully_shard` unit (not recursive: call it on each)."""
    route_reduce_scatter_copy_in(_adopt_or_copy_in)
    params = fsdp_unit_params(module)
    module.set_custom_all_gather(ChunkedAllGather(params[0] if len(params) == 1 else None))
    module.set_custom_reduce_scatter(ChunkedReduceScatter())
