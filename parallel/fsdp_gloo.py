"""FSDP2's all-gather and reduce-scatter hooks for gloo runs: `parallel.gloo_comm`'s in-place collectives.

FSDP2's hook classes (`AllGather`, `ReduceScatter`) are private and exist only in torch >= 2.9
(`parallel.compat.torch`): this module cannot be imported without them, so `parallel.fsdp` imports it only
for a gloo group on a torch that has them; elsewhere gloo's own collectives run, with a warning.

FSDP2 also stages a unit's unsharded gradients in the reduce-scatter input (a copy, then the gradients
are freed). Where a unit has one gradient already laid out as that input (dim-0 shards, no padding: an
embedding, an output projection), the input adopts the gradient's memory instead (`_adopt_or_copy_in`);
likewise such a unit's all-gather writes straight into its unsharded parameter (`ChunkedAllGather`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch.distributed.fsdp import FSDPModule

from parallel.compat.torch import (
    fsdp2_collective_bases,
    fsdp_reduce_scatter_copy_in,
    fsdp_unit_params,
    preserve_version_counter,
    route_reduce_scatter_copy_in,
)
from parallel.gloo_comm import all_gather_into_tensor, reduce_scatter_tensor

# FSDP2's private hook classes (torch >= 2.9); without them this module cannot be imported
AllGather, ReduceScatter = fsdp2_collective_bases()


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
