"""Freed activations kept by the C allocator instead of handed back to the OS (glibc's malloc).

glibc serves a block of 128 KiB and more (the threshold grows with what the process frees, up to 32
MiB) with a fresh mmap and unmaps it when freed, and gives the top of its heaps back to the OS too.
A step's activations are such blocks ([tokens, intermediate] per layer), allocated and freed again
every layer of every step: each time, the kernel maps zeroed pages anew and every first touch of a
page faults. Measured on a 4,096-token bfloat16 prefill of the bench model (2-core Xeon): 278 ms a
step, of which the linears 128 ms, silu 30 ms, the multiply after it 28 ms; with the blocks kept,
217 ms, 97, 14 and 16. vLLM gets the same by preloading tcmalloc.

`keep_freed_memory` sets the mmap threshold to glibc's most (32 MiB: larger blocks are still
mapped, as a block that size is rare and its page faults are small beside its use) and turns
trimming off. The process then holds its peak of freed blocks for reuse rather than returning it:
at most the largest step's transient activations, which the KV budget already leaves room for.
Elsewhere than glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper bound for M_MMAP_THRESHOLD on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
NO_TRIM = (1 << 31) - 1  # an int, as mallopt takes it: no heap ever has this much free at its top

_done = threading.Event()


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to keep freed blocks for reuse (once per process); False where it cannot
    (not glibc, or mallopt refused)."""
    if _done.is_set():
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc: its allocator has its own policy
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and mallopt(M_TRIM_THRESHOLD, NO_TRIM)):
        log.info("glibc's mallopt refused the thresholds; freed activations go back to the OS each step")
        return False
    _done.set()
    return True
