"""Keeping freed host memory in the process, for training on CPU.

glibc's malloc serves every allocation above its mmap threshold (at most
32 MB) with a fresh `mmap` and returns it to the kernel on free. A CPU
training step allocates and frees the same large activations every step (the
default model's logits alone are 8 x 256 x 4096 fp32, 34 MB), so each step
pays the page faults and the kernel's zeroing of those pages again: about
10 ms per such tensor on the 2-core machine, 8% of the default model's step
(docs/benchmarks.md). Serving them from the heap and never trimming it keeps
the pages mapped; the process then holds on to its peak memory, which a
training step reaches every step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def retain_freed_host_memory() -> bool:
    """Large allocations from the heap, freed memory kept; False where malloc is not glibc's."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: musl has no mallopt tunables worth setting
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # No mmap for large blocks (the heap serves them), and never give the heap's top back.
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
