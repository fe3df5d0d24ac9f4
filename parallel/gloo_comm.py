"""All-gather and reduce-scatter over gloo without a whole-tensor staging copy, for FSDP2 and ZeRO-3.

gloo's `all_gather_into_tensor` and `reduce_scatter_tensor` each allocate a scratch tensor the size of
the whole (unsharded) input or output, and FSDP2 keeps its reduce-scatter input alive until the next
unit's backward. On CPU all of that is host memory: for the largest unit (a 32k x 1024 embedding, a
sixth of a 194M model) it is one more whole copy of the unit per collective, measured with 4 ranks in
benchmarks/load_memory.py. The same collectives written as one `broadcast` (all-gather) or `reduce`
(reduce-scatter) per rank's chunk work in place on the engines' own buffers, and are faster on gloo
too. DeepSpeed's ZeRO-3 calls them through its backend's collective functions
(`parallel.compat.deepspeed.use_collectives`); FSDP2 through its private hook classes, which
`parallel.fsdp_gloo` subclasses. This module uses only public torch.distributed calls, so it imports on
every supported torch.

Exactness: the all-gather is a copy. The reduce-scatter adds the same terms; at 2 ranks the sum is
bitwise the one gloo's reduce-scatter gives, at more ranks the order of the additions may differ.
"""

from __future__ import annotations

import torch.distributed as dist


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
