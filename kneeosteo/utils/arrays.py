"""Array checks, written once, for the metrics (:mod:`kneeosteo.evaluation`) and the trust
estimators (:mod:`kneeosteo.trust`): 0/1 labels, class indices, finite values, probabilities,
(n, K) matrices and equal lengths. Each returns the checked array as numpy and raises
:class:`~kneeosteo.errors.ArrayError` (a ``DataError`` and a ``ValueError``) whose one line names
the argument and what is wrong with it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kneeosteo.errors import ArrayError

__all__ = [
    "as_binary_labels",
    "as_class_indices",
    "as_matrix",
    "as_scores_and_labels",
    "as_values",
    "check_nonempty",
    "check_probabilities",
    "check_same_length",
]


def as_values(values: Any, name: str, *, flatten: bool = False, allow_inf: bool = False) -> np.ndarray:
    """``values`` as a float64 vector, one value per case, with no NaN (and no +-inf unless
    ``allow_inf``). A (n, 1) column is accepted as n values; ``flatten`` accepts any shape."""
    arr = np.asarray(values, dtype=np.float64)
    if flatten:
        arr = arr.ravel()
    elif arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ArrayError(f"{name}: expected one value per case, got an array of shape {arr.shape}")
    bad = np.isnan(arr) if allow_inf else ~np.isfinite(arr)
    if bad.any():
        raise ArrayError(f"{name}: {int(bad.sum())} value(s) are NaN{'' if allow_inf else ' or inf'}")
    return arr


def check_probabilities(p: np.ndarray, name: str) -> np.ndarray:
    """``p`` (finite floats, any shape) unchanged if every entry lies in [0, 1]."""
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ArrayError(f"{name} must lie in [0, 1], got range [{p.min()}, {p.max()}]")
    return p


def as_binary_labels(values: Any, name: str, *, flatten: bool = False) -> np.ndarray:
    """``values`` as an int64 vector of 0 (negative) and 1 (positive); booleans are accepted.
    ``flatten`` accepts any shape."""
    arr = np.asarray(values)
    if flatten:
        arr = arr.ravel()
    if arr.ndim != 1:
        raise ArrayError(f"{name}: expected one label per case, got an array of shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if arr.size and not np.all(np.isin(arr, (0, 1))):
        raise ArrayError(f"{name} must contain only 0/1 labels, got values {np.unique(arr)[:10]}")
    return arr.astype(np.int64)


def as_class_indices(values: Any, k: int, name: str, n: int | None = None) -> np.ndarray:
    """``values`` as a non-empty int64 vector of class indices in [0, k) (``n`` of them if given);
    booleans are accepted."""
    arr = np.asarray(values)
    if arr.ndim != 1 or (n is not None and arr.size != n):
        want = "one class index per case" if n is None else f"{n} class indices"
        raise ArrayError(f"{name}: expected {want}, got an array of shape {arr.shape}")
    check_nonempty(arr, name)
    if arr.dtype == bool:
        arr = arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.mod(arr, 1) == 0):
        raise ArrayError(f"{name} must hold integer class indices in [0, {k}), got {arr.dtype} values {arr[:5]}")
    if arr.min() < 0 or arr.max() >= k:
        raise ArrayError(f"{name} must hold class indices in [0, {k}), got values {np.unique(arr)[:10]}")
    return arr.astype(np.int64)


def as_matrix(values: Any, name: str, *, shape: tuple[int, int] | None = None, softmax: bool = False) -> np.ndarray:
    """``values`` as a finite (n, K) float64 matrix: of exactly ``shape`` if given, else K >= 2;
    ``softmax``: rows of probabilities in [0, 1] that sum to 1 (within 1e-3)."""
    arr = np.asarray(values, dtype=np.float64)
    if shape is not None and arr.shape != shape:
        raise ArrayError(f"{name} must have shape (n, K) = {shape}, got {arr.shape}")
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise ArrayError(f"{name}: expected an (n, K) array with K >= 2 classes, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ArrayError(f"{name}: {int(np.sum(~np.isfinite(arr)))} value(s) are NaN or inf")
    if softmax:
        check_probabilities(arr, name)
        sums = arr.sum(axis=1)
        if not np.allclose(sums, 1.0, atol=1e-3):
            worst = int(np.argmax(np.abs(sums - 1.0)))
            raise ArrayError(f"each row of {name} must sum to 1 (softmax outputs); row {worst} sums to {sums[worst]}")
    return arr


def check_nonempty(arr: np.ndarray, name: str) -> np.ndarray:
    """``arr`` unchanged if it holds at least one case."""
    if arr.size == 0:
        raise ArrayError(f"{name} is empty: nothing to score or fit on zero cases")
    return arr


def check_same_length(**arrays: np.ndarray) -> None:
    """All ``arrays`` (keyword = the argument's name) hold the same number of cases."""
    sizes = {name: len(a) for name, a in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise ArrayError(
            ", ".join(sizes)
            + " must have equal lengths: "
            + ", ".join(f"{name} has {n} items" for name, n in sizes.items())
        )


def as_scores_and_labels(
    scores: Any, labels: Any, *, both_classes: bool = True, name: str = "scores"
) -> tuple[np.ndarray, np.ndarray]:
    """Scores (:func:`as_values`) and their 0/1 labels checked together: equal lengths, not empty;
    ``both_classes`` demands at least one case of each class."""
    s, y = as_values(scores, name), as_binary_labels(labels, "labels")
    check_same_length(**{name: s, "labels": y})
    check_nonempty(s, name)
    if both_classes and y.min() == y.max():
        raise ArrayError(f"{name}: needs images of both classes, got only class {int(y[0])}")
    return s, y
