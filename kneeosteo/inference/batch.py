"""The batch shift alarm over a batch of predictions (``predict`` on a folder or manifest, the
served session's recent requests, ``evaluate``'s test images): see :mod:`kneeosteo.trust.shift`.

When the alarm fires, every ``ok`` answer of the batch becomes ``uncertain`` with the reason
``batch shift``: the prediction sets' coverage rests on the batch being exchangeable with the
calibration images, which the alarm has just shown it is not."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from kneeosteo.tasks import Task
from kneeosteo.trust import TrustBundle
from kneeosteo.trust.shift import BatchShift, batch_shift

__all__ = ["BATCH_SHIFT_REASON", "assess_batch", "shift_for"]

BATCH_SHIFT_REASON = "batch shift"


def shift_for(
    trust: TrustBundle | None, domain_scores: Sequence, probabilities: Sequence, task: Task | None = None
) -> BatchShift:
    """The alarm for one batch's domain scores and calibrated probabilities under ``trust``."""
    n = len(probabilities)
    if task is not None and not task.supports_shift_alarm:
        return BatchShift("unavailable", n, note=f"the alarm covers binary runs; this is a {task} run")
    if trust is None:
        return BatchShift(
            "unavailable",
            n,
            note="this run has no trust files (no reference distributions); add them with `kneeosteo calibrate`",
        )
    return batch_shift(trust.shift_reference, domain_scores, probabilities)


def assess_batch(result, trust: TrustBundle | None, task: Task | None = None) -> BatchShift:
    """The alarm over ``result``'s predictions (a ``PredictionResult``); when it fires, the ``ok``
    rows become ``uncertain`` with the reason. Stores ``result.batch_shift`` and returns it."""
    rows = result.predictions
    shift = shift_for(trust, [p.domain_score for p in rows], [p.probability for p in rows], task)
    if shift.fired:
        reason = (
            f"{BATCH_SHIFT_REASON}: this batch of {shift.n} images differs from the calibration images "
            f"(p {shift.p_value:.3g}); the prediction set's coverage does not hold for it"
        )
        result.predictions = [
            replace(p, status="uncertain", status_reason=reason) if p.status == "ok" else p for p in rows
        ]
    result.batch_shift = shift.to_dict()
    return shift
