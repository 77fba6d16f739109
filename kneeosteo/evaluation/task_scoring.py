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

What each kind of answer (``Task.scoring``) is scored with is one table, :data:`SCORING`: its
metrics with intervals (:func:`task_metrics`, the binary run's too), and for the other two tasks
their answers from raw outputs, their scoring into a folder and their printout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import softmax

from kneeosteo.data.split import SplitSets
from kneeosteo.data.who import WHO_CUTOFFS
from kneeosteo.evaluation import figures
from kneeosteo.evaluation.metrics import metrics_with_ci
from kneeosteo.evaluation.multiclass import format_multiclass_table, multiclass_metrics_with_ci
from kneeosteo.evaluation.regression import format_regression_table, regression_metrics_with_ci
from kneeosteo.features.prepare import PreparedSet
from kneeosteo.run import RunDir
from kneeosteo.tasks import Task, task_for, task_named
from kneeosteo.trust.bundle import TrustBundle
from kneeosteo.trust.conformal import empirical_set_coverage
from kneeosteo.trust.interval import empirical_interval_coverage
from kneeosteo.utils.atomic import write_json
from kneeosteo.utils.csvfile import write_csv

__all__ = ["SCORING", "Scoring", "format_task_metrics", "score_task", "task_answers", "task_metrics"]


# ------------------------------------------------------------------------ one probability (binary)
def _probability_metrics(
    y: np.ndarray, prob: np.ndarray, classes: Sequence[str], target: str, threshold: float
) -> dict:
    return metrics_with_ci(y, prob, threshold=threshold)


# ------------------------------------------------------------------------ class probabilities (multiclass)
def _class_metrics(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], target: str, threshold: float) -> dict:
    return multiclass_metrics_with_ci(y, probs, list(classes))


def _class_answers(trust: TrustBundle | None, outputs: np.ndarray) -> dict:
    cal = None if trust is None else trust.calibrator
    conformal = None if trust is None else trust.conformal
    probs = softmax(np.asarray(outputs, dtype=np.float64), axis=1) if cal is None else cal.transform(outputs)
    return {
        "probabilities": probs,
        "sets": None if conformal is None else conformal.predict_mask(probs),
        "coverage": None if conformal is None else conformal.coverage,
        "calibrated": cal is not None and trust is not None and "temperature_note" not in trust.fitted,
    }


def _score_classes(run: RunDir, task: Task, answers: dict, test: PreparedSet, out: Path) -> dict:
    cfg = run.config
    y = test.targets.numpy().astype(int)
    probs = answers["probabilities"]
    metrics = task_metrics(task, y, probs, cfg.classes)
    if answers["sets"] is not None:
        s = answers["sets"]
        metrics["conformal"] = {
            "coverage_target": answers["coverage"],
            "coverage": empirical_set_coverage(s, y) if len(y) else float("nan"),
            "mean_set_size": float(s.sum(axis=1).mean()) if len(y) else float("nan"),
        }
    metrics["calibrated"] = answers["calibrated"]
    write_csv(out / "predictions.csv", *task.prediction_table(test.paths, y, probs, cfg.classes))
    figures.confusion_k(metrics["confusion"], list(cfg.classes), out / "confusion_matrix.png")
    return metrics


# ------------------------------------------------------------------------ a value (regression)
def _value_metrics(y: np.ndarray, values: np.ndarray, classes: Sequence[str], target: str, threshold: float) -> dict:
    return regression_metrics_with_ci(y, values, target=target)


def _value_answers(trust: TrustBundle | None, outputs: np.ndarray) -> dict:
    values = np.asarray(outputs, dtype=np.float64).reshape(-1)
    ci = None if trust is None else trust.interval
    return {
        "values": values,
        "interval": None if ci is None else ci.predict(values),
        "coverage": None if ci is None else ci.coverage,
    }


