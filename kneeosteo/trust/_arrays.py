"""Input checks shared by the trust modules: 1-D finite scores and 0/1 labels of equal length."""

from __future__ import annotations

import numpy as np

from kneeosteo.errors import DataError

__all__ = ["as_labels", "as_scores", "as_scores_and_labels"]


def as_scores(values, name: str = "scores") -> np.ndarray:
    """``values`` as a finite float64 vector; a (n, 1) column is accepted and flattened."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DataError(f"{name}: expected one value per image, got an array of shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{name}: {int(np.sum(~np.isfinite(arr)))} value(s) are not finite")
    return arr


def as_labels(values, name: str = "labels") -> np.ndarray:
    """``values`` as an int vector of 0 (negative) and 1 (positive)."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"{name}: expected one label per image, got an array of shape {arr.shape}")
    if arr.size and not np.all(np.isin(arr, (0, 1))):
        raise DataError(f"{name}: labels must be 0 (negative) or 1 (positive)")
    return arr.astype(np.int64)


def as_scores_and_labels(scores, labels, *, both_classes: bool = True, name: str = "scores"):
    """Scores and labels checked together; ``both_classes`` demands at least one of each."""
    s, y = as_scores(scores, name), as_labels(labels)
    if s.shape != y.shape:
        raise DataError(f"{name}: {s.size} scores but {y.size} labels")
    if s.size == 0:
        raise DataError(f"{name}: no images to fit or score on")
    if both_classes and (y.min() == y.max()):
        raise DataError(f"{name}: needs images of both classes, got only class {int(y[0])}")
    return s, y
