"""Metrics with confidence intervals for a K-class task (K >= 2), e.g. the WHO bands normal /
osteopenia / osteoporosis, and paired tests between two K-class models.

The conventions of :mod:`kneeosteo.evaluation.metrics` carry over: plain functions over numpy
arrays, a ratio with a zero denominator is ``nan``, proportions get Wilson intervals, the rest a
seeded percentile bootstrap, and every returned number is a plain ``float``/``int`` (``nan``
included, so ``json.dumps`` works with its default ``allow_nan=True``).

Per class the metrics are one-vs-rest: for class ``c`` a case is positive when its true class
is ``c`` and predicted positive when its predicted class is ``c``. Macro metrics are the mean of
the per-class values over the classes where that value is defined (a class absent from ``y`` has
no sensitivity; a class never predicted has no precision), ``nan`` when none is.

The bootstrap resamples within each true class (stratified), so every replicate keeps the test
set's class counts and every class present in ``y`` stays present; point values come from
sklearn (``confusion_matrix``, ``f1_score``, ``roc_auc_score``, ``cohen_kappa_score``), the
replicates from vectorised confusion matrices, as :mod:`.metrics` does for the binary task.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import chi2
from sklearn.metrics import cohen_kappa_score, confusion_matrix, f1_score, roc_auc_score
from statsmodels.stats.contingency_tables import SquareTable

from kneeosteo.evaluation.metrics import _EPS, precision, sensitivity, specificity
from kneeosteo.evaluation.metrics import f1 as f1_counts
from kneeosteo.evaluation.stats import delong_auc_ci, mcnemar_exact, rank_auc_rows
from kneeosteo.utils.arrays import as_class_indices, as_matrix, check_same_length
from kneeosteo.utils.intervals import (
    bootstrap_replicates,
    check_interval_settings,
    percentile_interval,
    wilson_interval,
)

__all__ = [
    "label_metrics_with_ci",
    "multiclass_metrics_with_ci",
    "format_multiclass_table",
    "paired_multiclass_tests",
]

_WILSON = {"sensitivity": sensitivity, "specificity": specificity, "precision": precision}
_PER_CLASS = ("sensitivity", "specificity", "precision", "f1", "auc")


# ---------------------------------------------------------------------------------------------
# input handling


def _check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    names = tuple(str(c) for c in classes)
    if len(names) < 2:
        raise ValueError(f"a multiclass task needs at least 2 classes, got {list(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be distinct, got {list(names)}")
    return names


# ---------------------------------------------------------------------------------------------
# confusion matrices, one or a stack of bootstrap replicates


def _confusion_rows(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """(b, K, K) confusion matrices (rows true, columns predicted) of (b, n) label rows."""
    b = y.shape[0]
    codes = (np.arange(b)[:, None] * k + y) * k + pred
    return np.bincount(codes.ravel(), minlength=b * k * k).reshape(b, k, k)


def _one_vs_rest(cm: np.ndarray) -> dict[str, np.ndarray]:
    """tp, fp, fn, tn of each class (last axis) from (..., K, K) confusion matrices."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    fn = cm.sum(axis=-1) - tp
    fp = cm.sum(axis=-2) - tp
    tn = cm.sum(axis=(-2, -1))[..., None] - tp - fn - fp
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _ratio_rows(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), math.nan)


def _quadratic_kappa_rows(cm: np.ndarray) -> np.ndarray:
    """Quadratic-weighted Cohen's kappa of each (K, K) matrix in a (b, K, K) stack, ``nan`` where
    the expected disagreement is 0 (as ``sklearn.metrics.cohen_kappa_score`` does)."""
    k = cm.shape[-1]
    idx = np.arange(k)
    w = (idx[:, None] - idx[None, :]) ** 2 / (k - 1) ** 2
    n = cm.sum(axis=(1, 2)).astype(np.float64)
    expected = cm.sum(axis=2)[:, :, None] * cm.sum(axis=1)[:, None, :] / n[:, None, None]
    return 1.0 - _ratio_rows((w * cm).sum(axis=(1, 2)), (w * expected).sum(axis=(1, 2)))


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring nan; nan where every entry is nan (no warning)."""
    ok = np.isfinite(x)
    count = ok.sum(axis=-1)
    return _ratio_rows(np.where(ok, x, 0.0).sum(axis=-1), count)


def _per_class_rows(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Each confusion-based per-class metric of a (..., K, K) stack, shape (..., K)."""
    counts = _one_vs_rest(cm)
    fns = {**_WILSON, "f1": f1_counts}
    return {name: _ratio_rows(*fn(**counts)) for name, fn in fns.items()}


