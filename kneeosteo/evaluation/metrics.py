"""Binary classification metrics for the knee osteoporosis test set, with confidence intervals.

Plain functions over numpy arrays (MONAI-style metrics-as-functions, no stateful metric
objects), so every number in a results table can be recomputed from saved predictions alone.

One table, :data:`METRICS`, says for each metric its name, title, how it is computed (from the
confusion counts, or from labels and scores), its interval kind and whether the paper reports
it. It drives ``metrics.json`` (:func:`metrics_with_ci`), :func:`binary_metrics`, the
``evaluate`` printout (:func:`format_table`), Table I's columns and the documentation's column list
(:func:`metric_names`). Adding a metric is one :func:`register_metric` call (or one entry here).

Conventions
-----------
* Labels are 0/1 (1 = osteoporosis), probabilities are P(label == 1) in [0, 1].
* A case is predicted positive iff ``prob >= threshold`` (the same operating points that
  ``sklearn.metrics.roc_curve`` enumerates).
* A ratio whose denominator is zero is ``nan``: reporting 0 would silently claim, e.g., a
  sensitivity of 0 on a test set with no positive cases.
* Every returned number is a plain ``float``/``int``, so ``json.dumps`` works on the outputs.
  ``nan`` is serialised as the (non-standard) token ``NaN`` by Python's json module; pass
  ``allow_nan=False`` if a strict consumer must reject it instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score

from kneeosteo.evaluation.stats import rank_auc_rows
from kneeosteo.utils.arrays import as_binary_labels, as_values, check_nonempty, check_probabilities, check_same_length
from kneeosteo.utils.intervals import (
    bootstrap_replicates,
    check_interval_settings,
    percentile_interval,
    wilson_interval,
)

__all__ = [
    "METRICS",
    "Metric",
    "register_metric",
    "metric_names",
    "confusion_counts",
    "binary_metrics",
    "metrics_with_ci",
    "format_table",
    "sensitivity",
    "specificity",
    "precision",
    "fpr",
    "accuracy",
    "f1",
    "loss",
    "auc",
]

_EPS = 1e-7  # Keras' default epsilon: keeps the loss comparable with the paper's Keras logs.


# ---------------------------------------------------------------------------------------------
# the metrics, as plain functions
#
# A *count* metric maps the confusion counts (ints, or int arrays over bootstrap replicates) to
# (numerator, denominator); its value is their ratio, nan when the denominator is 0. A *score*
# metric maps labels and probabilities to a float.


def sensitivity(tp, fp, fn, tn):
    """Recall of the positive class: tp / (tp + fn)."""
    return tp, tp + fn


def specificity(tp, fp, fn, tn):
    """Recall of the negative class: tn / (fp + tn)."""
    return tn, fp + tn


def precision(tp, fp, fn, tn):
    """Positive predictive value: tp / (tp + fp)."""
    return tp, tp + fp


def fpr(tp, fp, fn, tn):
    """False positive rate: fp / (fp + tn)."""
    return fp, fp + tn


def accuracy(tp, fp, fn, tn):
    """(tp + tn) / n."""
    return tp + tn, tp + fp + fn + tn


def f1(tp, fp, fn, tn):
    """Harmonic mean of precision and sensitivity: 2 tp / (2 tp + fp + fn)."""
    return 2 * tp, 2 * tp + fp + fn


def _bce(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Per-case cross-entropy; clipping mirrors Keras so a confident miss costs ~16, not inf."""
    pc = np.clip(p, _EPS, 1.0 - _EPS)
    return -(y * np.log(pc) + (1 - y) * np.log1p(-pc))


def loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary cross-entropy, probabilities clipped to [1e-7, 1 - 1e-7] as Keras does."""
    return float(np.mean(_bce(y, p)))


def _loss_rows(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    n = pos.shape[1] + neg.shape[1]
    return (_bce(np.ones_like(pos), pos).sum(axis=1) + _bce(np.zeros_like(neg), neg).sum(axis=1)) / n


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC (``sklearn.metrics.roc_auc_score``); nan when only one class is present."""
    return float(roc_auc_score(y, p)) if 0 < y.sum() < y.size else math.nan


