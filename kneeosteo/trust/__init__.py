"""Whether to believe a prediction: calibration, operating threshold, conformal prediction sets,
decision curves and a domain (out-of-distribution) check (issue 15).

Pure functions and small estimators on numpy arrays, with no knowledge of runs, data sets or
interfaces. Every estimator follows scikit-learn's conventions (:mod:`._base`): ``__init__`` stores
its parameters unvalidated, ``fit`` validates them and the data, sets the fitted attributes (names
ending in ``_``) and returns ``self``; ``get_state``/``from_state`` is its one state round trip.
Two classes or K: the same class, the data decide. Training fits them, :class:`TrustBundle` stores
every task's pieces in one trust.json, and predict/serve/explain combine them with
:func:`trusted_prediction`. Layer 3 (beside ``features``, ``config``, ``run``): it may import
``errors`` and ``utils`` only.

Modules, one concern each:

- :mod:`.calibration` — temperature scaling of a binary logit or K logits, Platt scaling;
- :mod:`.calibration_metrics` — ECE (with a stratified bootstrap interval), Brier score,
  calibration slope and intercept, reliability-diagram data;
- :mod:`.operating_point` — ``youden|sensitivity=0.9|specificity=0.9|0.5`` parsed and chosen;
- :mod:`.conformal` — split-conformal prediction sets over 2 or K classes (crepes; Mondrian too),
  coverage, abstention rate;
- :mod:`.interval` — split-conformal intervals for a regression target, their coverage;
- :mod:`.decision_curve` — net benefit of the model, treat-all and treat-none;
- :mod:`.domain` — Mahalanobis (Ledoit-Wolf) or kNN feature distance plus pixel checks;
- :mod:`.orientation` — the learned upside-down check on the same features;
- :mod:`.prediction` — :class:`TrustedPrediction` and the function that builds one;
- :mod:`.shift` — the batch shift alarm's reference and test;
- :mod:`.bundle` — :class:`TrustBundle`, the fitted pieces of one run of any task (stored by
  ``RunDir``), and ``TRUST_PIECES``, the table from a piece's name to its estimator.
"""

from __future__ import annotations

from ._base import TrustEstimator
from .bundle import TRUST_FORMAT, TRUST_PIECES, TrustBundle, untrusted_prediction
from .calibration import (
    PlattScaler,
    TemperatureScaler,
    calibrator_from_state,
    fit_calibrator,
    logit,
    sigmoid,
)
from .calibration_metrics import (
    CalibrationFit,
    ReliabilityDiagram,
    brier_score,
    calibration_slope_intercept,
    expected_calibration_error,
    expected_calibration_error_interval,
    reliability_diagram,
)
from .conformal import (
    CLASS_NAMES,
    ConformalClassifier,
    abstention_rate,
    empirical_coverage,
    empirical_set_coverage,
    nonconformity,
)
from .decision_curve import DecisionCurve, decision_curve, net_benefit, treat_all_net_benefit
from .domain import DomainCheck, DomainVerdict, PixelLimits, pixel_problems
from .interval import ConformalInterval, empirical_interval_coverage
from .operating_point import OperatingPoint, OperatingThreshold, choose_threshold, parse_operating_point
from .orientation import OrientationCheck
from .prediction import STATUSES, TrustedPrediction, trusted_prediction
from .shift import ShiftReference

__all__ = [
    "CLASS_NAMES",
    "STATUSES",
    "TRUST_FORMAT",
    "TRUST_PIECES",
    "TrustBundle",
    "TrustEstimator",
    "CalibrationFit",
    "ConformalClassifier",
    "ConformalInterval",
    "DecisionCurve",
    "DomainCheck",
    "DomainVerdict",
    "OperatingPoint",
    "OperatingThreshold",
    "OrientationCheck",
    "PixelLimits",
    "PlattScaler",
    "ReliabilityDiagram",
    "ShiftReference",
    "TemperatureScaler",
    "TrustedPrediction",
    "abstention_rate",
    "brier_score",
    "calibration_slope_intercept",
    "calibrator_from_state",
    "choose_threshold",
    "decision_curve",
    "empirical_coverage",
    "empirical_interval_coverage",
    "empirical_set_coverage",
    "expected_calibration_error",
    "expected_calibration_error_interval",
    "fit_calibrator",
    "logit",
    "net_benefit",
    "nonconformity",
    "parse_operating_point",
    "pixel_problems",
    "reliability_diagram",
    "sigmoid",
    "treat_all_net_benefit",
    "trusted_prediction",
    "untrusted_prediction",
]
