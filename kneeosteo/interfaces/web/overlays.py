"""Pictures for the page: the decoded radiograph and its Grad-CAM / attention overlays as PNG
bytes, colour-mapped like `kneeosteo explain` (jet, alpha 0.45). Everything is shrunk to a
display size first, so a 5000x4000 radiograph does not become a 60 MB RGBA float array."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from kneeosteo.data.preprocess import scaled_size
from kneeosteo.data.reader import to_uint8

__all__ = ["DISPLAY_SIDE", "encode_b64", "grey_png", "overlay_png"]

DISPLAY_SIDE = 768
ALPHA = 0.45


def _fit(a: np.ndarray, side: int = DISPLAY_SIDE) -> np.ndarray:
    h, w = a.shape
    if max(h, w) <= side:
        return np.asarray(a, np.float32)
    nh, nw = scaled_size(h, w, side)
    return np.asarray(Image.fromarray(np.ascontiguousarray(a, np.float32)).resize((nw, nh), Image.Resampling.BILINEAR))


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def grey_png(pixels: np.ndarray) -> bytes:
    """The canonical greyscale image as the model saw it (so DICOM shows in a browser too)."""
    return _png(to_uint8(_fit(pixels)))


def overlay_png(pixels: np.ndarray, heat: np.ndarray, stretch: bool = False) -> bytes:
    """``heat`` (H, W) in [0, 1] over the radiograph; ``stretch`` scales the colours to this map's
    own range (the attention module's sigmoid weights often span a narrow band)."""
    from matplotlib import colormaps

    grey, heat = _fit(pixels), _fit(heat)
    if stretch:
        lo, hi = float(heat.min()), float(heat.max())
        heat = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    colour = colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3]
    blend = (1 - ALPHA) * grey[..., None] + ALPHA * colour
    return _png(to_uint8(blend))


def encode_b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")
