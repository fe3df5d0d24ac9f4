"""DeepSpeed's CPU shared-memory all-reduce leaves its segments in /dev/shm; release them once mapped.

When every rank runs on one machine (the `deepspeed` launcher sets LOCAL_SIZE to the world size),
`deepspeed.init_distributed` creates one POSIX shared-memory segment per rank,
`deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`, maps every peer's and never unlinks
them (DeepSpeed 0.19, `ops/csrc/cpu/comm/shm.cpp`: `shm_initialize` calls `shared_create` and
`shared_open`; `shared_close`, the only `shm_unlink`, is never called). Each launch thus leaves world size
x 66 MiB of RAM-backed files behind until the node reboots: a shared node's /dev/shm fills launch by
launch. Once every rank has mapped every segment, each rank unlinks its own name. POSIX keeps a mapping
valid after its name is gone, so the all-reduce is unaffected, and the memory is freed when the last rank
exits, however it exits.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

SHM_DIR = Path("/dev/shm")  # where Linux keeps shm_open's names
SEGMENT_PREFIX = "deepspeed_allreduce_buffer"


def segment_path(rank: int) -> Path:
    """The shared-memory file DeepSpeed's `shm_initialize` creates for `rank` under this launch's address."""
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"{SEGMENT_PREFIX}_{os.getuid()}_{address}_{port}_{rank}"


def release_allreduce_segment(rank: int, barrier: Callable[[], None]) -> bool:
    """After `deepspeed.init_distributed`: wait until every rank has mapped every segment (`barrier`, called
    on every rank), then unlink this rank's own. True when there was one to unlink (the shm path is off when
    the ranks span machines)."""
    barrier()  # every rank's init has returned, so every peer segment is already mapped
    try:
        segment_path(rank).unlink()
    except FileNotFoundError:
        return False
    return True
