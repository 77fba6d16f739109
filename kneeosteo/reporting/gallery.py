"""The error gallery: which test images to show, and each one's three panels (the film, Grad-CAM
over it, the attention module's spatial map over it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from PIL import Image

__all__ = ["Case", "panels", "select_cases"]


@dataclass(frozen=True)
class Case:
    path: str
    label: int  # 1 = positive class
    probability: float
    prediction: int

    @property
    def kind(self) -> str:
        if self.label == self.prediction:
            return "true positive" if self.label else "true negative"
        return "false negative" if self.label else "false positive"

    @property
    def correct(self) -> bool:
        return self.label == self.prediction


def select_cases(rows: list[dict], correct: int = 4) -> list[Case]:
    """Every wrong test prediction (false negatives first, the most confident miss first; then
    false positives, most confident first), then up to ``correct`` right ones: the most confident
    true positives and true negatives, half each."""
    cases = [Case(r["path"], int(r["label"]), float(r["probability"]), int(r["prediction"])) for r in rows]
    fn = sorted((c for c in cases if c.kind == "false negative"), key=lambda c: c.probability)
    fp = sorted((c for c in cases if c.kind == "false positive"), key=lambda c: -c.probability)
    tp = sorted((c for c in cases if c.kind == "true positive"), key=lambda c: -c.probability)
    tn = sorted((c for c in cases if c.kind == "true negative"), key=lambda c: c.probability)
    half = correct // 2
    return fn + fp + tp[: correct - half] + tn[:half]


def _resize(a: np.ndarray, height: int) -> np.ndarray:
    h, w = a.shape[:2]
    width = max(1, round(w * height / h))
    return np.asarray(Image.fromarray(a).resize((width, height), Image.BILINEAR))


def _overlay(grey_u8: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    rgb = np.repeat(grey_u8[..., None], 3, axis=2).astype(np.float32)
    hot = colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255
    return (rgb * (1 - alpha) + hot * alpha).clip(0, 255).astype(np.uint8)


def panels(pixels: np.ndarray, gradcam: np.ndarray, attention: np.ndarray | None, height: int = 180) -> np.ndarray:
    """(H, W) greyscale in [0, 1] and maps on the same grid -> one RGB strip: film | Grad-CAM |
    attention (when the model has an attention module), ``height`` px tall, 6-px white gaps."""
    grey = (np.clip(pixels, 0, 1) * 255).astype(np.uint8)
    parts = [np.repeat(grey[..., None], 3, axis=2), _overlay(grey, gradcam)]
    if attention is not None:
        parts.append(_overlay(grey, attention))
    parts = [_resize(p, height) for p in parts]
    gap = np.full((height, 6, 3), 255, np.uint8)
    out = [parts[0]]
    for p in parts[1:]:
        out += [gap, p]
    return np.concatenate(out, axis=1)
