"""The ONNX Runtime engine's preprocessing without torch (issue 29): PyTorch's antialiased bilinear
resize in NumPy (:mod:`kneeosteo.data.resample`) and :meth:`Preprocess.array` give training's
values bit for bit, under each PyTorch CPU kernel (AVX-512 or native here, AVX2, DEFAULT). The
bundled model's probabilities through both forms: ``tests/test_startup.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import imagegen as g
from kneeosteo.data.preprocess import Preprocess
from kneeosteo.data.resample import _fma32, resize_bilinear_aa, torch_rounding
from kneeosteo.utils.cpuinfo import cpu_flags

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(
    torch_rounding() is None, reason="not x86-64: the array form calls PyTorch itself for the resize"
)

# (in h, in w, out h, out w): shrinking by 1-15x (a film to 224 px), enlarging, one side only,
# one pixel, and a row or column of one
CASES = [
    (1994, 2430, 184, 224),
    (2577, 1733, 224, 151),
    (300, 2000, 300, 224),
    (2000, 300, 224, 300),
    (300, 500, 134, 500),
    (100, 80, 224, 179),
    (57, 1000, 13, 224),
    (1, 1, 224, 224),
    (5, 3000, 1, 224),
    (224, 224, 224, 224),
]


def _torch_resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(img)[None, None]
    return F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy()


def _images(seed: int = 0):
    rng = np.random.default_rng(seed)
    for h, w, oh, ow in CASES:
        img = rng.random((h, w), dtype=np.float32)
        yield img, (oh, ow)
        yield np.rint(img * 255).astype(np.float32) / 255, (oh, ow)  # an 8-bit film's grey levels
    for _ in range(40):  # sizes at random
        h, w = (int(v) for v in rng.integers(1, 1200, 2))
        oh, ow = (int(v) for v in rng.integers(1, 300, 2))
        yield rng.random((h, w), dtype=np.float32), (oh, ow)


def test_resize_equals_torch_bit_for_bit():
    """Under this process's PyTorch kernel; a step in another order or another rounding (a plain
    product where the kernel fuses, a float64 weight) leaves some pixels one float32 step off."""
    rounding = torch_rounding()
    for img, size in _images():
        want = _torch_resize(img, size)
        got = resize_bilinear_aa(img, size, rounding)
        assert got.dtype == np.float32 and got.shape == size
        assert np.array_equal(got, want), f"{img.shape} -> {size}: {int((got != want).sum())} pixels differ"


_PROBE = """
import json, numpy as np, torch, torch.nn.functional as F
from kneeosteo.data.resample import resize_bilinear_aa, torch_rounding
rng = np.random.default_rng(1)
rounding, bad = torch_rounding(), []
for _ in range(30):
    h, w = (int(v) for v in rng.integers(1, 1500, 2))
    oh, ow = (int(v) for v in rng.integers(1, 300, 2))
    img = rng.random((h, w), dtype=np.float32)
    want = F.interpolate(torch.from_numpy(img)[None, None], size=(oh, ow), mode="bilinear", antialias=True)[0, 0].numpy()
    if not np.array_equal(resize_bilinear_aa(img, (oh, ow), rounding), want):
        bad.append([h, w, oh, ow])
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "rounding": rounding, "bad": bad}))
"""


@pytest.mark.parametrize("capability, rounding", [("default", "rounded"), ("avx2", "fused4")])
def test_resize_equals_each_torch_kernel(capability, rounding):
    """The DEFAULT kernel rounds every product, the AVX2 one fuses some: the rule that picks the
    rounding from ATEN_CPU_CAPABILITY and the CPU flags picks the kernel's."""
    if capability == "avx2" and not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("this CPU has no AVX2/FMA kernel")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ATEN_CPU_CAPABILITY": capability}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["capability"] == capability.upper() and out["rounding"] == rounding
    assert out["bad"] == [], f"sizes where NumPy and PyTorch's {capability} kernel differ: {out['bad']}"


def test_fused_multiply_add_rounds_once():
    """1 + 2^-23 + (1 + 2^-15)(1 - 2^-15) 2^-24: its float64 sum falls on a float32 tie that the
    exact value lies below, so rounding the float64 sum (twice rounded) goes one step too far."""
    acc = np.array([1 + 2.0**-23], np.float32)
    v = np.array([(1 + 2.0**-15) * 2.0**-12], np.float32)
    w = np.array([(1 - 2.0**-15) * 2.0**-12], np.float32)
    twice = (acc.astype(np.float64) + v.astype(np.float64) * w.astype(np.float64)).astype(np.float32)
    assert twice[0] == np.float32(1 + 2.0**-22)  # the trap is real
    assert _fma32(acc, v, w)[0] == np.float32(1 + 2.0**-23)


def _films():
    yield g.knee_film()  # 240 x 480, one knee
    yield g.two_knee_film(g.knee_film(), g.knee_film(seed=1), 30)
    yield g.picture(640, 300, variant=2).astype(np.float32) / 255  # wide
    yield g.picture(200, 700, variant=3).astype(np.float32) / 255  # tall
    yield np.rint(g.knee_film(width=900, height=1400, joint=(450, 600), plateau=300) * 255) / 255


@pytest.mark.parametrize("preset", ["paper", "robust", "bone", "knee"])
@pytest.mark.parametrize("clahe", [False, True])
def test_array_form_equals_the_torch_form(preset, clahe):
    """``Preprocess.array`` (ONNX Runtime's input) is ``Preprocess.__call__`` (training's and the
    torch engines') as float32, exactly; per knee as well for a knee run."""
    prep = Preprocess(preset, 96 if preset == "knee" else 224, clahe=clahe)
    for film in _films():
        want = prep(film).numpy()
        got = prep.array(film)
        assert got.dtype == np.float32 and np.array_equal(got, want), f"{preset} clahe={clahe} {film.shape}"
        search, views = prep.knee_views(film)
        search_a, views_a = prep.knee_views_array(film)
        assert search_a == search and len(views_a) == len(views)
        assert all(np.array_equal(a, t.numpy()) for a, t in zip(views_a, views))
