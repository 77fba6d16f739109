"""Recalibrating the model's single logit into a probability of the positive class.

Temperature scaling (Guo et al. 2017) divides the logit by one number ``T`` fitted on held-out
(validation) logits by minimising the negative log-likelihood; ``T > 1`` softens an overconfident
model. It is a one-parameter convex problem, solved here with :func:`scipy.optimize.minimize_scalar`
on ``log T`` (exact to the solver's tolerance, no extra dependency). Platt scaling fits
``sigmoid(a * z + b)`` with an unpenalised :class:`sklearn.linear_model.LogisticRegression`; it
also moves the decision point (``b``), which temperature scaling cannot, at the cost of a second
parameter to estimate from a small validation set.

Both are monotone in the logit, so the ranking (AUC) never changes; only the probabilities do.
Each stores as a small JSON dict (``to_dict``/``calibrator_from_dict``).
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit, log_expit

from kneeosteo.errors import ConfigError
from kneeosteo.utils.arrays import as_scores_and_labels, as_values

__all__ = [
    "DEGENERATE_TEMPERATURE",
    "MIN_TEMPERATURE_IMAGES",
    "PlattScaler",
    "TemperatureScaler",
    "calibrator_from_dict",
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


class TemperatureScaler:
    """``p = sigmoid(z / T)``; ``fit`` finds the ``T`` in [0.01, 100] with the lowest NLL."""

    method = "temperature"
    _LOG_T_BOUNDS = (np.log(0.01), np.log(100.0))

    def __init__(self, temperature: float = 1.0):
        if not (np.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)

    def fit(self, logits, y) -> float:
        """Fit on held-out logits and 0/1 labels; returns (and keeps) the temperature."""
        from scipy.optimize import minimize_scalar  # fitting only: not on predict's path

        z, yy = as_scores_and_labels(logits, y, name="calibration logits")
        res = minimize_scalar(
            lambda lt: _nll(z / np.exp(lt), yy), bounds=self._LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-6}
        )
        self.temperature = float(np.exp(res.x))
        return self.temperature

    def transform(self, logits) -> np.ndarray:
        """Calibrated probabilities of the positive class."""
        return sigmoid(as_values(logits, "logits") / self.temperature)

    def to_dict(self) -> dict:
        return {"method": self.method, "temperature": self.temperature}

    @classmethod
    def from_dict(cls, d: dict) -> TemperatureScaler:
        t = float(d["temperature"])
        if not DEGENERATE_TEMPERATURE[0] <= t <= DEGENERATE_TEMPERATURE[1]:  # no fit keeps such a value
            raise ConfigError(
                f"temperature {t!r} out of [{DEGENERATE_TEMPERATURE[0]:g}, {DEGENERATE_TEMPERATURE[1]:g}]"
            )
        return cls(t)

    def __repr__(self) -> str:
        return f"TemperatureScaler(temperature={self.temperature:.4g})"


class PlattScaler:
    """``p = sigmoid(a * z + b)``, fitted by unpenalised logistic regression on the logit."""

    method = "platt"

    def __init__(self, a: float = 1.0, b: float = 0.0):
        self.a, self.b = float(a), float(b)

    def fit(self, logits, y) -> tuple[float, float]:
        """Fit on held-out logits and 0/1 labels; returns (and keeps) ``(a, b)``."""
        from sklearn.linear_model import LogisticRegression  # fitting only: not on predict's path

        z, yy = as_scores_and_labels(logits, y, name="calibration logits")
        lr = LogisticRegression(C=np.inf, max_iter=1000).fit(z[:, None], yy)
        self.a, self.b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
        return self.a, self.b

    def transform(self, logits) -> np.ndarray:
        return sigmoid(self.a * as_values(logits, "logits") + self.b)

    def to_dict(self) -> dict:
        return {"method": self.method, "a": self.a, "b": self.b}

    @classmethod
    def from_dict(cls, d: dict) -> PlattScaler:
        a, b = float(d["a"]), float(d["b"])
        if not (np.isfinite(a) and np.isfinite(b)):
            raise ConfigError(f"Platt coefficients a={a!r}, b={b!r} are not finite")
        return cls(a, b)

    def __repr__(self) -> str:
        return f"PlattScaler(a={self.a:.4g}, b={self.b:.4g})"


_METHODS = {"temperature": TemperatureScaler, "platt": PlattScaler}


def fit_calibrator(method: str, logits, y) -> TemperatureScaler | PlattScaler:
    """A fitted calibrator of the named ``method`` (``temperature`` or ``platt``)."""
    if method not in _METHODS:
        raise ConfigError(f"calibration method {method!r} is not one of: {', '.join(_METHODS)}")
    cal = _METHODS[method]()
    cal.fit(logits, y)
    return cal


def calibrator_from_dict(d: dict) -> TemperatureScaler | PlattScaler:
    """The calibrator a ``to_dict`` wrote, whichever its method."""
    method = d.get("method")
    if method not in _METHODS:
        raise ConfigError(f"calibration method {method!r} is not one of: {', '.join(_METHODS)}")
    return _METHODS[method].from_dict(d)
