"""Decision-curve analysis (Vickers et al. 2019): the net benefit of acting on the model.

At a threshold probability ``pt`` (the risk at which one would treat), a model that calls
positive every image with ``p >= pt`` has net benefit ``NB = TP/n - FP/n * pt / (1 - pt)``;
"treat all" has ``prevalence - (1 - prevalence) * pt / (1 - pt)`` and "treat none" 0. A model
is useful at ``pt`` only where its curve lies above both.

This is a few lines of numpy on the formula. The ``dcurves`` package implements the same
formula but pins pandas below 3 and pulls lifelines, which would downgrade this project's pandas.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kneeosteo.errors import ConfigError
from kneeosteo.utils.arrays import as_scores_and_labels

__all__ = ["DecisionCurve", "decision_curve", "net_benefit", "treat_all_net_benefit"]


def _check_thresholds(thresholds) -> np.ndarray:
    pt = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    if pt.size == 0 or np.any(~np.isfinite(pt)) or np.any(pt <= 0) or np.any(pt >= 1):
        raise ConfigError("decision-curve threshold probabilities must lie in (0, 1)")
    return pt


def net_benefit(probabilities, y, thresholds) -> np.ndarray:
    """The model's net benefit at each threshold probability."""
    p, yy = as_scores_and_labels(probabilities, y, both_classes=False, name="probabilities")
    pt = _check_thresholds(thresholds)
    positive = p[None, :] >= pt[:, None]
    tp = (positive & (yy[None, :] == 1)).sum(axis=1)
    fp = (positive & (yy[None, :] == 0)).sum(axis=1)
    return tp / p.size - fp / p.size * pt / (1 - pt)


def treat_all_net_benefit(prevalence: float, thresholds) -> np.ndarray:
    pt = _check_thresholds(thresholds)
    return prevalence - (1 - prevalence) * pt / (1 - pt)


@dataclass(frozen=True)
class DecisionCurve:
    thresholds: np.ndarray
    model: np.ndarray
    treat_all: np.ndarray
    treat_none: np.ndarray
    prevalence: float

    def to_dict(self) -> dict:
        return {
            "thresholds": self.thresholds.tolist(),
            "model": self.model.tolist(),
            "treat_all": self.treat_all.tolist(),
            "treat_none": self.treat_none.tolist(),
            "prevalence": self.prevalence,
        }


def decision_curve(probabilities, y, thresholds=None) -> DecisionCurve:
    """Net benefit of the model, treat-all and treat-none over ``thresholds`` (default 0.01 to
    0.99 in steps of 0.01)."""
    if thresholds is None:
        thresholds = np.round(np.arange(1, 100) / 100, 2)
    pt = _check_thresholds(thresholds)
    p, yy = as_scores_and_labels(probabilities, y, both_classes=False, name="probabilities")
    prevalence = float(yy.mean())
    return DecisionCurve(
        pt, net_benefit(p, yy, pt), treat_all_net_benefit(prevalence, pt), np.zeros_like(pt), prevalence
    )
