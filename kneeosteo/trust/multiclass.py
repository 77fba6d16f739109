"""Trust pieces for the multiclass and regression tasks: temperature scaling of K logits,
split-conformal prediction sets over K classes and split-conformal prediction intervals for a
regression target (T-score or BMD).

The K-class counterparts of :mod:`.calibration` and :mod:`.conformal`, with the same rules:
fitted on held-out (validation or calibration) data never used to fit the model, stored as a
small JSON dict (``to_dict``/``from_dict``; an infinite quantile or half-width is written as
JSON's ``Infinity``, which Python's json reads back), and nothing of crepes kept on the serving
path: ``fit`` turns crepes' rule into stored numbers and ``predict`` compares against them.

- :class:`TemperatureScalerK`: ``softmax(z / T)``, one ``T`` for all K logits (Guo et al. 2017),
  fitted by minimising the NLL over ``log T``; the argmax (so accuracy) never changes.
- :class:`ConformalSetsK`: score ``1 - p(true class)``; class c is in an image's set when
  ``1 - p_c`` is no larger than the calibration quantile, so the set holds the true class for at
  least ``coverage`` of exchangeable new images. ``class_conditional=True`` (Mondrian) gives each
  class its own quantile from its own calibration images, so coverage holds within each class.
- :class:`ConformalInterval`: the interval ``y_pred -+ h`` with ``h`` the crepes
  (:class:`crepes.ConformalRegressor`) quantile of the held-out absolute residuals; it holds the
  true value for at least ``coverage`` of exchangeable new cases. ``h`` is ``+inf`` when the
  calibration set is too small for the coverage (fewer than ``1 / (1 - coverage) - 1`` cases).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.special import log_softmax, softmax

from kneeosteo.errors import DataError
from kneeosteo.utils.arrays import as_class_indices, as_matrix, as_values

from .calibration import TemperatureScaler
from .conformal import _check_coverage, _crepes_quantile

__all__ = [
    "ConformalInterval",
    "ConformalSetsK",
    "TemperatureScalerK",
    "empirical_interval_coverage",
    "empirical_set_coverage",
]


class TemperatureScalerK(TemperatureScaler):
    """``p = softmax(z / T)`` over K logits; ``fit`` finds the ``T`` in [0.01, 100] with the
    lowest NLL. The binary :class:`TemperatureScaler` is the K = 2 case with logits ``[0, z]``."""

    method = "temperature_k"

    def fit(self, logits, y) -> float:
        """Fit on held-out (n, K) logits and class indices; returns (and keeps) the temperature."""
        from scipy.optimize import minimize_scalar  # fitting only: not on predict's path

        z = as_matrix(logits, "calibration logits")
        yy = as_class_indices(y, z.shape[1], "calibration labels", n=z.shape[0])
        rows = np.arange(z.shape[0])

        def nll(log_t: float) -> float:
            return float(-np.mean(log_softmax(z / np.exp(log_t), axis=1)[rows, yy]))

        res = minimize_scalar(nll, bounds=self._LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-6})
        self.temperature = float(np.exp(res.x))
        return self.temperature

    def transform(self, logits) -> np.ndarray:
        """(n, K) calibrated class probabilities."""
        return softmax(as_matrix(logits, "logits") / self.temperature, axis=1)

    def __repr__(self) -> str:
        return f"TemperatureScalerK(temperature={self.temperature:.4g})"


class ConformalSetsK:
    """Split-conformal prediction sets at ``coverage`` over K classes, from (n, K) probabilities."""

    def __init__(self, coverage: float = 0.9, class_conditional: bool = False):
        self.coverage = _check_coverage(coverage)
        self.class_conditional = bool(class_conditional)
        self.quantiles: np.ndarray | None = None  # (K,), equal unless class-conditional
        self.n_calibration = 0

    def fit(self, probs, y) -> ConformalSetsK:
        """Calibrate on held-out (n, K) probabilities and class indices in [0, K).

        A class with no calibration images (class-conditional only) gets quantile ``+inf``: it
        is in every set, as crepes puts every class in when it has too few scores."""
        p = as_matrix(probs, "conformal calibration probabilities")
        k = p.shape[1]
        yy = as_class_indices(y, k, "conformal calibration labels", n=p.shape[0])
        scores = 1.0 - p[np.arange(yy.size), yy]
        if self.class_conditional:
            q = [_crepes_quantile(scores[yy == c], self.coverage) if np.any(yy == c) else np.inf for c in range(k)]
        else:
            q = [_crepes_quantile(scores, self.coverage)] * k
        self.quantiles = np.asarray(q, dtype=np.float64)
        self.n_calibration = int(yy.size)
        return self

    def predict(self, probs) -> np.ndarray:
        """(n, K) booleans: is class c in image i's set (``1 - p_c <= quantile_c``)."""
        if self.quantiles is None:
            raise DataError("the conformal sets have not been calibrated (call fit first)")
        p = as_matrix(probs, "probabilities")
        if p.shape[1] != self.quantiles.size:
            raise DataError(f"probabilities have {p.shape[1]} classes, the calibration had {self.quantiles.size}")
        return (1.0 - p) <= self.quantiles[None, :]

    def to_dict(self) -> dict:
        if self.quantiles is None:
            raise DataError("the conformal sets have not been calibrated (call fit first)")
        return {
            "method": "split_conformal_sets_k",
            "coverage": self.coverage,
            "class_conditional": self.class_conditional,
            "quantiles": [float(q) for q in self.quantiles],
            "n_calibration": self.n_calibration,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ConformalSetsK:
        cs = cls(float(d["coverage"]), bool(d["class_conditional"]))
        cs.quantiles = np.asarray(d["quantiles"], dtype=np.float64)
        if cs.quantiles.ndim != 1 or cs.quantiles.size < 2:
            raise DataError(f"conformal sets: quantiles must be a list of K >= 2 numbers, got {d['quantiles']!r}")
        cs.n_calibration = int(d.get("n_calibration", 0))
        return cs


class ConformalInterval:
    """Split-conformal interval ``y_pred -+ half_width`` for a regression target."""

    def __init__(self, coverage: float = 0.9):
        self.coverage = _check_coverage(coverage)
        self.half_width: float | None = None
        self.n_calibration = 0

    def fit(self, y_true, y_pred, coverage: float | None = None) -> ConformalInterval:
        """Calibrate on held-out true values and the model's predictions of them; ``coverage``
        (if given) replaces the one set at construction."""
        from crepes import ConformalRegressor as _CrepesRegressor  # fitting only: not on predict's path

        if coverage is not None:
            self.coverage = _check_coverage(coverage)
        t, p = as_values(y_true, "calibration true values"), as_values(y_pred, "calibration predictions")
        if t.size != p.size or t.size == 0:
            raise DataError(f"conformal interval: {t.size} true values but {p.size} predictions")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # crepes warns when the set is too small; that is the inf below
            cr = _CrepesRegressor().fit(t - p)
            self.half_width = float(cr.predict_int(np.zeros(1), confidence=self.coverage)[0, 1])
        self.n_calibration = int(t.size)
        return self

    def predict(self, y_pred) -> tuple[np.ndarray, np.ndarray]:
        """``(lower, upper)`` arrays: ``y_pred -+ half_width`` (``-inf, +inf`` if too few cases)."""
        if self.half_width is None:
            raise DataError("the conformal interval has not been calibrated (call fit first)")
        p = as_values(y_pred, "predictions")
        return p - self.half_width, p + self.half_width

    def to_dict(self) -> dict:
        if self.half_width is None:
            raise DataError("the conformal interval has not been calibrated (call fit first)")
        return {
            "method": "split_conformal_interval",
            "coverage": self.coverage,
            "half_width": self.half_width,
            "n_calibration": self.n_calibration,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ConformalInterval:
        ci = cls(float(d["coverage"]))
        ci.half_width = float(d["half_width"])
        if not ci.half_width >= 0:
            raise DataError(f"conformal interval: half_width must be >= 0, got {d['half_width']!r}")
        ci.n_calibration = int(d.get("n_calibration", 0))
        return ci


def empirical_interval_coverage(y, lower, upper) -> float:
    """Share of cases with ``lower <= y <= upper`` (bounds may be infinite)."""
    yy = as_values(y, "true values")
    lo, hi = (as_values(b, name, flatten=True, allow_inf=True) for b, name in ((lower, "lower"), (upper, "upper")))
    if not (yy.size == lo.size == hi.size) or yy.size == 0:
        raise DataError(f"interval coverage: {yy.size} values, {lo.size} lower and {hi.size} upper bounds")
    return float(np.mean((lo <= yy) & (yy <= hi)))


def empirical_set_coverage(sets, y) -> float:
    """Share of images whose true class (index in [0, K)) is in their (n, K) boolean set."""
    m = np.asarray(sets, dtype=bool)
    if m.ndim != 2:
        raise DataError(f"set coverage: expected an (n, K) boolean array, got shape {m.shape}")
    yy = as_class_indices(y, m.shape[1], "labels", n=m.shape[0])
    return float(m[np.arange(yy.size), yy].mean())
