"""One film's answer from the answers of its knees (issue 32), for runs trained on knee regions
(preset ``knee``).

Each knee found on a film (:func:`kneeosteo.data.knee.find_knees`) is scored on its own region,
with the run's calibration, conformal set and domain check, exactly as a film of its own would
be. The film's answer aggregates them:

- **probability** (and raw probability, class probabilities, regression value): the mean over
  the knees. Bone density is a property of the patient, not of one knee: two knees on one film
  are two readings of one quantity, so their mean is the estimate, and no knee is preferred;
- **status**: the worst of the knees' (``out_of_domain`` > ``uncertain`` > ``ok``; fail closed:
  an answer resting on half of the film is not given as the film's), and ``uncertain`` when the
  knees' labels or sets disagree (one patient cannot be both: at least one knee's answer is
  wrong, and the film's answer does not pick one);
- **prediction set**: the union of the knees' sets; the **label**: the class at the threshold of
  the mean probability (the top class of the mean, for a multiclass run), which is every knee's
  label whenever they all agree;
- **domain score**: the largest (the knee furthest from the training images).

A film with no knee found is ``out_of_domain`` with ``knee_reason`` saying why; nothing is
guessed for it. Every knee's own answer and region travel with the film's (``knees``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from kneeosteo.data.knee import KneeSearch
from kneeosteo.trust import TrustedPrediction

__all__ = ["film_verdict", "no_knee_verdict"]

_SEVERITY = ("ok", "uncertain", "out_of_domain")


def no_knee_verdict(search: KneeSearch, calibrated: bool) -> TrustedPrediction:
    """A film where no knee was found: ``out_of_domain``, no numbers, the search's reason."""
    nan = float("nan")
    why = f"no knee found: {search.reason}"
    return TrustedPrediction(
        "out_of_domain", nan, nan, "", (), nan, nan, calibrated, knee_reason=why, status_reason=why
    )


def _mean(values) -> float:
    v = np.asarray([x for x in values], dtype=np.float64)
    return float(v.mean()) if v.size and np.isfinite(v).all() else float("nan")


def film_verdict(
    search: KneeSearch, verdicts: Sequence[TrustedPrediction], classes: Sequence[str], threshold: float
) -> TrustedPrediction:
    """The film's answer from its knees' ``verdicts`` (one per ``search.knees``, left to right),
    each knee's region and answer in ``knees``. ``classes``: the run's classes (binary: negative,
    positive), ``threshold``: its operating threshold on the (calibrated) probability."""
    if len(verdicts) != len(search.knees):
        raise ValueError(f"{len(verdicts)} answers for {len(search.knees)} knees")
    if not search.knees:
        raise ValueError("no knee: use no_knee_verdict")
    knees = tuple(
        {**k.to_dict(), **{f: v for f, v in t.to_dict().items() if f != "calibrated"}}
        for k, t in zip(search.knees, verdicts)
    )
    if len(verdicts) == 1:
        return replace(verdicts[0], knees=knees)
    status = max((t.status for t in verdicts), key=_SEVERITY.index)
    prob = _mean(t.probability for t in verdicts)
    raw = _mean(t.raw_probability for t in verdicts)
    scores = [t.domain_score for t in verdicts if np.isfinite(t.domain_score)]
    score = max(scores) if scores else float("nan")
    names = [c for c, _ in verdicts[0].probabilities]
    probabilities = tuple((c, _mean(dict(t.probabilities)[c] for t in verdicts)) for c in names)
    value = _mean(t.value for t in verdicts)
    bounds = [t.interval for t in verdicts if t.interval]
    interval = (min(b[0] for b in bounds), max(b[1] for b in bounds)) if len(bounds) == len(verdicts) else ()
    if status == "out_of_domain":
        label, pset = "", ()
    else:
        pset = tuple(c for c in classes if any(c in t.prediction_set for t in verdicts))
        labels = {t.label for t in verdicts}
        if probabilities:  # multiclass: the top class of the mean
            label = max(probabilities, key=lambda cp: cp[1])[0]
        elif np.isfinite(prob) and len(classes) == 2:  # binary
            label = classes[1] if prob >= threshold else classes[0]
        else:  # regression: the knees' band when they share one
            label = labels.pop() if len(labels) == 1 else ""
        if len(labels) > 1 or (pset and len(pset) != 1):
            status = "uncertain"
    # the reason: the knees disagreeing, else the worst knee's own (named by its position)
    worst = max(zip(search.knees, verdicts), key=lambda kt: _SEVERITY.index(kt[1].status))
    if status != "out_of_domain" and (len({t.label for t in verdicts}) > 1 or (pset and len(pset) != 1)):
        reason = "the knees' labels or prediction sets differ"
    else:
        reason = f"{worst[0].position} knee: {worst[1].status_reason}" if worst[1].status_reason else ""
    return TrustedPrediction(
        status,
        prob,
        raw,
        label,
        pset,
        score,
        verdicts[0].domain_threshold,
        all(t.calibrated for t in verdicts),
        probabilities,
        value,
        interval,
        knees,
        status_reason=reason,
    )
