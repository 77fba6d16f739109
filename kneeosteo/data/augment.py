"""The paper's offline augmentation (zoom, ROI crop, rotation), deterministic per seed.

Each training image gets ``copies`` extra versions (paper: 5, so 300 images become 1800); every
version combines a random ROI crop, a random zoom and a random rotation. The random stream is
seeded from (seed, image content id, copy index), so a version never depends on file order and
the same picture always gets the same versions. Validation and test images are never augmented.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from kneeosteo.data.preprocess import scaled_size

WORK_SIZE = 512  # longest side the augmentation works at; the networks see 224 px anyway


@dataclass(frozen=True)
class AugmentParams:
    copies: int = 5
    zoom: tuple[float, float] = (0.9, 1.2)  # <1 zooms out (black border), >1 zooms in
    crop_fraction: tuple[float, float] = (0.8, 1.0)  # side of the ROI crop, as a fraction of the image
    rotation: float = 15.0  # degrees, uniform in [-rotation, rotation]

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def _rng(seed: int, content_id: str, copy: int) -> np.random.Generator:
    return np.random.default_rng([seed, int(content_id[:15], 16), copy])


def shrink(pixels: np.ndarray, longest: int = WORK_SIZE) -> np.ndarray:
    if max(pixels.shape) <= longest:
        return pixels
    t = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None, None]
    size = scaled_size(*pixels.shape, longest)
    return F.interpolate(t, size=size, mode="bilinear", antialias=True)[0, 0].numpy()


def augment(pixels: np.ndarray, rng: np.random.Generator, p: AugmentParams) -> np.ndarray:
    """One random version: ROI crop, then zoom about the centre, then rotation (fill black)."""
    t = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None]
    _, h, w = t.shape
    f = rng.uniform(*p.crop_fraction)
    ch, cw = max(1, round(h * f)), max(1, round(w * f))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    t = TF.crop(t, top, left, ch, cw)
    zoom = rng.uniform(*p.zoom)
    angle = rng.uniform(-p.rotation, p.rotation)
    t = TF.affine(t, angle=float(angle), translate=[0, 0], scale=float(zoom), shear=[0.0, 0.0],
                  interpolation=TF.InterpolationMode.BILINEAR, fill=0.0)
    return t[0].clamp(0, 1).numpy()


def offline_versions(pixels: np.ndarray, content_id: str, seed: int, p: AugmentParams) -> list[np.ndarray]:
    """The ``p.copies`` extra versions of one training image (the original is not included)."""
    small = shrink(pixels)
    return [augment(small, _rng(seed, content_id, k), p) for k in range(1, p.copies + 1)]


def augment_batch(grey: torch.Tensor, rng: np.random.Generator, p: AugmentParams) -> torch.Tensor:
    """``--augment online``: a fresh version of each (1, S, S) input of a batch, every epoch.

    Works on the already resized inputs (cheap); the ROI crop becomes an equivalent zoom plus
    shift, so the output keeps its size.
    """
    out = torch.empty_like(grey)
    s = grey.shape[-1]
    for i in range(grey.shape[0]):
        f = rng.uniform(*p.crop_fraction)
        shift = [float(rng.uniform(-1, 1) * (1 - f) * s / 2) for _ in range(2)]
        out[i] = TF.affine(grey[i], angle=float(rng.uniform(-p.rotation, p.rotation)), translate=shift,
                           scale=float(rng.uniform(*p.zoom) / f), shear=[0.0, 0.0],
                           interpolation=TF.InterpolationMode.BILINEAR, fill=0.0)
    return out
