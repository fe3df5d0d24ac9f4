"""Keep freed host memory in the process instead of handing it back to the kernel after every tensor.

glibc's malloc returns the top of its heap to the kernel as soon as more than 128 KiB of it is free, and
grows it again, page fault by page fault, on the next allocation. A forward pass on CPU allocates and frees
the same activations and logits over and over, so with the defaults the kernel zeroes those pages again for
every batch: in a study's CPU run system time was 40% of all CPU time (19 million minor page faults in a
30-step run with six evaluations). A top pad of 512 MiB makes malloc grow the heap in steps of that size and
keep that much free at its top, which removed 99% of the faults and 40% of the wall time there, for about
160 MiB more resident memory (docs/benchmarks.md, "CPU runs: freed heap kept").

Only glibc has `mallopt`; elsewhere, or when the user set `MALLOC_TOP_PAD_` themselves, nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TOP_PAD = -2  # glibc's malloc.h
TOP_PAD_BYTES = 512 * 1024 * 1024
USER_SETTING = "MALLOC_TOP_PAD_"


def keep_freed_heap(top_pad: int = TOP_PAD_BYTES) -> bool:
    """Set glibc's top pad (once, at process start). True when it was set here."""
    if USER_SETTING in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_TOP_PAD, top_pad) == 1
