"""The CPU's instruction-set flags, read once from Linux's ``/proc/cpuinfo`` without importing torch
(the torch-free resize of ``data/resample.py`` needs them as much as ``utils/compute_path.py``)."""

from __future__ import annotations

import functools


@functools.cache
def cpu_flags() -> frozenset[str]:
    """Every flag the first CPU lists (``avx2``, ``fma``, ``avx512f``...); empty where there is no
    ``/proc/cpuinfo`` (not Linux)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()
