"""The bone region of a knee radiograph, found without labels, and the occluded views built on it.

The shortcut probes (:mod:`kneeosteo.evaluation.probes`) ask a trained model about two edited
copies of each test film: the bone hidden (only the film's border region shows; a model that
still ranks these is reading the source of the film) and only the bone shown.

The region is found with classic image processing, so that no label can leak into it
(:func:`bone_mask`): at ``MASK_SIDE`` px, white bands along the edges (burnt-in bars) are blacked
out; a Gaussian blur (sigma 1% of the side); Otsu's threshold #1 separates the film's background
from the body; Otsu #2 on the body pixels (saturated ones left out) separates soft tissue from
bone; a morphological opening; the connected components with at least 10% of the largest one's
area are kept (at most 4: femur, tibia, fibula, patella); holes are filled; the region is dilated
by 3% of the side. On KOP the median mask covers 0.39 of the film (range 0.11-0.59); its known
failure is a tibia darker than Otsu #2 (only the femur is found), examples in docs/shortcut.md.

Prediction asks for a film's mask twice (the ``bone`` preset's input, then the film check that
counts bone regions side by side, :func:`kneeosteo.trust.domain.bone_columns`): the last
``MASK_CACHE`` masks are kept at ``MASK_SIDE`` px, keyed by a digest of the image's bytes, so the
second call only scales the kept mask to the image (the same mask: it is a function of those bytes).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import cv2
import numpy as np

from kneeosteo.data.reader import to_uint8

__all__ = ["MASK_SIDE", "OCCLUSIONS", "bone_mask", "occlude"]

MASK_SIDE = 512  # the mask is computed at this longest side, then scaled to the image
MASK_CACHE = 32  # masks kept (at MASK_SIDE px, ~0.25 MB each): more than a default predict batch (16)
_kept: OrderedDict[tuple, np.ndarray | None] = OrderedDict()
_kept_lock = threading.Lock()
OCCLUSIONS = ("hide_bone", "only_bone")  # probe (a), probe (b)


def _clear_edge_bands(small: np.ndarray) -> np.ndarray:
    """Black out white bands (rows/columns >= 80% at >= 240) running in from the film's edges."""
    out = small.copy()
    bright = small >= 240
    for axis in (0, 1):
        share = bright.mean(axis=1 - axis)  # per row (axis 0) / per column (axis 1)
        for order in (range(share.size), range(share.size - 1, -1, -1)):
            for i in order:
                if share[i] < 0.8:
                    break
                if axis == 0:
                    out[i, :] = 0
                else:
                    out[:, i] = 0
    return out


def _fill_holes(m: np.ndarray) -> np.ndarray:
    """Flood the background from the border; what the flood does not reach is inside the region."""
    ff = np.pad(m, 1)
    cv2.floodFill(ff, np.zeros((ff.shape[0] + 2, ff.shape[1] + 2), np.uint8), (0, 0), 1)
    return m | (1 - ff[1:-1, 1:-1])


def bone_mask(pixels: np.ndarray) -> np.ndarray:
    """Label-free bone region of a canonical greyscale image (float [0, 1] or uint8, H x W): a
    boolean array of the same shape. An image without a body/bone contrast (blank, uniform, too
    small) gets an all-True mask, so occluding it hides everything or nothing, never guesses."""
    arr = np.ascontiguousarray(pixels)
    h, w = arr.shape
    key = (arr.dtype.str, arr.shape, hashlib.blake2b(arr.data, digest_size=16).digest())
    with _kept_lock:
        hit = key in _kept
        if hit:
            _kept.move_to_end(key)
            small = _kept[key]
    if not hit:
        small = _small_mask(arr)
        with _kept_lock:
            _kept[key] = small
            while len(_kept) > MASK_CACHE:
                _kept.popitem(last=False)
    if small is None:
        return np.ones((h, w), dtype=bool)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)


def _small_mask(pixels: np.ndarray) -> np.ndarray | None:
    """The mask at ``MASK_SIDE`` px (uint8 0/1); None where the image has no body/bone contrast."""
    img = pixels if pixels.dtype == np.uint8 else to_uint8(pixels)
    h, w = img.shape
    scale = MASK_SIDE / max(h, w)
    small = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    side = max(small.shape)
    small = _clear_edge_bands(small)
    blurred = cv2.GaussianBlur(small, (0, 0), 0.01 * side)
    t1, _ = cv2.threshold(blurred, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    body = blurred[(blurred > t1) & (small < 250)]
    if body.size < 10:
        return None
    t2, _ = cv2.threshold(body.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    m = (blurred > t2).astype(np.uint8)
    k = max(3, int(0.01 * side) | 1)
    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    n, lab, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n <= 1:
        return None
    areas = stats[1:, cv2.CC_STAT_AREA].astype(float)
    order = np.argsort(-areas)
    keep = [i + 1 for i in order[:4] if areas[i] >= 0.1 * areas[order[0]]]
    m = _fill_holes(np.isin(lab, keep).astype(np.uint8))
    d = max(3, int(0.03 * side) * 2 + 1)
    m = cv2.dilate(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (d, d)))
    return m


def occlude(pixels: np.ndarray, mask: np.ndarray, kind: str) -> np.ndarray:
    """``hide_bone`` (probe a): the bone region filled with the median grey of the rest of the film,
    so only the border region shows; ``only_bone`` (probe b): everything outside it black."""
    if kind not in OCCLUSIONS:
        raise ValueError(f"unknown occlusion {kind!r} (choose from {OCCLUSIONS})")
    out = pixels.copy()
    if kind == "hide_bone":
        rest = pixels[~mask]
        out[mask] = np.median(rest) if rest.size else 0
    else:
        out[~mask] = 0
    return out
