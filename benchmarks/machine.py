"""The machine a benchmark ran on, and its measured compute peak.

The peak is what a large dense matmul reaches in this process, with the threads the other
sections use: the practical ceiling every model's GFLOP/s is compared with. It is measured in
the same run as the models, so a loaded machine lowers both alike.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import time

from benchmarks.common import loadavg, now_iso

PACKAGES = ("torch", "torchvision", "onnx", "onnxruntime", "timm", "numpy", "pillow", "pydicom", "kneeosteo")


def _cpuinfo() -> dict:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                    break
    except OSError:
        pass
    from kneeosteo.utils.compute_path import cpu_flags

    return {"cpu_model": model, "cpu_flags": cpu_flags()}


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def bf16_native() -> bool:
    """Whether this CPU runs bf16 natively (AVX-512 BF16 / AMX, and PyTorch not capped at AVX2),
    as ``--precision auto`` decides; without it bf16 is emulated (converted to fp32 and back) and
    every bf16 number below measures the emulation, not the hardware."""
    from kneeosteo.utils.compute_path import bf16_native as native

    return native()


def describe() -> dict:
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    return {
        "date": now_iso(),
        "platform": platform.platform(),
        **_cpuinfo(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "memory_gb": _memory_gb(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "bf16_native": bf16_native(),
        "versions": _versions(),
        "loadavg": loadavg(),
    }


def matmul_peak(dtype: str = "fp32", n: int = 4096, reps: int = 5) -> dict:
    """Best and median GFLOP/s of an n x n x n matmul (2 n^3 FLOPs) in ``dtype``.

    ``int8`` uses torch._int_mm (int8 x int8 -> int32; counted as 2 n^3 ops) where this torch
    build has it on the CPU; otherwise the result says why not.
    """
    import torch

    g = torch.Generator().manual_seed(0)
    try:
        if dtype == "int8":
            a = torch.randint(-64, 64, (n, n), dtype=torch.int8, generator=g)
            b = torch.randint(-64, 64, (n, n), dtype=torch.int8, generator=g)
            fn = lambda: torch._int_mm(a, b)  # noqa: E731
        else:
            t = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
            a = torch.randn(n, n, generator=g).to(t)
            b = torch.randn(n, n, generator=g).to(t)
            fn = lambda: torch.mm(a, b)  # noqa: E731
        fn()  # warm-up (oneDNN/AMX kernel selection)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    except Exception as exc:  # e.g. no CPU kernel for _int_mm in this build
        return {"dtype": dtype, "n": n, "available": False, "reason": f"{type(exc).__name__}: {exc}"[:300]}
    flops = 2.0 * n**3
    times.sort()
    return {
        "dtype": dtype,
        "n": n,
        "available": True,
        "reps": reps,
        "best_gflops": round(flops / times[0] / 1e9, 1),
        "median_gflops": round(flops / times[len(times) // 2] / 1e9, 1),
        "threads": torch.get_num_threads(),
    }


# --quick on a CPU without native bf16: the emulated bf16 matmul runs ~100x slower than fp32
# (a 1024-wide one took 30 s of a 60-s smoke run), so it is measured once at this width; the
# code path is the same, the figure is marked emulated as in a full run.
QUICK_EMULATED_BF16 = (256, 1)
# A full run on such a CPU: a 4096-wide emulated bf16 matmul takes minutes per call (the peak
# measurement alone ran past 7 minutes with its 6 calls), so 1024 wide, twice: still the emulated
# kernel's rate, which is all an emulated figure can say.
FULL_EMULATED_BF16 = (1024, 2)


def peaks(quick: bool = False, native_bf16: bool | None = None) -> dict:
    n, reps = (1024, 3) if quick else (4096, 5)
    native = bf16_native() if native_bf16 is None else native_bf16
    out = {dt: matmul_peak(dt, n=n, reps=reps) for dt in ("fp32", "int8")}
    out["bf16"] = matmul_peak("bf16", *((n, reps) if native else QUICK_EMULATED_BF16 if quick else FULL_EMULATED_BF16))
    out["bf16"]["emulated"] = not native
    return {dt: out[dt] for dt in ("fp32", "bf16", "int8")}


def machine_section(quick: bool = False) -> dict:
    doc = describe()
    doc["peak"] = peaks(quick, doc["bf16_native"])
    doc["loadavg_after_peak"] = loadavg()
    return doc


if __name__ == "__main__":  # python -m benchmarks.machine: just print it
    import json

    print(json.dumps(machine_section(quick=True), indent=2))
