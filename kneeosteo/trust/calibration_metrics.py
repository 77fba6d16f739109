"""How well probabilities match observed frequencies, for a binary classifier.

- :func:`expected_calibration_error`: ECE over equal-width bins of the positive-class
  probability, ``sum_b n_b / n * |observed_b - mean predicted_b|``; the bins are sklearn's
  :func:`~sklearn.calibration.calibration_curve` bins (``strategy="uniform"``), so the
  reliability diagram and ECE agree with it; :func:`expected_calibration_error_interval` adds a
  stratified bootstrap percentile interval (each class resampled within itself, as the
  evaluation's other bootstrap intervals are).
- :func:`brier_score`: sklearn's mean squared error of the probability.
- :func:`calibration_slope_intercept`: logistic recalibration on the logit (Van Calster et al.
  2016): the slope ``b`` of ``logit P(y) = a + b * logit(p)`` (1 when calibrated, < 1 when
  overconfident) and the calibration intercept, ``a`` with the slope fixed at 1 (0 when the
  mean probability matches the prevalence, < 0 when the model over-predicts).
- :func:`reliability_diagram`: per bin its centre, edges, mean probability, observed frequency
  and count (empty bins kept, with NaN, so a plot can show the gaps).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kneeosteo.errors import ConfigError
from kneeosteo.utils.arrays import as_scores_and_labels, check_probabilities
from kneeosteo.utils.intervals import bootstrap_replicates, percentile_interval

from .calibration import logit

__all__ = [
    "CalibrationFit",
    "ReliabilityDiagram",
    "brier_score",
    "calibration_slope_intercept",
    "expected_calibration_error",
    "expected_calibration_error_interval",
    "reliability_diagram",
]


def _bin_ids(p: np.ndarray, n_bins: int) -> np.ndarray:
    if int(n_bins) < 1:
        raise ConfigError(f"n_bins must be at least 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    return np.searchsorted(edges[1:-1], p)  # the same binning as sklearn's calibration_curve


@dataclass(frozen=True)
class ReliabilityDiagram:
    """Per equal-width bin: ``centres``, ``edges`` (n_bins + 1), ``mean_predicted``,
    ``observed`` (fraction positive) and ``counts``; empty bins have NaN means."""

    centres: np.ndarray
    edges: np.ndarray
    mean_predicted: np.ndarray
    observed: np.ndarray
    counts: np.ndarray

    def to_dict(self) -> dict:
        nan_to_none = lambda a: [None if np.isnan(v) else float(v) for v in a]  # noqa: E731
        return {
            "centres": self.centres.tolist(),
            "edges": self.edges.tolist(),
            "mean_predicted": nan_to_none(self.mean_predicted),
            "observed": nan_to_none(self.observed),
            "counts": self.counts.astype(int).tolist(),
        }


def reliability_diagram(probabilities, y, n_bins: int = 10) -> ReliabilityDiagram:
    p, yy = as_scores_and_labels(probabilities, y, both_classes=False, name="probabilities")
    check_probabilities(p, "probabilities")
    ids = _bin_ids(p, n_bins)
    counts = np.bincount(ids, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(ids, weights=p, minlength=n_bins) / counts
        observed = np.bincount(ids, weights=yy, minlength=n_bins) / counts
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return ReliabilityDiagram((edges[:-1] + edges[1:]) / 2, edges, mean_p, observed, counts)


def _ece(p: np.ndarray, y: np.ndarray, n_bins: int) -> float:
    ids = _bin_ids(p, n_bins)
    gap = np.abs(np.bincount(ids, weights=y, minlength=n_bins) - np.bincount(ids, weights=p, minlength=n_bins))
    return float(gap.sum() / p.size)  # sum_b n_b/n * |sum y/n_b - sum p/n_b|


def expected_calibration_error(probabilities, y, n_bins: int = 10) -> float:
    """ECE of the positive-class probability over ``n_bins`` equal-width bins (0 is perfect)."""
    p, yy = as_scores_and_labels(probabilities, y, both_classes=False, name="probabilities")
    check_probabilities(p, "probabilities")
    return _ece(p, yy.astype(np.float64), n_bins)


def expected_calibration_error_interval(
    probabilities, y, n_bins: int = 10, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """``(ece, low, high)``: the ECE and a stratified bootstrap percentile interval at ``level``."""
    p, yy = as_scores_and_labels(probabilities, y, name="probabilities")
    check_probabilities(p, "probabilities")
    if not 0 < level < 1:
        raise ConfigError(f"level must lie in (0, 1), got {level}")
    yf = yy.astype(np.float64)

    def statistic(idx: np.ndarray) -> dict[str, np.ndarray]:
        return {"ece": np.array([_ece(p[i], yf[i], n_bins) for i in idx])}

    # one resample per draw (chunk=1): the ECE is a Python call per resample anyway, and it keeps
    # the random stream (and so the intervals) of the per-resample loop this replaced
    strata = [np.flatnonzero(yy == 1), np.flatnonzero(yy == 0)]
    stats = bootstrap_replicates(statistic, strata, int(n_boot), seed, chunk=1)["ece"]
    lo, hi = percentile_interval(stats, 1 - level)
    return _ece(p, yf, n_bins), lo, hi


def brier_score(probabilities, y) -> float:
    """Mean squared difference between probability and outcome (0 is perfect, 0.25 a coin)."""
    from sklearn.metrics import brier_score_loss  # fitting only: not on predict's path

    p, yy = as_scores_and_labels(probabilities, y, both_classes=False, name="probabilities")
    check_probabilities(p, "probabilities")
    return float(brier_score_loss(yy, p, labels=[0, 1]))


@dataclass(frozen=True)
class CalibrationFit:
    """``slope`` (1 ideal) and ``intercept`` (0 ideal; calibration-in-the-large, slope fixed
    at 1), plus ``slope_fit_intercept``, the intercept of the joint fit with the slope."""

    slope: float
    intercept: float
    slope_fit_intercept: float

    def to_dict(self) -> dict:
        return {"slope": self.slope, "intercept": self.intercept, "slope_fit_intercept": self.slope_fit_intercept}


def calibration_slope_intercept(probabilities, y) -> CalibrationFit:
    """Logistic recalibration of the outcome on ``logit(probability)`` (see module docstring)."""
    from scipy.optimize import minimize_scalar  # fitting only: not on predict's path
    from scipy.special import log_expit
    from sklearn.linear_model import LogisticRegression

    p, yy = as_scores_and_labels(probabilities, y, name="probabilities")
    check_probabilities(p, "probabilities")
    z = logit(p)
    lr = LogisticRegression(C=np.inf, max_iter=1000).fit(z[:, None], yy)
    # calibration-in-the-large: logit P(y) = a + 1 * z (z as an offset); a 1-D convex problem
    nll = lambda a: -np.mean(yy * log_expit(a + z) + (1 - yy) * log_expit(-(a + z)))  # noqa: E731
    a = minimize_scalar(nll, bounds=(-20.0, 20.0), method="bounded", options={"xatol": 1e-8}).x
    return CalibrationFit(float(lr.coef_[0, 0]), float(a), float(lr.intercept_[0]))