def _auc_rows(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    if not (pos.shape[1] and neg.shape[1]):
        return np.full(pos.shape[0], math.nan)
    return rank_auc_rows(pos, neg)


# ---------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class Metric:
    """One row of the metrics table.

    Give exactly one of ``counts`` (tp, fp, fn, tn) -> (numerator, denominator), vectorised
    over numpy arrays, or ``scores`` (y, prob) -> float. ``interval`` is "wilson" (only for a
    count metric that is a binomial proportion: numerator counts successes among denominator
    cases) or "bootstrap" (stratified percentile bootstrap). ``score_rows`` (pos (b, m),
    neg (b, k)) -> (b,) optionally vectorises a score metric over bootstrap replicates;
    without it ``scores`` is called once per replicate. ``paper``: a column of the paper's
    tables. ``unit``: the value lies in [0, 1] (Table I clips its t-intervals there).
    """

    name: str
    title: str
    interval: Literal["wilson", "bootstrap"]
    counts: Callable[..., tuple[Any, Any]] | None = None
    scores: Callable[[np.ndarray, np.ndarray], float] | None = None
    score_rows: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    paper: bool = False
    unit: bool = True

    def __post_init__(self) -> None:
        if (self.counts is None) == (self.scores is None):
            raise ValueError(f"metric {self.name!r}: give exactly one of counts= or scores=")
        if self.interval not in ("wilson", "bootstrap"):
            raise ValueError(f"metric {self.name!r}: interval must be 'wilson' or 'bootstrap'")
        if self.interval == "wilson" and self.counts is None:
            raise ValueError(f"metric {self.name!r}: a Wilson interval needs a count metric")

    def value(self, y: np.ndarray, p: np.ndarray, counts: Mapping[str, int]) -> float:
        """The point estimate on labels ``y``, probabilities ``p`` and their confusion counts."""
        if self.counts is not None:
            return _ratio(*self.counts(**counts))
        return float(self.scores(y, p))

    def replicates(self, pos: np.ndarray, neg: np.ndarray, threshold: float) -> np.ndarray:
        """The metric on each bootstrap replicate (rows of resampled positive/negative scores)."""
        if self.counts is not None:
            tp = (pos >= threshold).sum(axis=1)
            fp = (neg >= threshold).sum(axis=1)
            num, den = self.counts(tp, fp, pos.shape[1] - tp, neg.shape[1] - fp)
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(den > 0, num / den, math.nan)
        if self.score_rows is not None:
            return self.score_rows(pos, neg)
        y = np.r_[np.ones(pos.shape[1], np.int64), np.zeros(neg.shape[1], np.int64)]
        return np.array([self.scores(y, np.r_[a, b]) for a, b in zip(pos, neg)], dtype=np.float64)


#: The metrics table, in column order (the paper's Table I order, then AUC).
METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    """Add ``metric`` to :data:`METRICS` (as the last column); it then appears in metrics.json,
    the evaluate printout and Table I with no other change."""
    if metric.name in METRICS or metric.name in ("tp", "fp", "fn", "tn", "threshold", "n", "counts"):
        raise ValueError(f"metric {metric.name!r} is already defined")
    METRICS[metric.name] = metric
    return metric


for _m in (
    Metric("sensitivity", "sensitivity", "wilson", counts=sensitivity, paper=True),
    Metric("specificity", "specificity", "wilson", counts=specificity, paper=True),
    Metric("precision", "precision", "wilson", counts=precision, paper=True),
    Metric("fpr", "FPR", "wilson", counts=fpr, paper=True),
    Metric("accuracy", "accuracy", "wilson", counts=accuracy, paper=True),
    Metric("f1", "F1", "bootstrap", counts=f1, paper=True),
    Metric("loss", "loss", "bootstrap", scores=loss, score_rows=_loss_rows, paper=True, unit=False),
    Metric("auc", "AUC", "bootstrap", scores=auc, score_rows=_auc_rows),
):
    register_metric(_m)
del _m


def metric_names(paper: bool | None = None) -> tuple[str, ...]:
    """Names in table order; ``paper=True`` only the paper's columns, ``False`` only ours."""
    return tuple(k for k, m in METRICS.items() if paper is None or m.paper == paper)


# ---------------------------------------------------------------------------------------------
# input handling


def _check_pair(y_true: Any, prob: Any) -> tuple[np.ndarray, np.ndarray]:
    y = as_binary_labels(y_true, "y_true", flatten=True)
    p = check_probabilities(as_values(prob, "prob", flatten=True), "prob")
    check_same_length(y_true=y, prob=p)
    check_nonempty(y, "y_true")
    return y, p


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else math.nan


# ---------------------------------------------------------------------------------------------
# point estimates


def confusion_counts(y_true: Any, y_pred: Any) -> dict[str, int]:
    """Return ``{"tp", "fp", "fn", "tn"}`` as plain ints (positive class = 1)."""
    y = as_binary_labels(y_true, "y_true", flatten=True)
    yp = as_binary_labels(y_pred, "y_pred", flatten=True)
    check_same_length(y_true=y, y_pred=yp)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, yp, labels=[0, 1]).ravel())
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def binary_metrics(y_true: Any, prob: Any, threshold: float = 0.5) -> dict[str, Any]:
    """Every metric of :data:`METRICS` at one operating point, plus the counts, ``threshold``, ``n``.

    ``auc`` is threshold-free and ``nan`` when only one class is present (sklearn would raise).
    """
    y, p = _check_pair(y_true, prob)
    counts = confusion_counts(y, (p >= threshold).astype(np.int64))
    out: dict[str, Any] = {name: m.value(y, p, counts) for name, m in METRICS.items()}
    out.update(counts)
    out["threshold"] = float(threshold)
    out["n"] = int(y.size)
    return out