# ---------------------------------------------------------------------------------------------
# the metrics


def _interval(value: float, lo: float, hi: float, method: str) -> dict[str, Any]:
    if math.isnan(value):
        lo = hi = math.nan
    return {"value": float(value), "ci_low": float(lo), "ci_high": float(hi), "method": method}


def _bootstrap(y, pred, probs, k, n_boot, seed) -> dict[str, np.ndarray]:
    """Per-replicate per-class metrics (b, K), macro means (b,), weighted kappa (b,), resampling
    within each true class."""
    n = y.size
    counts = np.bincount(y, minlength=k)
    starts = np.concatenate([[0], np.cumsum(counts)])

    def statistic(idx: np.ndarray) -> dict[str, np.ndarray]:
        b = idx.shape[0]
        cm = _confusion_rows(y[idx], pred[idx], k)
        rows = _per_class_rows(cm)
        rows["kappa"] = _quadratic_kappa_rows(cm)
        if probs is not None:
            auc = np.full((b, k), math.nan)
            for c in range(k):
                inside = np.zeros(n, dtype=bool)
                inside[starts[c] : starts[c + 1]] = True
                if 0 < counts[c] < n:
                    scores = probs[idx, c]
                    auc[:, c] = rank_auc_rows(scores[:, inside], scores[:, ~inside])
            rows["auc"] = auc
        return rows

    strata = [np.flatnonzero(y == c) for c in range(k)]  # the indices come grouped by class, in class order
    return bootstrap_replicates(statistic, strata, n_boot, seed, case_cost=k if probs is not None else 1)


def _scores(y, pred, probs, classes, alpha, n_boot, seed) -> dict[str, Any]:
    """The shared body of :func:`label_metrics_with_ci` and :func:`multiclass_metrics_with_ci`."""
    check_interval_settings(n_boot, alpha)
    k, n = len(classes), int(y.size)
    labels = list(range(k))
    cm = confusion_matrix(y, pred, labels=labels)
    counts = _one_vs_rest(cm)
    point = _per_class_rows(cm)
    point["f1"] = f1_score(y, pred, labels=labels, average=None, zero_division=np.nan).astype(np.float64)
    boot = _bootstrap(y, pred, probs, k, int(n_boot), seed)
    names = ("sensitivity", "specificity", "precision", "f1") + (("auc",) if probs is not None else ())

    per_class: dict[str, dict[str, Any]] = {}
    for c, cname in enumerate(classes):
        entry: dict[str, Any] = {"support": int(cm[c].sum())}
        one = {key: int(v[c]) for key, v in counts.items()}
        for name, fn in _WILSON.items():
            entry[name] = _interval(point[name][c], *wilson_interval(*fn(**one), alpha), "wilson")
        entry["f1"] = _interval(point["f1"][c], *percentile_interval(boot["f1"][:, c], alpha), "bootstrap")
        if probs is not None:
            entry["auc"] = _class_auc(y == c, probs[:, c], boot["auc"][:, c], alpha)
        per_class[cname] = entry

    macro = {}
    for name in names:
        value = float(_nanmean_rows(np.array([per_class[c][name]["value"] for c in classes])))
        macro[name] = _interval(value, *percentile_interval(_nanmean_rows(boot[name]), alpha), "bootstrap")

    correct = int(np.trace(cm))
    kappa_value = math.nan
    if np.isfinite(_quadratic_kappa_rows(cm[None])[0]):
        kappa_value = float(cohen_kappa_score(y, pred, labels=labels, weights="quadratic"))
    return {
        "task": "multiclass",
        "n": n,
        "classes": list(classes),
        "accuracy": _interval(correct / n, *wilson_interval(correct, n, alpha), "wilson"),
        "per_class": per_class,
        "macro": macro,
        "confusion": [[int(v) for v in row] for row in cm],
        "cohen_kappa_weighted": _interval(kappa_value, *percentile_interval(boot["kappa"], alpha), "bootstrap"),
        "alpha": float(alpha),
        "n_boot": int(n_boot),
        "seed": int(seed),
    }


