"""One rank of test_gloo_comm: parallel.gloo_comm's collectives against torch's own on gloo.

torchrun --nproc_per_node=N tests/distributed/comm_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from parallel.gloo_comm import all_gather_into_tensor, reduce_scatter_tensor
from parallel.host_memory import return_freed_memory

NUMEL = 6 * 1024 * 1024  # 24 MiB in fp32, divisible by 2 and 3 ranks


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def extra_peak(fn) -> float:
    """Peak resident memory `fn` adds, in units of one NUMEL fp32 tensor."""
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = rss_kib("VmRSS")
    fn()
    return (rss_kib("VmHWM") - before) * 1024 / (NUMEL * 4)


def main(out: Path) -> None:
    return_freed_memory()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    grads = torch.randn(NUMEL)
    result = {}
    for name, op in (("sum", dist.ReduceOp.SUM), ("avg", dist.ReduceOp.AVG)):
        ours, theirs = torch.zeros(NUMEL // world), torch.zeros(NUMEL // world)
        dist.reduce_scatter_tensor(theirs, grads.clone(), op=op)
        scratch = grads.clone()

        def ours_op(output=ours, scratch=scratch, op=op):
            reduce_scatter_tensor(output, scratch, op)

        result[f"reduce_scatter_{name}_peak"] = extra_peak(ours_op)
        result[f"reduce_scatter_{name}_equal"] = torch.equal(ours, theirs)
        result[f"reduce_scatter_{name}_max_diff"] = (ours - theirs).abs().max().item()
    shard = torch.randn(NUMEL // world)
    ours, theirs = torch.zeros(NUMEL), torch.zeros(NUMEL)
    dist.all_gather_into_tensor(theirs, shard)
    result["all_gather_peak"] = extra_peak(lambda: all_gather_into_tensor(ours, shard))
    result["all_gather_equal"] = torch.equal(ours, theirs)
    inplace = torch.zeros(NUMEL)  # FSDP's layout: this rank's input is already its chunk of the output
    inplace.chunk(world)[rank].copy_(shard)
    all_gather_into_tensor(inplace, inplace.chunk(world)[rank])
    result["all_gather_inplace_equal"] = torch.equal(inplace, theirs)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
