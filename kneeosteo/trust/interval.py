"""Split-conformal prediction intervals for a regression target (T-score or BMD).

:class:`ConformalInterval`: the interval ``y_pred -+ h`` with ``h`` the crepes
(:class:`crepes.ConformalRegressor`) quantile of the held-out absolute residuals; it holds the true
value for at least ``coverage`` of exchangeable new cases. ``h`` is ``+inf`` when the calibration
set is too small for the coverage (fewer than ``1 / (1 - coverage) - 1`` cases); JSON writes it as
``Infinity``, which Python's json reads back. Nothing of crepes is kept on the serving path: ``fit``
turns crepes' rule into the stored half width and ``predict`` adds it.
"""

from __future__ import annotations

import warnings

import numpy as np

from kneeosteo.errors import DataError
from kneeosteo.utils.arrays import as_values, check_nonempty, check_same_length

from ._base import TrustEstimator
from .conformal import _check_coverage

__all__ = ["ConformalInterval", "empirical_interval_coverage"]


class ConformalInterval(TrustEstimator):
    """Split-conformal interval ``y_pred -+ half_width_`` at ``coverage``. Fitted: ``half_width_``,
    ``n_calibration_``."""

    method = "split_conformal_interval"

    def __init__(self, coverage: float = 0.9):
        self.coverage = coverage

    def fit(self, y_true, y_pred) -> ConformalInterval:
        """Calibrate on held-out true values and the model's predictions of them."""
        from crepes import ConformalRegressor as _CrepesRegressor  # fitting only: not on predict's path

        coverage = _check_coverage(self.coverage)
        t, p = as_values(y_true, "calibration true values"), as_values(y_pred, "calibration predictions")
        check_same_length(**{"calibration true values": t, "calibration predictions": p})
        check_nonempty(t, "calibration true values")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # crepes warns when the set is too small; that is the inf below
            cr = _CrepesRegressor().fit(t - p)
            self.half_width_ = float(cr.predict_int(np.zeros(1), confidence=coverage)[0, 1])
        self.n_calibration_ = int(t.size)
        return self

    def predict(self, y_pred) -> tuple[np.ndarray, np.ndarray]:
        """``(lower, upper)`` arrays: ``y_pred -+ half_width_`` (``-inf, +inf`` if too few cases)."""
        self._check_fitted()
        p = as_values(y_pred, "predictions")
        return p - self.half_width_, p + self.half_width_

    def get_state(self) -> dict:
        self._check_fitted()
        return {
            "method": self.method,
            "coverage": float(self.coverage),
            "half_width": self.half_width_,
            "n_calibration": self.n_calibration_,
        }

    @classmethod
    def from_state(cls, state: dict) -> ConformalInterval:
        if state.get("method", cls.method) != cls.method:
            raise DataError(f"not a conformal-interval state (method {state.get('method')!r})")
        ci = cls(_check_coverage(float(state["coverage"])))
        ci.half_width_ = float(state["half_width"])
        if not ci.half_width_ >= 0:
            raise DataError(f"conformal interval: half_width must be >= 0, got {state['half_width']!r}")
        ci.n_calibration_ = int(state.get("n_calibration", 0))
        return ci


def empirical_interval_coverage(y, lower, upper) -> float:
    """Share of cases with ``lower <= y <= upper`` (bounds may be infinite)."""
    yy = as_values(y, "true values")
    lo, hi = (as_values(b, name, flatten=True, allow_inf=True) for b, name in ((lower, "lower"), (upper, "upper")))
    if not (yy.size == lo.size == hi.size) or yy.size == 0:
        raise DataError(f"interval coverage: {yy.size} values, {lo.size} lower and {hi.size} upper bounds")
    return float(np.mean((lo <= yy) & (yy <= hi)))
