"""Split-conformal prediction sets for the binary classifier (Vovk et al.; Angelopoulos & Bates).

Calibrated on held-out images never used to fit the model: each gets the non-conformity score
``1 - p(its true class)`` (``1 - p`` for a positive, ``p`` for a negative). A new image's set
holds every class whose score is no larger than the calibration quantile, so the true class
is in the set for at least ``coverage`` of exchangeable new images. A set of one class is a
confident answer; both classes (or, at low coverage, none) means "uncertain".

The p-values come from crepes' :class:`crepes.ConformalClassifier` (non-smoothed, so a
prediction is deterministic): a class is in the set when its p-value is ``>= 1 - coverage``.
``fit`` turns that rule into one stored quantile per class (``+inf`` when the calibration set is
too small for the coverage, so both classes are always in), and ``predict`` compares against it,
which gives exactly crepes' sets without keeping crepes on the serving path. With
``class_conditional=True`` (Mondrian) each class gets its own quantile from its own calibration
images, so coverage holds within each class, at the price of fewer images per quantile.
"""

from __future__ import annotations

import numpy as np

from kneeosteo.errors import ConfigError, DataError
from kneeosteo.utils.arrays import as_binary_labels, as_scores_and_labels, as_values

__all__ = ["CLASS_NAMES", "ConformalClassifier", "abstention_rate", "empirical_coverage", "nonconformity"]

CLASS_NAMES = ("normal", "osteoporosis")  # index 0 negative, 1 positive


def nonconformity(probabilities) -> np.ndarray:
    """(n, 2) scores: column c is ``1 - p(class c)``, i.e. ``[p, 1 - p]``."""
    p = as_values(probabilities, "probabilities")
    return np.stack([p, 1 - p], axis=1)


def _check_coverage(coverage: float) -> float:
    if not (isinstance(coverage, (int, float)) and 0 < coverage < 1):
        raise ConfigError(f"coverage must lie in (0, 1), such as 0.9; got {coverage!r}")
    return float(coverage)


def _crepes_quantile(cal_alphas: np.ndarray, coverage: float) -> float:
    """The largest score crepes still admits at ``coverage`` (``inf`` if it admits all).

    Inclusion is monotone in the score and changes only at calibration scores, so asking crepes
    for the p-values of the calibration scores themselves (and of one score above them all)
    finds the exact boundary."""
    from crepes import ConformalClassifier as _CrepesClassifier  # fitting only: not on predict's path

    cc = _CrepesClassifier().fit(cal_alphas)
    probe = np.append(np.unique(cal_alphas), np.inf)
    admitted = cc.predict_p(probe, smoothing=False) >= 1 - coverage
    if admitted[-1]:
        return float("inf")
    return float(probe[:-1][admitted[:-1]].max()) if admitted[:-1].any() else float("-inf")


