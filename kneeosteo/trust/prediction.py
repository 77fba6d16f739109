"""What one prediction carries (issue 15), and the function that assembles it.

Field names are the interfaces' contract (CLI CSV/JSON, API JSON, web page, explain JSON):

- ``status``: ``out_of_domain`` when the domain check fails; else ``ok`` when the conformal
  set is the label alone; else ``uncertain`` (a set of both classes, none, or one class that is
  not the label, as a threshold far from 0.5 can give);
- ``probability``: the calibrated probability of the positive class; ``raw_probability`` the
  model's own ``sigmoid(logit)``;
- ``label``: the class at the operating threshold (``probability >= threshold`` is positive),
  given for ``ok`` and ``uncertain``, empty when ``out_of_domain``;
- ``prediction_set``: the conformal set (one class, both, or at low coverage none); empty when
  ``out_of_domain``, since the coverage guarantee holds only for in-domain images;
- ``domain_score`` and ``domain_threshold``: the feature distance and the threshold it was
  held to (higher is further from the training images); empty (``None`` in JSON) for a run
  without a domain check;
- ``calibrated``: False for a run without trust files (``probability`` is then the raw one);
- ``knees`` and ``knee_reason``: a run trained on knee regions (preset ``knee``) only: each
  knee's region and own answer, and why the film has none (``out_of_domain``) when no knee was
  found (:mod:`kneeosteo.inference.knees` aggregates them).
- ``status_reason``: why the status is what it is, in words (issue 33): which domain check
  failed; both classes (or none) in the set at the run's coverage; no signal at this site (the
  site check's AUC interval holds 0.5); a batch shift (set by the batch's alarm, not here).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kneeosteo.errors import DataError

from .calibration import sigmoid
from .conformal import CLASS_NAMES

__all__ = ["STATUSES", "TrustedPrediction", "set_reason", "trusted_prediction"]

STATUSES = ("ok", "uncertain", "out_of_domain")
OUT_OF_DOMAIN_REASON = "out of domain"


@dataclass(frozen=True)
class TrustedPrediction:
    status: str
    probability: float
    raw_probability: float
    label: str
    prediction_set: tuple[str, ...]
    domain_score: float  # NaN: no domain check
    domain_threshold: float
    calibrated: bool = True
    # a multiclass run: (class, probability) per class; a regression: the value and its interval
    probabilities: tuple[tuple[str, float], ...] = ()
    value: float = float("nan")
    interval: tuple[float, float] = ()
    # a 'knee' run (issue 32): each knee's region and answer (dicts, left to right) behind this
    # film's aggregated answer, and why there is none when no knee was found
    knees: tuple[dict, ...] = ()
    knee_reason: str = ""
    status_reason: str = ""

    def to_dict(self) -> dict:
        """JSON-ready: ``prediction_set`` as a list, a missing domain score as None; the task
        fields only where the run has them."""
        out = {
            "status": self.status,
            "probability": _or_none(self.probability),
            "raw_probability": _or_none(self.raw_probability),
            "label": self.label,
            "prediction_set": list(self.prediction_set),
            "domain_score": _or_none(self.domain_score),
            "domain_threshold": _or_none(self.domain_threshold),
            "calibrated": self.calibrated,
            "status_reason": self.status_reason,
        }
        if self.probabilities:
            out["probabilities"] = dict(self.probabilities)
        if np.isfinite(self.value):
            out["value"] = float(self.value)
            out["interval"] = [_or_none(v) for v in self.interval] if self.interval else None
        if self.knees or self.knee_reason:
            out["knees"] = [dict(k) for k in self.knees]
            out["knee_reason"] = self.knee_reason
        return out


def _or_none(v: float):
    return None if v is None or not np.isfinite(v) else float(v)


def set_reason(pset: tuple[str, ...], label: str, coverage: float) -> str:
    """The reason of an in-domain status from its conformal set and the label at the threshold."""
    if tuple(pset) == (label,):
        return f"in domain; one class in the {coverage:.0%} prediction set"
    if len(pset) == 1:
        return f"the label at the run's threshold is not the one class in the {coverage:.0%} prediction set"
    if not pset:
        return f"no class in the {coverage:.0%} prediction set"
    return f"both classes in the {coverage:.0%} prediction set"


def trusted_prediction(
    logit: float,
    *,
    calibrator,
    threshold: float,
    conformal,
    domain_score: float,
    domain_threshold: float,
    in_domain: bool,
    class_names: tuple[str, str] = CLASS_NAMES,
    domain_reasons: tuple[str, ...] = (),
    no_signal: str = "",
) -> TrustedPrediction:
    """Combine one image's raw ``logit`` with the fitted pieces.

    ``calibrator``: a fitted :class:`~.calibration.TemperatureScaler` or ``PlattScaler``;
    ``threshold``: the operating threshold on the calibrated probability; ``conformal``: a
    fitted :class:`~.conformal.ConformalClassifier` (calibrated on calibrated probabilities);
    ``domain_score``/``domain_threshold``/``in_domain``: the domain check's verdict (for
    instance ``DomainCheck.assess``'s ``score``, ``threshold`` and ``ok``; ``domain_reasons`` its
    ``reasons``); ``no_signal``: the site check's sentence when the model showed no signal at the
    site the run was calibrated on (every in-domain answer is then ``uncertain``, for that reason)."""
    z = float(np.asarray(logit, dtype=np.float64).reshape(-1)[0]) if np.ndim(logit) else float(logit)
    if not np.isfinite(z):
        raise DataError("the model's logit is not finite")
    raw = float(sigmoid(z))
    prob = float(calibrator.transform(np.array([z]))[0])
    if not in_domain:
        status, label, pset = "out_of_domain", "", ()
        reason = "; ".join(domain_reasons) or OUT_OF_DOMAIN_REASON
    else:
        pset = conformal.predict(np.array([prob]))[0]
        label = class_names[1] if prob >= threshold else class_names[0]
        # ok only when the set is the label alone: an operating threshold far from 0.5 can give a
        # label the conformal set leaves out, and that answer is not one to act on
        status = "ok" if tuple(pset) == (label,) else "uncertain"
        reason = set_reason(tuple(pset), label, conformal.coverage)
        if no_signal:
            status, reason = "uncertain", no_signal
    return TrustedPrediction(
        status, prob, raw, label, tuple(pset), float(domain_score), float(domain_threshold), status_reason=reason
    )
