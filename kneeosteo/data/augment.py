"""The paper's offline augmentation (zoom, ROI crop, rotation), deterministic per seed.

Each training image gets ``copies`` extra versions (paper: 5, so 300 images become 1800); every
version combines a random ROI crop, a random zoom and a random rotation. The random stream is
seeded from (seed, image content id, copy index), so a version never depends on file order and
the same picture always gets the same versions. Validation and test images are never augmented.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
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
    t = TF.affine(
        t,
        angle=float(angle),
        translate=[0, 0],
        scale=float(zoom),
        shear=[0.0, 0.0],
        interpolation=TF.InterpolationMode.BILINEAR,
        fill=0.0,
    )
    return t[0].clamp(0, 1).numpy()


def offline_versions(pixels: np.ndarray, content_id: str, seed: int, p: AugmentParams) -> list[np.ndarray]:
    """The ``p.copies`` extra versions of one training image (the original is not included)."""
    small = shrink(pixels)
    return [augment(small, _rng(seed, content_id, k), p) for k in range(1, p.copies + 1)]


@dataclass(frozen=True)
class SourceAugment:
    """``source_augment``: random changes of what a film's source leaves in its pixels (compression,
    tone curve, sharpness, noise, which knee faces which way), drawn per image and batch so no
    source look is tied to a label. Each applies with probability ``p``."""

    p: float = 0.5
    jpeg_quality: tuple[int, int] = (25, 95)
    gamma: tuple[float, float] = (0.7, 1.4)
    blur_sigma: tuple[float, float] = (0.3, 1.2)  # px at the network's input size
    noise_std: tuple[float, float] = (0.005, 0.03)


def _jpeg_roundtrip(x: torch.Tensor, quality: int) -> torch.Tensor:
    """(1, H, W) in [0, 1] -> encoded as a greyscale JPEG at ``quality`` and decoded again."""
    buf = io.BytesIO()
    Image.fromarray((x[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()).save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255)[None]


def source_augment_batch(
    grey: torch.Tensor, rng: np.random.Generator, p: SourceAugment = SourceAugment()
) -> torch.Tensor:
    """(B, 1, S, S) in [0, 1] -> the same shape, each image with a random subset of: horizontal
    flip, gamma, JPEG re-encoding (Pillow's codec) at a random quality, Gaussian blur,
    Gaussian noise. Deterministic given ``rng``."""
    out = grey.float().clone()
    for i in range(out.shape[0]):
        x = out[i]
        if rng.random() < p.p:
            x = x.flip(-1)
        if rng.random() < p.p:
            x = x.clamp(0, 1) ** float(rng.uniform(*p.gamma))
        if rng.random() < p.p:
            q = int(rng.integers(p.jpeg_quality[0], p.jpeg_quality[1] + 1))
            x = _jpeg_roundtrip(x, q)
        if rng.random() < p.p:
            sigma = float(rng.uniform(*p.blur_sigma))
            x = TF.gaussian_blur(x, kernel_size=2 * int(3 * sigma + 0.5) + 1, sigma=sigma)
        if rng.random() < p.p:
            g = torch.Generator().manual_seed(int(rng.integers(0, 2**31)))
            x = x + torch.randn(x.shape, generator=g) * float(rng.uniform(*p.noise_std))
        out[i] = x.clamp(0, 1)
    return out.to(grey.dtype)


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
        out[i] = TF.affine(
            grey[i],
            angle=float(rng.uniform(-p.rotation, p.rotation)),
            translate=shift,
            scale=float(rng.uniform(*p.zoom) / f),
            shear=[0.0, 0.0],
            interpolation=TF.InterpolationMode.BILINEAR,
            fill=0.0,
        )
    return out
