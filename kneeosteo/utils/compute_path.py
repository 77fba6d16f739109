"""Which arithmetic path this process takes on the CPU, said in one place.

The same seed gives identical results on the same path (instruction set PyTorch dispatches to,
the oneDNN cap, precision), not across paths: an AVX2 fp32 machine and an AVX-512 bf16 machine
train slightly different models from identical inputs. Every run records its path
(``config.json`` record ``environment``), every ``metrics.json`` the training and scoring
paths, and every ``reproduce`` table the paths of its cells.

Forcing the AVX2 path on a bigger CPU (to measure what a CPU without AVX-512 does):
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` and ``--precision fp32``.
"""

from __future__ import annotations

import os

import torch

from kneeosteo.utils.cpuinfo import cpu_flags as all_cpu_flags

__all__ = ["CPU_FLAGS", "bf16_native", "cells_paths", "compute_path", "cpu_flags", "path_label"]

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> list[str]:
    """The instruction-set flags of ``CPU_FLAGS`` this CPU reports (Linux ``/proc/cpuinfo``)."""
    present = all_cpu_flags()
    return [f for f in CPU_FLAGS if f in present]


def _capped() -> bool:
    """PyTorch kept below AVX-512 (``ATEN_CPU_CAPABILITY``) or oneDNN below its bf16 ISAs."""
    capability = torch.backends.cpu.get_cpu_capability()
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return capability in ("DEFAULT", "NO AVX", "AVX2") or bool(
        isa and not any(k in isa for k in ("BF16", "AMX", "ALL", "DEFAULT"))
    )


def bf16_native(flags: list[str] | None = None) -> bool:
    """AVX512-BF16 or AMX in the CPU flags, and PyTorch allowed to use them; capped at AVX2 (to
    measure the path a CPU without bf16 takes) bf16 is emulated, so ``--precision auto`` means fp32."""
    if _capped():
        return False
    flags = cpu_flags() if flags is None else flags
    if flags:
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return "AMX" in torch.backends.cpu.get_cpu_capability()


def compute_path() -> dict:
    """This process's path: PyTorch's CPU capability, the oneDNN cap, the CPU flags, native bf16."""
    flags = cpu_flags()  # one read of /proc/cpuinfo
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA") or None,
        "cpu_flags": flags,
        "bf16_native": bf16_native(flags),
        "forced_below_cpu": _capped() and any(f.startswith(("avx512", "amx")) for f in flags),
    }


def cells_paths(records: list[dict]) -> dict[str, int]:
    """How many runs (their config.json records) trained on each path, e.g. ``{"bf16 on AVX512": 35}``."""
    out: dict[str, int] = {}
    for r in records:
        label = path_label(r.get("autocast"), (r.get("environment") or {}).get("cpu_capability"))
        out[label] = out.get(label, 0) + 1
    return out


def path_label(precision: str | None, capability: str | None) -> str:
    """``"bf16 on AVX512"``-style label for tables (``precision`` as runs record it: fp32 or torch.bfloat16)."""
    p = "bf16" if precision is not None and ("bfloat16" in str(precision) or str(precision) == "bf16") else "fp32"
    return f"{p} on {capability or 'unknown ISA'}"