def _score_values(run: RunDir, task: Task, answers: dict, test: PreparedSet, out: Path) -> dict:
    cfg = run.config
    y = test.targets.numpy().astype(np.float64)
    pred = answers["values"]
    metrics = task_metrics(task, y, pred)
    if answers["interval"] is not None:
        lo, hi = answers["interval"]
        metrics["conformal"] = {
            "coverage_target": answers["coverage"],
            "coverage": float(empirical_interval_coverage(y, lo, hi)),
            "half_width": float(np.median(hi - lo) / 2),
        }
    write_csv(out / "predictions.csv", *task.prediction_table(test.paths, y, pred, interval=answers["interval"]))
    figures.bland_altman(y, pred, out / "bland_altman.png", cfg.target)
    figures.predicted_vs_true(
        y, pred, out / "predicted_vs_true.png", cfg.target, WHO_CUTOFFS if cfg.target == "t_score" else None
    )
    return metrics


# ------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Scoring:
    """evaluation's entry for one kind of answer (``Task.scoring``)."""

    metrics: Callable[..., dict]  # (y, answers, classes, target, threshold) -> metrics with intervals
    answers: Callable[[TrustBundle | None, np.ndarray], dict] | None = None  # (the run's trust, raw outputs) -> answers
    score: Callable[..., dict] | None = None  # (run, task, answers, test, out) -> metrics; predictions.csv, figures
    table: Callable[[dict], str] | None = None  # evaluate's printout of the metrics
    # the binary run's answers, scoring and printout are evaluate.score's and the CLI's (probes, trust)


SCORING: dict[str, Scoring] = {
    "probability": Scoring(_probability_metrics),
    "classes": Scoring(_class_metrics, _class_answers, _score_classes, format_multiclass_table),
    "value": Scoring(_value_metrics, _value_answers, _score_values, format_regression_table),
}


def task_metrics(
    task: Task, y: np.ndarray, answers: np.ndarray, classes: Sequence[str] = (), threshold: float = 0.5
) -> dict:
    """The metrics with intervals of ``task``'s answers (P(positive) called at ``threshold``, class
    probabilities of ``classes``, or values of its target) against the truth ``y``."""
    return SCORING[task.scoring].metrics(y, answers, classes, task.target, threshold)


def _entry(task: Task, what: str) -> Callable:
    fn = getattr(SCORING[task.scoring], what)
    if fn is None:  # a programming error: the binary run is scored by evaluate.score
        raise TypeError(f"a {task} run has no {what} in evaluation.task_scoring (see evaluate.score)")
    return fn


def task_answers(run: RunDir, outputs: np.ndarray) -> dict:
    """The run's answers from raw outputs: calibrated class probabilities and conformal sets
    (multiclass), or values and conformal intervals (regression), as the fitted trust allows."""
    return _entry(task_for(run.config), "answers")(run.trust, outputs)


def score_task(
    run: RunDir, outputs: np.ndarray, test: PreparedSet, sets: SplitSets, out: Path, history: list[dict] | None = None
) -> dict:
    """Metrics, predictions.csv and figures of a multiclass or regression run under ``out``.
    ``outputs``: the model's raw outputs on ``test`` (K logits per row, or one value)."""
    cfg = run.config
    task = task_for(cfg)
    out.mkdir(parents=True, exist_ok=True)
    answers = task_answers(run, outputs)
    metrics = _entry(task, "score")(run, task, answers, test, out)
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
    task = task_named(str(metrics.get("task")))
    lines = [name, _entry(task, "table")(metrics)]
    d = metrics.get("domain_acceptance")
    if d:
        lines.append(f"domain check: accepts {d['accepted']:.3f} of the {d['n']} test images (by their features)")
    c = metrics.get("conformal")
    if c:
        lines.append(
            f"conformal {task.conformal_output}: test coverage {c['coverage']:.3f} (target {c['coverage_target']})"
        )
    return "\n".join(lines)
