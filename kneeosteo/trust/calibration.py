"""Recalibrating the model's single logit into a probability of the positive class.

Temperature scaling (Guo et al. 2017) divides the logit by one number ``T`` fitted on held-out
(validation) logits by minimising the negative log-likelihood; ``T > 1`` softens an overconfident
model. It is a one-parameter convex problem, solved here with :func:`scipy.optimize.minimize_scalar`
on ``log T`` (exact to the solver's tolerance, no extra dependency). Platt scaling fits
``sigmoid(a * z + b)`` with an unpenalised :class:`sklearn.linear_model.LogisticRegression`; it
also moves the decision point (``b``), which temperature scaling cannot, at the cost of a second
parameter to estimate from a small validation set.

Both are monotone in the logit, so the ranking (AUC) never changes; only the probabilities do.
Each is a :class:`~._base.TrustEstimator` (``fit`` returns ``self``; the state is a small dict,
``get_state``/``calibrator_from_state``).
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit, log_expit, log_softmax, softmax

from kneeosteo.errors import ConfigError
from kneeosteo.utils.arrays import as_class_indices, as_matrix, as_scores_and_labels, as_values

from ._base import TrustEstimator

__all__ = [
    "DEGENERATE_TEMPERATURE",
    "MIN_TEMPERATURE_IMAGES",
    "PlattScaler",
    "TemperatureScaler",
    "calibrator_from_state",
    "fit_calibrator",
    "logit",
    "sigmoid",
]

_EPS = 1e-12
# Fitting a temperature on too few held-out images, or on logits it can separate perfectly (the
# fit then runs to a bound of [0.01, 100]), gives no calibration: such fits keep T = 1
MIN_TEMPERATURE_IMAGES = 10
DEGENERATE_TEMPERATURE = (0.0101, 99.0)  # a fitted T outside this open interval ran to a bound


def sigmoid(z) -> np.ndarray:
    """The logistic function, overflow-free."""
    return expit(np.asarray(z, dtype=np.float64))


def logit(p) -> np.ndarray:
    """log(p / (1 - p)), with p clipped to [1e-12, 1 - 1e-12] so 0 and 1 stay finite."""
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def _nll(z: np.ndarray, y: np.ndarray) -> float:
    """Mean binary cross-entropy of logits ``z`` against 0/1 labels ``y``."""
    return float(-np.mean(y * log_expit(z) + (1 - y) * log_expit(-z)))


class TemperatureScaler(TrustEstimator):
    """``p = sigmoid(z / T)`` for one binary logit per image, ``softmax(z / T)`` for (n, K) logits
    (one ``T`` for all K; the binary case is K = 2 with logits ``[0, z]``): the data decide which.

    ``temperature``: None fits ``T`` in [0.01, 100] by the lowest NLL (bounded search on
    ``log T``); a number keeps that ``T`` (how a run too small to fit one keeps ``T = 1``).
    Fitted: ``temperature_``."""

    method = "temperature"
    _LOG_T_BOUNDS = (np.log(0.01), np.log(100.0))

    def __init__(self, temperature: float | None = None):
        self.temperature = temperature

    def fit(self, logits, y) -> TemperatureScaler:
        """Fit on held-out logits ((n,) with 0/1 labels, or (n, K) with class indices)."""
        fixed = self.temperature
        if fixed is not None and not (isinstance(fixed, (int, float)) and np.isfinite(fixed) and fixed > 0):
            raise ConfigError(f"temperature must be a positive number or None (fit it), got {fixed!r}")
        if np.ndim(logits) == 2 and np.shape(logits)[1] != 1:
            z = as_matrix(logits, "calibration logits")
            yy = as_class_indices(y, z.shape[1], "calibration labels", n=z.shape[0])
            rows = np.arange(z.shape[0])

            def nll(log_t: float) -> float:
                return float(-np.mean(log_softmax(z / np.exp(log_t), axis=1)[rows, yy]))

        else:
            zb, yb = as_scores_and_labels(logits, y, both_classes=fixed is None, name="calibration logits")

            def nll(log_t: float) -> float:
                return _nll(zb / np.exp(log_t), yb)

        if fixed is not None:
            self.temperature_ = float(fixed)
            return self
        from scipy.optimize import minimize_scalar  # fitting only: not on predict's path

        res = minimize_scalar(nll, bounds=self._LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-6})
        self.temperature_ = float(np.exp(res.x))
        return self

    def transform(self, logits) -> np.ndarray:
        """Calibrated probabilities: of the positive class (n,), or of each class (n, K)."""
        self._check_fitted()
        if np.ndim(logits) == 2 and np.shape(logits)[1] != 1:
            return softmax(as_matrix(logits, "logits") / self.temperature_, axis=1)
        return sigmoid(as_values(logits, "logits") / self.temperature_)

    def get_state(self) -> dict:
        self._check_fitted()
        return {"method": self.method, "temperature": self.temperature_}

    @classmethod
    def from_state(cls, state: dict) -> TemperatureScaler:
        # "temperature_k": a multiclass run's scaler before the K-class twin was merged in (format 2 runs)
        if state.get("method", "temperature") not in ("temperature", "temperature_k"):
            raise ConfigError(f"not a temperature state (method {state.get('method')!r})")
        t = float(state["temperature"])
        if not DEGENERATE_TEMPERATURE[0] <= t <= DEGENERATE_TEMPERATURE[1]:  # no fit keeps such a value
            raise ConfigError(
                f"temperature {t!r} out of [{DEGENERATE_TEMPERATURE[0]:g}, {DEGENERATE_TEMPERATURE[1]:g}]"
            )
        out = cls()
        out.temperature_ = t
        return out


class PlattScaler(TrustEstimator):
    """``p = sigmoid(a * z + b)``, fitted by unpenalised logistic regression on the logit.
    Fitted: ``a_``, ``b_``."""

    method = "platt"

    def __init__(self):
        pass

    def fit(self, logits, y) -> PlattScaler:
        """Fit on held-out logits and 0/1 labels."""
        from sklearn.linear_model import LogisticRegression  # fitting only: not on predict's path

        z, yy = as_scores_and_labels(logits, y, name="calibration logits")
        lr = LogisticRegression(C=np.inf, max_iter=1000).fit(z[:, None], yy)
        self.a_, self.b_ = float(lr.coef_[0, 0]), float(lr.intercept_[0])
        return self

    def transform(self, logits) -> np.ndarray:
        self._check_fitted()
        return sigmoid(self.a_ * as_values(logits, "logits") + self.b_)

    def get_state(self) -> dict:
        self._check_fitted()
        return {"method": self.method, "a": self.a_, "b": self.b_}

    @classmethod
    def from_state(cls, state: dict) -> PlattScaler:
        a, b = float(state["a"]), float(state["b"])
        if not (np.isfinite(a) and np.isfinite(b)):
            raise ConfigError(f"Platt coefficients a={a!r}, b={b!r} are not finite")
        out = cls()
        out.a_, out.b_ = a, b
        return out


_METHODS = {"temperature": TemperatureScaler, "temperature_k": TemperatureScaler, "platt": PlattScaler}


def fit_calibrator(method: str, logits, y) -> TemperatureScaler | PlattScaler:
    """A fitted calibrator of the named ``method`` (``temperature`` or ``platt``)."""
    if method not in ("temperature", "platt"):
        raise ConfigError(f"calibration method {method!r} is not one of: temperature, platt")
    return _METHODS[method]().fit(logits, y)


def calibrator_from_state(state: dict) -> TemperatureScaler | PlattScaler:
    """The calibrator a ``get_state`` wrote, whichever its method."""
    method = state.get("method")
    if method not in _METHODS:
        raise ConfigError(f"calibration method {method!r} is not one of: temperature, platt")
    return _METHODS[method].from_state(state)