# ---------------------------------------------------------------------------------------------
# intervals


def _stratified_bootstrap(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    n_boot: int,
    seed: int,
    metrics: Sequence[Metric],
) -> dict[str, np.ndarray]:
    """Resample positives and negatives separately so every replicate keeps the test set's
    class balance (and AUC stays defined), vectorised over replicates in memory-bounded chunks."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)

    def statistic(idx: np.ndarray) -> dict[str, np.ndarray]:
        bp, bn = p[idx[:, : pos.size]], p[idx[:, pos.size :]]
        return {metric.name: metric.replicates(bp, bn, threshold) for metric in metrics}

    return bootstrap_replicates(statistic, [pos, neg], n_boot, seed)


def metrics_with_ci(
    y_true: Any,
    prob: Any,
    threshold: float = 0.5,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Point estimates with (1 - alpha) intervals, because with ~70 test images a bare
    "0.8472" hides a +-0.08 uncertainty that decides whether two models differ at all.

    Each metric gets the interval its :data:`METRICS` entry names: Wilson for proportions
    (exact-count based, no resampling noise), a stratified percentile bootstrap otherwise
    (f1, auc, loss; seeded ``numpy.random.Generator``, so reruns are bit-identical).

    Each metric maps to ``{"value", "ci_low", "ci_high", "method"}``; undefined values and
    intervals are ``nan``. Also returned: ``counts``, ``threshold``, ``n``, ``n_positive``,
    ``n_negative``, and the ``alpha``, ``n_boot``, ``seed`` used.
    """
    check_interval_settings(n_boot, alpha)
    y, p = _check_pair(y_true, prob)
    point = binary_metrics(y, p, threshold=threshold)
    counts = {k: point[k] for k in ("tp", "fp", "fn", "tn")}
    boot_metrics = [m for m in METRICS.values() if m.interval == "bootstrap"]
    boot = _stratified_bootstrap(y, p, float(threshold), int(n_boot), seed, boot_metrics)
    out: dict[str, Any] = {}
    for name, metric in METRICS.items():
        value = point[name]
        if metric.interval == "wilson":
            lo, hi = wilson_interval(*metric.counts(**counts), alpha)
        else:
            lo, hi = percentile_interval(boot[name], alpha) if not math.isnan(value) else (math.nan, math.nan)
        out[name] = {"value": value, "ci_low": lo, "ci_high": hi, "method": metric.interval}

    out["counts"] = counts
    out["threshold"] = float(threshold)
    out["n"] = int(y.size)
    out["n_positive"] = int(y.sum())
    out["n_negative"] = int(y.size - y.sum())
    out["alpha"] = float(alpha)
    out["n_boot"] = int(n_boot)
    out["seed"] = int(seed)
    return out


# ---------------------------------------------------------------------------------------------
# reporting


def _fmt_num(x: Any) -> str:
    if x is None:
        return "-"
    x = float(x)
    return "nan" if math.isnan(x) else f"{x:.4f}"


def _fmt_cell(entry: Any) -> str:
    if entry is None:
        return "-"
    if isinstance(entry, Mapping):
        cell = _fmt_num(entry.get("value"))
        if "ci_low" in entry and "ci_high" in entry:
            cell += f" [{_fmt_num(entry['ci_low'])}, {_fmt_num(entry['ci_high'])}]"
        return cell
    return _fmt_num(entry)


def format_table(
    rows: Mapping[str, Mapping[str, Any]],
    columns: Sequence[str] | None = None,
) -> str:
    """Markdown table, one row per model, cells "value [lo, hi]" to 4 decimals; ``columns``
    defaults to every metric of :data:`METRICS`, in table order.

    Accepts ``metrics_with_ci`` outputs (with intervals) or ``binary_metrics`` outputs (bare
    values) so the paper's numbers and ours can sit in one table; a missing metric shows "-".
    """
    columns = metric_names() if columns is None else tuple(columns)
    header = ["model", *columns]
    body = [[str(name), *(_fmt_cell(row.get(col)) for col in columns)] for name, row in rows.items()]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in body)])
