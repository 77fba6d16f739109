"""Whether to believe a prediction: calibration, operating threshold, conformal prediction sets,
decision curves and a domain (out-of-distribution) check (issue 15).

Pure functions and small classes on numpy arrays, with no knowledge of runs, data sets or
interfaces: training fits them, the run folder stores their ``to_dict``/``to_state`` output, and
predict/serve/explain combine them with :func:`trusted_prediction`. Layer 3 (beside ``features``,
``config``, ``run``): it may import ``errors`` and ``utils`` only.

Modules, one concern each:

- :mod:`.calibration` — temperature and Platt scaling of a binary logit;
- :mod:`.calibration_metrics` — ECE (with a stratified bootstrap interval), Brier score,
  calibration slope and intercept, reliability-diagram data;
- :mod:`.operating_point` — ``youden|sensitivity=0.9|specificity=0.9|0.5`` parsed and chosen;
- :mod:`.conformal` — split-conformal prediction sets (crepes), coverage, abstention rate;
- :mod:`.multiclass` — the multiclass and regression tasks: temperature scaling of K logits,
  K-class conformal sets, conformal intervals for a regression target, their coverage;
- :mod:`.decision_curve` — net benefit of the model, treat-all and treat-none;
- :mod:`.domain` — Mahalanobis (Ledoit-Wolf) or kNN feature distance plus pixel checks;
- :mod:`.prediction` — :class:`TrustedPrediction` and the function that builds one;
- :mod:`.bundle` — :class:`TrustBundle`, the fitted pieces of one run (stored by ``RunDir``).
"""

from __future__ import annotations

from .bundle import TRUST_FORMAT, TrustBundle, untrusted_prediction
from .calibration import (
    PlattScaler,
    TemperatureScaler,
    calibrator_from_dict,
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
    nonconformity,
)
from .decision_curve import DecisionCurve, decision_curve, net_benefit, treat_all_net_benefit
from .domain import DomainCheck, DomainVerdict, PixelLimits, pixel_problems
from .multiclass import (
    ConformalInterval,
    ConformalSetsK,
    TemperatureScalerK,
    empirical_interval_coverage,
    empirical_set_coverage,
)
from .operating_point import OperatingPoint, choose_threshold, parse_operating_point
from .prediction import STATUSES, TrustedPrediction, trusted_prediction

__all__ = [
    "CLASS_NAMES",
    "STATUSES",
    "TRUST_FORMAT",
    "TrustBundle",
    "CalibrationFit",
    "ConformalClassifier",
    "ConformalInterval",
    "ConformalSetsK",
    "DecisionCurve",
    "DomainCheck",
    "DomainVerdict",
    "OperatingPoint",
    "PixelLimits",
    "PlattScaler",
    "ReliabilityDiagram",
    "TemperatureScaler",
    "TemperatureScalerK",
    "TrustedPrediction",
    "abstention_rate",
    "brier_score",
    "calibration_slope_intercept",
    "calibrator_from_dict",
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
