"""What `evaluate` adds about trust (issue 15): calibration (ECE with a bootstrap interval, Brier
score, calibration slope and intercept; raw and calibrated), metrics at the run's operating
threshold and at 0.5, empirical conformal coverage, the abstention rate, metrics on the confident
subset, the domain check's acceptance rate, and two figures: ``calibration.png`` (reliability
diagram) and ``decision_curve.png`` (net benefit against treat-all and treat-none).

A run without trust files gets the calibration of its raw probabilities only (``calibrated``:
false). The domain check here uses the backbone features only (the pixel checks need the
full-size image, which scoring does not keep); ``predict`` applies both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kneeosteo.evaluation.figures import _figure, _save
from kneeosteo.evaluation.metrics import metrics_with_ci
from kneeosteo.run import RunDir
from kneeosteo.trust import (
    abstention_rate,
    brier_score,
    calibration_slope_intercept,
    decision_curve,
    empirical_coverage,
    expected_calibration_error_interval,
    logit,
    reliability_diagram,
)
from kneeosteo.trust.shift import batch_shift

__all__ = ["calibration_figure", "decision_curve_figure", "trust_metrics"]


def _calibration(p: np.ndarray, y: np.ndarray) -> dict:
    out = {"brier": brier_score(p, y)}
    if y.min() != y.max():  # the interval and the slope need both classes
        ece, lo, hi = expected_calibration_error_interval(p, y)
        out["ece"] = {"value": ece, "ci_low": lo, "ci_high": hi, "n_bins": 10, "interval": "stratified bootstrap"}
        out.update(calibration_slope_intercept(p, y).to_dict())
    return out


def _subset_metrics(y: np.ndarray, p: np.ndarray, keep: np.ndarray, threshold: float) -> dict | None:
    if keep.sum() == 0 or y[keep].min() == y[keep].max():
        return None
    return metrics_with_ci(y[keep], p[keep], threshold=threshold)


def trust_metrics(
    run: RunDir, prob: np.ndarray, y: np.ndarray, features, out: Path, folder_truth: np.ndarray | None = None
) -> dict:
    """The ``trust`` block of metrics.json for raw probabilities ``prob`` (float64) and labels
    ``y``; ``features`` the images' backbone features (or None). Writes the two figures.

    ``folder_truth``: where ``y`` is another truth than the one the run was trained and
    calibrated on (a held-out-source split scores its films against their T-scores), the same
    films' folder labels: the conformal sets' coverage is reported against both, since the
    guarantee holds only for the truth the calibration films carried."""
    bundle = run.trust
    raw = np.asarray(prob, dtype=np.float64)
    block: dict = {"calibrated": bundle is not None, "n": int(y.size), "raw": _calibration(raw, y)}
    if bundle is None:
        calibration_figure(raw, None, y, out / "calibration.png")
        decision_curve_figure(raw, y, out / "decision_curve.png", run.config.threshold)
        return block
    cal = bundle.calibrated(logit(raw))
    block.update(bundle.summary())
    block["calibrated_probabilities"] = _calibration(cal, y)
    block["at_operating_threshold"] = metrics_with_ci(y, cal, threshold=bundle.threshold)
    block["at_0.5"] = metrics_with_ci(y, cal, threshold=0.5)
    in_domain = np.ones(y.size, dtype=bool)
    scores = None
    if bundle.domain is not None and features is not None:
        scores = bundle.domain.distance(np.asarray(features, dtype=np.float64))
        in_domain = scores <= bundle.domain.threshold_
        block["domain_acceptance_by_features"] = float(in_domain.mean())
    # the batch shift alarm over the scored images, as `predict` runs it over a folder (issue 33)
    block["batch_shift"] = batch_shift(bundle.shift_reference, scores, cal).to_dict()
    mask = bundle.conformal.predict_mask(cal)
    block["conformal_coverage"] = empirical_coverage(mask, y)
    hit = mask[np.arange(y.size), y]  # per class: what Mondrian sets promise (issue 33)
    block["conformal_coverage_per_class"] = {
        c: float(hit[y == k].mean()) if (y == k).any() else None for k, c in enumerate(run.config.classes)
    }
    if folder_truth is not None:
        covered = mask[np.arange(y.size), np.asarray(folder_truth, dtype=int)]
        block["conformal_coverage_folder_labels"] = {
            "coverage": float(covered.mean()),
            "covered": int(covered.sum()),
            "n": int(y.size),
            "meaning": "the films' folder labels, the truth the sets were calibrated on; conformal_coverage is "
            "against the truth they are scored against",
        }
    block["abstention_rate"] = abstention_rate(mask)
    confident = in_domain & (mask.sum(axis=1) == 1)
    block["confident_share"] = float(confident.mean())
    block["confident_subset"] = _subset_metrics(y, cal, confident, bundle.threshold)
    calibration_figure(raw, cal, y, out / "calibration.png")
    decision_curve_figure(cal, y, out / "decision_curve.png", bundle.threshold)
    return block


def calibration_figure(raw: np.ndarray, calibrated: np.ndarray | None, y: np.ndarray, path: Path) -> None:
    """Reliability diagram: observed frequency against mean probability per bin, raw and calibrated."""
    fig = _figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect")
    for p, name, marker in ((raw, "raw", "o-"), (calibrated, "calibrated", "s-")):
        if p is None:
            continue
        d = reliability_diagram(p, y)
        keep = d.counts > 0
        ax.plot(
            d.mean_predicted[keep],
            d.observed[keep],
            marker,
            label=f"{name} (n per bin {d.counts[keep].min()}-{d.counts[keep].max()})",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed fraction positive")
    ax.set_title(f"Reliability diagram ({y.size} images)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)


def decision_curve_figure(p: np.ndarray, y: np.ndarray, path: Path, threshold: float) -> None:
    """Net benefit of acting on ``p`` against treat-all and treat-none, threshold marked."""
    dc = decision_curve(p, y)
    fig = _figure(figsize=(5, 3.8))
    ax = fig.subplots()
    ax.plot(dc.thresholds, dc.model, label="model")
    ax.plot(dc.thresholds, dc.treat_all, "--", label="treat all")
    ax.plot(dc.thresholds, dc.treat_none, ":", color="black", label="treat none")
    ax.axvline(threshold, color="grey", lw=0.8)
    ax.set_ylim(min(-0.05, float(np.nanmin(dc.model)) - 0.02), max(dc.prevalence, float(np.nanmax(dc.model))) + 0.05)
    ax.set_xlabel("threshold probability")
    ax.set_ylabel("net benefit")
    ax.set_title(f"Decision curve ({y.size} images, prevalence {dc.prevalence:.2f})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
