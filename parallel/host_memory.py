"""Host memory that is freed goes back to the operating system.

glibc's malloc serves tensors below its mmap threshold from its heap, and raises that threshold
(up to 32 MiB) each time a larger block is freed. Sharded engines allocate and free many such
mid-sized tensors (gathered blocks, reduce buffers, one slice of a checkpoint after another), so the
heap fragments and a rank's resident memory stays at its transient peaks: measured on 4 CPU ranks
(benchmarks/load_memory.py), an FSDP rank kept ~1 model-size M more after one step than it used.
A fixed threshold makes every block of at least `threshold` bytes its own mapping, returned on free.

The threshold is glibc's own starting value, 128 KiB, held fixed: activations of short sequences are
smaller than 1 MiB (a 64-token hidden state of width 1024 is 256 KiB), and from a heap the ones freed
during a backward stayed resident (+0.15 M in that benchmark's step at a 1 MiB threshold, +0.03 M at
128 KiB). Smaller blocks (Python objects, small tensors) stay on the heap, where they are cheap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("ngdiff.parallel")

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers (malloc.h)
DEFAULT_THRESHOLD = 128 << 10


def return_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes; False (and nothing changed) without glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, threshold) == 1
    if not ok:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused")
    return ok
