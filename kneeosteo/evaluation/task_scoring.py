"""Scoring a multiclass or regression run (``--task multiclass``, ``--target t_score|bmd``).

The binary run keeps ``evaluate.score`` (the paper's metrics, probes, calibration); this module
is its counterpart for the other two tasks of ``kneeosteo/tasks``:

- **multiclass**: per-class and macro sensitivity, specificity, precision, F1 and one-vs-rest
  AUC with intervals, the K x K confusion matrix, weighted kappa (``evaluation/multiclass.py``);
  ``predictions.csv`` has one probability column per class;
- **regression**: MAE, RMSE, bias, Pearson and Spearman r, Bland-Altman limits of agreement, and
  for a T-score the WHO bands of the predicted values scored against the true ones
  (``evaluation/regression.py``); figures ``bland_altman.png`` and ``predicted_vs_true.png``.

With the run's fitted trust (``RunDir.trust``: a temperature and conformal sets for K classes, a
conformal interval for a value), the test coverage of the sets or intervals is
reported beside the metrics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.special import softmax

from kneeosteo.data.split import SplitSets
from kneeosteo.data.who import WHO_CUTOFFS
from kneeosteo.evaluation import figures
from kneeosteo.evaluation.multiclass import format_multiclass_table, multiclass_metrics_with_ci
from kneeosteo.evaluation.regression import format_regression_table, regression_metrics_with_ci
from kneeosteo.features.prepare import PreparedSet
from kneeosteo.run import RunDir
from kneeosteo.tasks import Multiclass, task_for, task_named
from kneeosteo.trust.conformal import empirical_set_coverage
from kneeosteo.trust.interval import empirical_interval_coverage
from kneeosteo.utils.atomic import write_json
from kneeosteo.utils.csvfile import write_csv

__all__ = ["format_task_metrics", "score_task", "task_answers"]


def task_answers(run: RunDir, outputs: np.ndarray) -> dict:
    """The run's answers from raw outputs: calibrated class probabilities and conformal sets
    (multiclass), or values and conformal intervals (regression), as the fitted trust allows."""
    trust = run.trust
    cal = None if trust is None else trust.calibrator
    fitted = {} if trust is None else trust.fitted
    if isinstance(task_for(run.config), Multiclass):
        probs = softmax(np.asarray(outputs, dtype=np.float64), axis=1) if cal is None else cal.transform(outputs)
        conformal = None if trust is None else trust.conformal
        return {
            "probabilities": probs,
            "sets": None if conformal is None else conformal.predict_mask(probs),
            "coverage": None if conformal is None else conformal.coverage,
            "calibrated": cal is not None and "temperature_note" not in fitted,
        }
    values = np.asarray(outputs, dtype=np.float64).reshape(-1)
    ci = None if trust is None else trust.interval
    interval = None if ci is None else ci.predict(values)
    return {"values": values, "interval": interval, "coverage": None if ci is None else ci.coverage}


def score_task(
    run: RunDir, outputs: np.ndarray, test: PreparedSet, sets: SplitSets, out: Path, history: list[dict] | None = None
) -> dict:
    """Metrics, predictions.csv and figures of a multiclass or regression run under ``out``.
    ``outputs``: the model's raw outputs on ``test`` (K logits per row, or one value)."""
    cfg = run.config
    out.mkdir(parents=True, exist_ok=True)
    answers = task_answers(run, outputs)
    if isinstance(task_for(cfg), Multiclass):
        y = test.targets.numpy().astype(int)
        probs = answers["probabilities"]
        metrics = multiclass_metrics_with_ci(y, probs, list(cfg.classes))
        if answers["sets"] is not None:
            s = answers["sets"]
            metrics["conformal"] = {
                "coverage_target": answers["coverage"],
                "coverage": empirical_set_coverage(s, y) if len(y) else float("nan"),
                "mean_set_size": float(s.sum(axis=1).mean()) if len(y) else float("nan"),
            }
        metrics["calibrated"] = answers["calibrated"]
        write_csv(out / "predictions.csv", *task_for(cfg).prediction_table(test.paths, y, probs, cfg.classes))
        figures.confusion_k(metrics["confusion"], list(cfg.classes), out / "confusion_matrix.png")
    else:
        y = test.targets.numpy().astype(np.float64)
        pred = answers["values"]
        metrics = regression_metrics_with_ci(y, pred, target=cfg.target)
        if answers["interval"] is not None:
            lo, hi = answers["interval"]
            metrics["conformal"] = {
                "coverage_target": answers["coverage"],
                "coverage": float(empirical_interval_coverage(y, lo, hi)),
                "half_width": float(np.median(hi - lo) / 2),
            }
        write_csv(
            out / "predictions.csv", *task_for(cfg).prediction_table(test.paths, y, pred, interval=answers["interval"])
        )
        figures.bland_altman(y, pred, out / "bland_altman.png", cfg.target)
        figures.predicted_vs_true(
            y, pred, out / "predicted_vs_true.png", cfg.target, WHO_CUTOFFS if cfg.target == "t_score" else None
        )
    if run.domain is not None and test.features is not None:  # the share of test films the domain check accepts
        dist = run.domain.distance(test.features.double().numpy())
        metrics["domain_acceptance"] = {
            "accepted": float(np.mean(dist <= run.domain.threshold_)),
            "threshold": run.domain.threshold_,
            "n": int(len(dist)),
        }
    metrics["unreadable"] = test.bad
    metrics["classes"] = list(cfg.classes)
    write_json(out / "metrics.json", metrics)
    if history:
        figures.curves(history, out)
    return metrics


def format_task_metrics(name: str, metrics: dict) -> str:
    """evaluate's printout for a multiclass or regression run."""
    multiclass = isinstance(task_named(str(metrics.get("task"))), Multiclass)
    table = format_multiclass_table(metrics) if multiclass else format_regression_table(metrics)
    lines = [name, table]
    d = metrics.get("domain_acceptance")
    if d:
        lines.append(f"domain check: accepts {d['accepted']:.3f} of the {d['n']} test images (by their features)")
    c = metrics.get("conformal")
    if c:
        what = "sets" if multiclass else "intervals"
        lines.append(f"conformal {what}: test coverage {c['coverage']:.3f} (target {c['coverage_target']})")
    return "\n".join(lines)
