"""PyTorch's antialiased bilinear resize (``F.interpolate(mode="bilinear", antialias=True,
align_corners=False)`` on a float32 image) in NumPy, value for value, so that prediction with the
ONNX Runtime engine can preprocess a film without importing torch (issue 29: start-up time and
memory).

The algorithm is PyTorch's CPU kernel (``aten/src/ATen/native/cpu/UpSampleKernel.cpp``,
separable, Pillow's bounds): per output pixel a triangle filter stretched by the scale factor
(``support = scale`` when shrinking, 1 when enlarging), its float32 weights normalised to sum 1;
the rows are resampled first (the last axis), then the columns, each output a float32 sum over its
taps in order. What decides the last bit is how the compiled kernel rounds that sum, measured
against PyTorch (``tests/test_resample.py``):

- the AVX2 and AVX-512 kernels (every x86-64 CPU with AVX2 and FMA, unless PyTorch is capped
  below them) add the taps after the first in blocks of four as rounded products (``s + t*w``,
  two roundings), and the remaining ``(n - 1) % 4`` taps of each output with one rounding (a fused
  multiply-add);
- the ``DEFAULT`` kernel (``ATEN_CPU_CAPABILITY=default``, or a CPU without AVX2) rounds every
  product.

A fused multiply-add is computed exactly in float64 (the product of two float32 is exact there)
and rounded once to float32; where the float64 sum was itself rounded onto a float32 tie, the
exact remainder decides (:func:`_fma32`), so no double rounding is left. On a CPU that is not
x86-64 the kernel's rounding is not known here: :func:`torch_rounding` says None and the caller
uses PyTorch itself (:mod:`kneeosteo.data.preprocess`).
"""

from __future__ import annotations

import functools
import os
import platform

import numpy as np

from kneeosteo.utils.cpuinfo import cpu_flags

__all__ = ["resize_bilinear_aa", "torch_rounding"]

_BLOCK = 4  # taps added as rounded products per block by the vectorised kernels


def torch_rounding() -> str | None:
    """How the PyTorch kernel this process would run rounds its sums: ``"fused4"`` (AVX2 and
    AVX-512 kernels), ``"rounded"`` (the DEFAULT kernel), or None where it is not known (not x86-64)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower() == "default":
        return "rounded"
    return "fused4" if {"avx2", "fma"} <= cpu_flags() else "rounded"


@functools.lru_cache(maxsize=64)
def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n_out, K) source indices, (n_out, K) float32 weights (0 past each output's taps), (n_out,)
    tap counts: PyTorch's ``_compute_indices_min_size_weights_aa``, with its float32 and float64
    steps where C++ takes them (``float - float`` in float32, ``+ 0.5`` in float64)."""
    f32, f64 = np.float32, np.float64
    scale = f32(n_in / n_out)
    support = scale if scale >= 1.0 else f32(1.0)
    invscale = f64(f32(1.0 / f64(scale))) if scale >= 1.0 else f64(1.0)
    k_max = int(np.ceil(support)) * 2 + 1
    center = (f64(scale) * (np.arange(n_out, dtype=f64) + 0.5)).astype(f32)
    xmin = np.maximum(np.trunc((center - support).astype(f64) + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc((center + support).astype(f64) + 0.5).astype(np.int64), n_in)
    sizes = np.clip(xmax - xmin, 0, k_max)
    j = np.arange(k_max)
    idx = xmin[:, None] + j[None, :]
    x = np.abs((((idx.astype(f32) - center[:, None]).astype(f64) + 0.5) * invscale).astype(f32))
    live = j[None, :] < sizes[:, None]
    wts = np.where(live & (x < 1.0), f32(1.0) - x, f32(0.0)).astype(f32)
    total = np.zeros(n_out, f32)
    for k in range(k_max):  # summed in order, in float32
        total += wts[:, k]
    wts = np.where(total[:, None] != 0, wts / np.where(total == 0, f32(1.0), total)[:, None], wts).astype(f32)
    idx = np.where(live, idx, xmin[:, None])  # any valid index: its weight is never used
    return idx, wts, sizes


def _fma32(acc: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """float32 ``acc + v * w`` rounded once (a fused multiply-add). The float64 product is exact;
    the float64 sum ``s`` may not be, and where ``s`` fell exactly on a float32 tie the sign of
    its remainder (two-sum) picks the neighbour that the exact value rounds to."""
    a = acc.astype(np.float64)
    p = v.astype(np.float64) * w.astype(np.float64)
    s = a + p
    bits = s.view(np.uint64)
    tie = (bits & np.uint64(0x1FFFFFFF)) == np.uint64(0x10000000)
    if tie.any():
        bp = s - a
        err = (a - (s - bp)) + (p - bp)  # s + err == a + p exactly
        nudge = tie & (err != 0)
        s = np.where(nudge, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)


def _pass(src: np.ndarray, n_out: int, rounding: str) -> np.ndarray:
    """Resample the first axis of ``src`` (n_in, M) to n_out rows (whole rows gathered: fast)."""
    idx, wts, sizes = _taps(src.shape[0], n_out)
    w = wts[:, :, None]
    out = src[idx[:, 0]] * w[:, 0]
    rounded_upto = (sizes - 1) // _BLOCK * _BLOCK if rounding == "fused4" else sizes
    for j in range(1, idx.shape[1]):
        plain = np.flatnonzero((j < sizes) & (j <= rounded_upto))
        fused = np.flatnonzero((j < sizes) & (j > rounded_upto))
        if plain.size == n_out:
            out += src[idx[:, j]] * w[:, j]
        elif plain.size:
            out[plain] += src[idx[plain, j]] * w[plain, j]
        if fused.size:
            out[fused] = _fma32(out[fused], src[idx[fused, j]], w[fused, j])
    return out


def resize_bilinear_aa(img: np.ndarray, size: tuple[int, int], rounding: str = "fused4") -> np.ndarray:
    """(H, W) float32 -> ``size`` (h, w) float32, as PyTorch's antialiased bilinear resize gives it
    with the kernel whose ``rounding`` is given (:func:`torch_rounding`)."""
    if rounding not in ("fused4", "rounded"):
        raise ValueError(f"unknown rounding {rounding!r} (fused4 or rounded)")
    out = np.ascontiguousarray(img, dtype=np.float32)
    if out.ndim != 2:
        raise ValueError(f"expected an (H, W) image, got shape {out.shape}")
    h, w = size
    if w != out.shape[1]:  # the rows first (PyTorch's horizontal pass), as columns of the transpose
        out = _pass(np.ascontiguousarray(out.T), w, rounding).T
    if h != out.shape[0]:
        out = _pass(np.ascontiguousarray(out), h, rounding)
    return np.ascontiguousarray(out)
