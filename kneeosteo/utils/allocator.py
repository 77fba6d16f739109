"""Keep freed memory in the process instead of handing it back to the kernel (glibc malloc).

A training step allocates and frees activations of hundreds of MB. glibc serves blocks that big
with fresh ``mmap`` calls and returns them with ``munmap`` when freed, so every step faults every
page in again and the kernel zeroes it: on the AVX2 fp32 path that was a quarter of the step's
CPU time (``benchmarks/bench_fp32_path.py``, idle, forced AVX2 fp32: about 200,000 minor page
faults per step, 28% of the CPU time in the kernel). Telling malloc never to use ``mmap`` for large blocks and never to
trim the heap makes the second step reuse the first step's pages: no faults, no kernel time, the
same values (only where memory comes from changes). The cost: the process keeps its peak heap
until it exits, which a training run or a server reaches anyway.

``kneeosteo``'s command line calls :func:`keep_freed_memory` once at start, and so does
``kneeosteo.training.trainer.train`` for library callers (the setting is per process); set
``KNEEOSTEO_MALLOC=system`` to keep glibc's defaults. Elsewhere than glibc (macOS, musl, Windows)
it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["keep_freed_memory"]

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the settings (once per process); True when glibc accepted all three."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("KNEEOSTEO_MALLOC", "").lower() == "system" or platform.system() != "Linux":
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = [mallopt(M_MMAP_MAX, 0), mallopt(M_TRIM_THRESHOLD, 2**31 - 1), mallopt(M_TOP_PAD, 256 * 2**20)]
    _applied = all(v == 1 for v in ok)
    return _applied
