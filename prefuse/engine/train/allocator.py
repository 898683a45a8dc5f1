"""The CPU allocator, on request: give freed activations back to the operating system during training.

PyTorch's CPU tensors come from glibc's malloc. Its mmap threshold is dynamic: each time a large block that was
mmap'ed is freed, the threshold rises to that block's size (up to 32 MiB), and from then on blocks below it are
carved from the heap, where a freed block in the middle cannot be returned to the system. A training step frees
and re-allocates thousands of activations of a few MiB in a different order each time, so the heap fragments and
the resident size climbs from step to step: on SmolLM2-135M with LoRA (8 pairs of <= 256 tokens, one thread) it
went 6.1 -> 7.2 -> 7.6 GiB over 3 steps. Fixing the threshold (which turns the dynamic rule off) keeps every block
of MMAP_THRESHOLD bytes or more in its own mapping, returned when freed, and a trim threshold of 0 returns the
heap's free top at once: the same run then peaks at 4.6 GiB, but every new block is fresh pages the kernel must
fault in and zero, and the step took 1.4x as long (`prefuse bench --task train` on that model: 53.8 s against
38.2 s). So it is opt-in: `PREFUSE_CPU_ALLOCATOR=release` for a machine short of memory; the default leaves glibc
as it is.

Only on Linux with glibc, and only when training on the CPU (CUDA tensors have their own caching allocator).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 256 * 1024
ENV = "PREFUSE_CPU_ALLOCATOR"
_applied = False


def return_freed_memory() -> bool:
    """With PREFUSE_CPU_ALLOCATOR=release: set glibc's mmap and trim thresholds for this process (once); True when
    they were set."""
    global _applied
    if _applied:
        return True
    if os.environ.get(ENV, "default").lower() != "release" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, 0))
    return _applied
