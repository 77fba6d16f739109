"""The operating threshold: which (calibrated) probability counts as positive.

Chosen on validation data, never on test. The setting is a string (the CLI's
``--operating-point``):

- ``youden`` — the threshold with the highest sensitivity + specificity - 1;
- ``sensitivity=0.9`` — the highest threshold whose sensitivity is at least 0.9 (so the best
  specificity that keeps that sensitivity);
- ``specificity=0.9`` — the lowest threshold whose specificity is at least 0.9;
- a number such as ``0.5`` — that threshold, as given.

A prediction is positive when ``probability >= threshold``. Candidate thresholds are the
observed scores (sklearn's :func:`~sklearn.metrics.roc_curve` with every point kept), so the
chosen one meets its target exactly on the data it was chosen on.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from kneeosteo.errors import ConfigError
from kneeosteo.utils.arrays import as_scores_and_labels, as_values

from ._base import TrustEstimator

__all__ = ["ALLOWED_FORMS", "OperatingPoint", "OperatingThreshold", "choose_threshold", "parse_operating_point"]

ALLOWED_FORMS = "youden, sensitivity=X, specificity=X (X in (0, 1]) or a threshold in (0, 1) such as 0.5"
_TARGET = re.compile(r"^(sensitivity|specificity)\s*=\s*([0-9.eE+-]+)$")


@dataclass(frozen=True)
class OperatingPoint:
    """A parsed setting: ``kind`` is ``youden``, ``sensitivity``, ``specificity`` or ``fixed``;
    ``value`` the target (or the threshold itself for ``fixed``; None for ``youden``)."""

    kind: str
    value: float | None = None

    def __str__(self) -> str:
        if self.kind == "youden":
            return "youden"
        if self.kind == "fixed":
            return f"{self.value:g}"
        return f"{self.kind}={self.value:g}"


def _number(text: str, original: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"operating point {original!r} is not one of: {ALLOWED_FORMS}") from None
    if not math.isfinite(value):
        raise ConfigError(f"operating point {original!r} is not one of: {ALLOWED_FORMS}")
    return value


def parse_operating_point(text) -> OperatingPoint:
    """``youden|sensitivity=0.9|specificity=0.9|0.5`` -> :class:`OperatingPoint`; anything
    else is a :class:`~kneeosteo.errors.ConfigError` naming the allowed forms."""
    if isinstance(text, OperatingPoint):
        return text
    original = text
    s = str(text).strip().lower()
    if s == "youden":
        return OperatingPoint("youden")
    m = _TARGET.match(s)
    if m:
        value = _number(m.group(2), original)
        if not 0 < value <= 1:
            raise ConfigError(
                f"operating point {original!r}: the {m.group(1)} target must lie in (0, 1]; "
                f"allowed forms: {ALLOWED_FORMS}"
            )
        return OperatingPoint(m.group(1), value)
    value = _number(s, original)
    if not 0 < value < 1:
        raise ConfigError(
            f"operating point {original!r}: a threshold must lie in (0, 1); allowed forms: {ALLOWED_FORMS}"
        )
    return OperatingPoint("fixed", value)


class OperatingThreshold(TrustEstimator):
    """The threshold an ``operating_point`` setting picks on (validation) probabilities and 0/1
    labels. Fitted: ``threshold_`` (a number in [0, 1]) and ``operating_point_`` (the setting, parsed
    and written back as text)."""

    def __init__(self, operating_point="youden"):
        self.operating_point = operating_point

    def fit(self, probabilities, y) -> OperatingThreshold:
        op = parse_operating_point(self.operating_point)
        self.operating_point_ = str(op)
        if op.kind == "fixed":  # the threshold as given: the data choose nothing
            self.threshold_ = float(op.value)
            return self
        from sklearn.metrics import roc_curve  # fitting only: not on predict's path

        p, yy = as_scores_and_labels(probabilities, y, name="operating-point probabilities")
        fpr, tpr, thr = roc_curve(yy, p, drop_intermediate=False)
        if op.kind == "youden":
            i = int(np.argmax(tpr - fpr))  # first (highest-threshold) maximum on ties
        elif op.kind == "sensitivity":
            ok = np.flatnonzero(tpr >= op.value - 1e-12)
            i = int(ok[np.argmax(thr[ok])])
        else:  # specificity
            ok = np.flatnonzero(1 - fpr >= op.value - 1e-12)
            i = int(ok[np.argmin(thr[ok])])
        t = float(thr[i])
        # roc_curve's first threshold is +inf ("nothing positive"); keep a storable number
        self.threshold_ = t if math.isfinite(t) else float(np.nextafter(p.max(), np.inf))
        return self

    def predict(self, probabilities) -> np.ndarray:
        """1 where ``probability >= threshold_``, else 0."""
        self._check_fitted()
        return (as_values(probabilities, "probabilities") >= self.threshold_).astype(np.int64)

    def get_state(self) -> dict:
        self._check_fitted()
        return {"operating_point": self.operating_point_, "threshold": self.threshold_}

    @classmethod
    def from_state(cls, state: dict) -> OperatingThreshold:
        t = float(state["threshold"])
        if not (math.isfinite(t) and 0.0 <= t <= 1.0):
            raise ValueError(f"threshold {t} out of [0, 1]")
        out = cls(str(parse_operating_point(state["operating_point"])))
        out.operating_point_, out.threshold_ = out.operating_point, t
        return out


def choose_threshold(probabilities, y, operating_point="youden") -> float:
    """The threshold the ``operating_point`` picks on these (validation) probabilities."""
    return OperatingThreshold(operating_point).fit(probabilities, y).threshold_