def _class_auc(positive: np.ndarray, score: np.ndarray, replicates: np.ndarray, alpha: float) -> dict[str, Any]:
    """One-vs-rest AUC: sklearn's value, a DeLong interval when each side has >= 2 cases (the
    bootstrap's otherwise), nan when the class is absent from ``y`` or is all of it."""
    m = int(positive.sum())
    if m == 0 or m == positive.size:
        return _interval(math.nan, math.nan, math.nan, "delong")
    value = float(roc_auc_score(positive, score))
    if m >= 2 and positive.size - m >= 2:
        d = delong_auc_ci(positive.astype(np.int64), score, alpha=alpha)
        return _interval(value, d["ci_low"], d["ci_high"], "delong")
    return _interval(value, *percentile_interval(replicates, alpha), "bootstrap")


def label_metrics_with_ci(
    y: Any,
    pred: Any,
    classes: Sequence[str],
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """The confusion-based part of :func:`multiclass_metrics_with_ci`, for predicted labels
    without probabilities (e.g. WHO bands of predicted T-scores): no ``loss``, no AUC.

    ``y`` and ``pred`` are class indices in ``[0, K)``, ``K = len(classes)``. Returns
    ``{"task": "multiclass", "n", "classes", "accuracy", "per_class": {name: {"support",
    "sensitivity", "specificity", "precision", "f1"}}, "macro": {"sensitivity", "specificity",
    "precision", "f1"}, "confusion", "cohen_kappa_weighted", "alpha", "n_boot", "seed"}``, each
    metric a ``{"value", "ci_low", "ci_high", "method"}`` dict.
    """
    classes = _check_classes(classes)
    yy = as_class_indices(y, len(classes), "y")
    pp = as_class_indices(pred, len(classes), "pred")
    check_same_length(y=yy, pred=pp)
    return _scores(yy, pp, None, classes, alpha, n_boot, seed)


def multiclass_metrics_with_ci(
    y: Any,
    probs: Any,
    classes: Sequence[str],
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics of a K-class model with (1 - alpha) intervals; the prediction is ``argmax(probs)``.

    ``y``: (n,) class indices in ``[0, K)``; ``probs``: (n, K) softmax outputs (rows sum to 1);
    ``classes``: the K names, in index order. Returns::

        {"task": "multiclass", "n", "classes",
         "accuracy":  {"value", "ci_low", "ci_high", "method"}      Wilson
         "loss":      mean cross-entropy (plain float; probabilities clipped to [1e-7, 1 - 1e-7] as Keras does)
         "per_class": {name: {"support": int,
                              "sensitivity", "specificity", "precision"   Wilson,
                              "f1"                                        bootstrap percentile,
                              "auc"   one-vs-rest, DeLong (bootstrap if a side has < 2 cases)}},
         "macro":     {"sensitivity", "specificity", "precision", "f1", "auc"}  bootstrap percentile,
         "confusion": K x K nested list, rows = true class, columns = predicted class,
         "cohen_kappa_weighted": quadratic-weighted kappa, bootstrap percentile
                                 (meaningful when the class order is ordinal, as the WHO bands are),
         "alpha", "n_boot", "seed"}

    Undefined values (a class absent from ``y``: its sensitivity and AUC; a class never
    predicted: its precision) and their intervals are ``nan``. The bootstrap is stratified by
    true class and seeded, so reruns are bit-identical.
    """
    classes = _check_classes(classes)
    yy = as_class_indices(y, len(classes), "y")
    p = as_matrix(probs, "probs", shape=(yy.size, len(classes)), softmax=True)
    pred = np.argmax(p, axis=1)
    out = _scores(yy, pred, p, classes, alpha, n_boot, seed)
    ce = -np.log(np.clip(p[np.arange(yy.size), yy], _EPS, 1.0 - _EPS))
    out = {**{k: out[k] for k in ("task", "n", "classes", "accuracy")}, "loss": float(ce.mean()), **out}
    return out


# ---------------------------------------------------------------------------------------------
# reporting


def _cell(entry: Mapping[str, Any] | None) -> str:
    if entry is None:
        return "-"
    v, lo, hi = (float(entry.get(k, math.nan)) for k in ("value", "ci_low", "ci_high"))
    if math.isnan(v):
        return "nan"
    if math.isnan(lo) or math.isnan(hi):
        return f"{v:.3f}"
    return f"{v:.3f} [{lo:.2f}, {hi:.2f}]"


def format_multiclass_table(metrics: Mapping[str, Any]) -> str:
    """Plain-text table of a :func:`multiclass_metrics_with_ci` (or :func:`label_metrics_with_ci`)
    result: one row per class and a macro row, columns sensitivity, specificity, precision, F1
    and AUC as ``0.812 [0.70, 0.89]`` ("-" where a column was not computed), then the accuracy,
    weighted-kappa and (when present) loss lines."""
    columns = (
        ("sensitivity", "sensitivity"),
        ("specificity", "specificity"),
        ("precision", "precision"),
        ("f1", "F1"),
        ("auc", "AUC"),
    )
    header = ["class", "n", *(title for _, title in columns)]
    body = [
        [name, str(row["support"]), *(_cell(row.get(key)) for key, _ in columns)]
        for name, row in metrics["per_class"].items()
    ]
    body.append(["macro", str(metrics["n"]), *(_cell(metrics["macro"].get(key)) for key, _ in columns)])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"accuracy: {_cell(metrics['accuracy'])}")
    lines.append(f"weighted kappa (quadratic): {_cell(metrics['cohen_kappa_weighted'])}")
    if "loss" in metrics:
        lines.append(f"loss (cross-entropy): {float(metrics['loss']):.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# paired tests


def _stuart_maxwell(table: np.ndarray) -> dict[str, Any]:
    """Stuart-Maxwell on the categories that have discordant cases (a category with none adds
    no information and makes the covariance matrix singular)."""
    off = table - np.diag(np.diag(table))
    keep = (off.sum(axis=0) + off.sum(axis=1)) > 0
    if not keep.any():
        return {
            "statistic": 0.0,
            "df": 0,
            "p_value": 1.0,
            "note": "no discordant cases (identical predictions): no evidence of a difference",
        }
    sub = table[np.ix_(keep, keep)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = SquareTable(sub, shift_zeros=False).homogeneity(method="stuart_maxwell")
    out = {"statistic": float(res.statistic), "df": int(res.df), "p_value": float(res.pvalue)}
    if not np.isfinite(out["statistic"]):
        out.update(statistic=math.nan, p_value=math.nan, note="the covariance matrix is singular: test undefined")
    else:
        out["p_value"] = float(chi2.sf(out["statistic"], out["df"]))  # sf keeps tiny p-values, 1 - cdf rounds to 0
    if not keep.all():
        out.setdefault("note", f"{int((~keep).sum())} class(es) without discordant cases left out")
    return out


def paired_multiclass_tests(y: Any, pred_a: Any, pred_b: Any, classes: Sequence[str]) -> dict[str, Any]:
    """Paired tests of two K-class models' predictions on the same cases.

    - ``"stuart_maxwell"``: ``{"statistic", "df", "p_value"}`` (+ ``"note"`` when something was
      degenerate). Marginal homogeneity of the K x K table (rows ``pred_a``, columns ``pred_b``):
      do the two models predict the classes *with the same frequencies*? It ignores ``y``; two
      models can share their marginals and still be wrong on different cases. Categories with no
      discordant cases are left out (df = their count - 1); identical predictions give
      statistic 0, p 1 with a note; a singular covariance gives nan with a note.
    - ``"mcnemar_correct"``: exact McNemar on overall correctness (``pred == y``): is one model
      right more often than the other? (``kneeosteo.evaluation.stats.mcnemar_exact``'s keys:
      ``b``, ``c``, ``statistic``, ``pvalue``.)
    - ``"per_class"``: ``{name: exact McNemar}`` on one-vs-rest correctness for that class
      (a case counts as right for class c when ``(pred == c) == (y == c)``): do the models differ
      in how well they separate class c from the rest?
    """
    classes = _check_classes(classes)
    k = len(classes)
    yy = as_class_indices(y, k, "y")
    a = as_class_indices(pred_a, k, "pred_a")
    b = as_class_indices(pred_b, k, "pred_b")
    check_same_length(y=yy, pred_a=a, pred_b=b)
    table = confusion_matrix(a, b, labels=list(range(k)))
    return {
        "stuart_maxwell": _stuart_maxwell(table),
        "mcnemar_correct": mcnemar_exact(a == yy, b == yy),
        "per_class": {
            name: mcnemar_exact((a == c) == (yy == c), (b == c) == (yy == c)) for c, name in enumerate(classes)
        },
    }
