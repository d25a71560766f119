"""Keeps the C allocator from handing TensorFlow's large buffers back to
the system every step.

TensorFlow on CPU allocates and frees tensors of tens to hundreds of MB
every training step (the expert buffers, their gradients). glibc's malloc
serves every block above its mmap threshold (128 KB, growing to at most
32 MB) with a fresh `mmap` and returns it with `munmap` on free, so each
step touches its big tensors' pages for the first time again: page faults
and zeroing that can cost more than the matmuls. tcmalloc and jemalloc keep
freed memory for reuse; so does glibc once told to (`mallopt`): no mmap for
large blocks, and no trimming of the heap's top. That needs no preloaded
library and no environment variable set before the process starts, so a
job can do it first thing (the trainers and benchmarks do).

The price is memory: freed blocks stay in the process (the peak stays the
process's resident size), as with tcmalloc.
"""

import ctypes
import ctypes.util

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# The largest int mallopt takes: never trim the heap.
_NEVER = 2**31 - 1


def _loaded_allocator():
    """The name of a replacement allocator mapped into this process, or
    None (glibc's own malloc)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            mapped = maps.read()
    except OSError:
        return None
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if f"lib{name}" in mapped:
            return name
    return None


def tune_malloc():
    """Makes glibc's malloc keep freed memory for reuse, unless another
    allocator is loaded (then it does nothing).

    Call it early in a process that trains on CPU; it affects every later
    allocation of the process.

    Returns:
        What the process allocates with: "tcmalloc" / "jemalloc" /
        "mimalloc" (preloaded, left alone), "glibc (tuned)", or "unknown"
        (no glibc here, e.g. another C library; nothing done).
    """
    loaded = _loaded_allocator()
    if loaded is not None:
        return loaded
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "unknown"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Large blocks from the heap instead of mmap, and a heap that never
    # shrinks, so that freed blocks are reused by the next step.
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, _NEVER)):
        return "unknown"
    return "glibc (tuned)"