class ConformalClassifier:
    """Split-conformal sets at ``coverage`` for calibrated positive-class probabilities."""

    def __init__(
        self, coverage: float = 0.9, class_conditional: bool = False, class_names: tuple[str, str] = CLASS_NAMES
    ):
        self.coverage = _check_coverage(coverage)
        self.class_conditional = bool(class_conditional)
        self.class_names = tuple(class_names)
        self.quantiles: np.ndarray | None = None  # (2,) per class (equal unless class-conditional)
        self.calibration_scores: np.ndarray | None = None  # true-class scores, for p-values
        self.calibration_labels: np.ndarray | None = None

    def fit(self, probabilities, y) -> ConformalClassifier:
        """Calibrate on held-out probabilities and 0/1 labels."""
        p, yy = as_scores_and_labels(
            probabilities, y, both_classes=self.class_conditional, name="conformal calibration probabilities"
        )
        alphas = nonconformity(p)[np.arange(p.size), yy]
        if self.class_conditional:
            q = [_crepes_quantile(alphas[yy == c], self.coverage) for c in (0, 1)]
        else:
            q = [_crepes_quantile(alphas, self.coverage)] * 2
        self.quantiles = np.asarray(q, dtype=np.float64)
        self.calibration_scores, self.calibration_labels = alphas, yy
        return self

    def _fitted(self) -> None:
        if self.quantiles is None:
            raise DataError("the conformal classifier has not been calibrated (call fit first)")

    def predict_mask(self, probabilities) -> np.ndarray:
        """(n, 2) booleans: is class c in image i's set."""
        self._fitted()
        return nonconformity(probabilities) <= self.quantiles[None, :]

    def predict(self, probabilities) -> list[tuple[str, ...]]:
        """Each image's set as a tuple of class names (``()``, one name, or both)."""
        return [tuple(n for n, keep in zip(self.class_names, row) if keep) for row in self.predict_mask(probabilities)]

    def p_values(self, probabilities) -> np.ndarray:
        """(n, 2) crepes p-values (non-smoothed) from the stored calibration scores."""
        from crepes import ConformalClassifier as _CrepesClassifier  # fitting only: not on predict's path

        self._fitted()
        a = nonconformity(probabilities)
        cc = _CrepesClassifier()
        if not self.class_conditional:
            return cc.fit(self.calibration_scores).predict_p(a, smoothing=False)
        cc.fit(self.calibration_scores, bins=self.calibration_labels)
        return np.stack([cc.predict_p(a[:, c], bins=np.full(len(a), c), smoothing=False) for c in (0, 1)], axis=1)

    def to_state(self) -> tuple[dict[str, np.ndarray], dict]:
        """``(tensors, meta)``: arrays for safetensors, plain JSON for the rest."""
        self._fitted()
        tensors = {
            "quantiles": self.quantiles.copy(),
            "calibration_scores": self.calibration_scores.copy(),
            "calibration_labels": self.calibration_labels.copy(),
        }
        meta = {
            "coverage": self.coverage,
            "class_conditional": self.class_conditional,
            "class_names": list(self.class_names),
            "n_calibration": int(self.calibration_scores.size),
        }
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict, meta: dict) -> ConformalClassifier:
        cc = cls(meta["coverage"], meta["class_conditional"], tuple(meta["class_names"]))
        cc.quantiles = np.asarray(tensors["quantiles"], dtype=np.float64)
        cc.calibration_scores = np.asarray(tensors["calibration_scores"], dtype=np.float64)
        cc.calibration_labels = np.asarray(tensors["calibration_labels"], dtype=np.int64)
        if cc.quantiles.shape != (2,):
            raise DataError(f"conformal state: quantiles must have shape (2,), got {cc.quantiles.shape}")
        scores = cc.calibration_scores
        if np.isnan(cc.quantiles).any() or not np.all((scores >= 0) & (scores <= 1)):  # also false for NaN
            raise DataError("conformal state: quantiles or calibration scores are NaN or out of [0, 1]")
        return cc


def _mask(sets, class_names) -> np.ndarray:
    if isinstance(sets, np.ndarray) and sets.dtype == bool and sets.ndim == 2:
        return sets
    return np.array([[name in s for name in class_names] for s in sets], dtype=bool).reshape(-1, len(class_names))


def empirical_coverage(sets, y, class_names: tuple[str, str] = CLASS_NAMES) -> float:
    """Share of images whose true class is in their set (``sets``: names or an (n, 2) mask)."""
    m, yy = _mask(sets, class_names), as_binary_labels(y, "labels")
    if m.shape[0] != yy.size or yy.size == 0:
        raise DataError(f"coverage: {m.shape[0]} sets but {yy.size} labels")
    return float(m[np.arange(yy.size), yy].mean())


def abstention_rate(sets, class_names: tuple[str, str] = CLASS_NAMES) -> float:
    """Share of sets that are not a single class (both or none: ``uncertain``)."""
    m = _mask(sets, class_names)
    if m.shape[0] == 0:
        raise DataError("abstention rate: no prediction sets")
    return float((m.sum(axis=1) != 1).mean())
