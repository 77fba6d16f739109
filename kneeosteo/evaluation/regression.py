"""Metrics with confidence intervals for a regression task: the model predicts the DXA T-score
(``target="t_score"``) or the bone mineral density (``target="bmd"``) of a knee radiograph.

Agreement with the reference is reported the way method-comparison studies do: error size (MAE,
RMSE), systematic error (bias = mean of ``pred - true``), association (Pearson, Spearman) and the
Bland-Altman limits of agreement, between which 95% of the differences are expected to fall.
For T-scores the predictions are also scored as the clinical decision they feed: the WHO band
(normal / osteopenia / osteoporosis, :mod:`kneeosteo.data.who`) of the prediction against the
band of the reference, and the binary "osteoporosis or not" (T <= -2.5).

Conventions as in :mod:`.metrics`: plain functions over numpy arrays, seeded percentile
bootstrap (resampling cases, i.e. (true, pred) pairs), plain floats in the outputs (``nan``
where undefined), so ``json.dumps`` works.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.stats import pearsonr, rankdata, spearmanr
from scipy.stats import t as student_t

from kneeosteo.data.who import WHO_CLASSES, WHO_CUTOFFS, who_band_index
from kneeosteo.errors import ArrayError
from kneeosteo.evaluation.metrics import _ratio, accuracy, confusion_counts, sensitivity, specificity
from kneeosteo.evaluation.multiclass import _cell, _interval, format_multiclass_table, label_metrics_with_ci
from kneeosteo.evaluation.stats import mean_std_ci
from kneeosteo.utils.arrays import as_values, check_same_length
from kneeosteo.utils.intervals import (
    bootstrap_replicates,
    check_interval_settings,
    percentile_interval,
    wilson_interval,
)

__all__ = ["TARGETS", "LOA_Z", "bland_altman_limits", "regression_metrics_with_ci", "format_regression_table"]

#: Targets a regression model may predict; only T-scores have the WHO cut-offs.
TARGETS = ("t_score", "bmd")

#: Bland & Altman's multiplier: the limits of agreement are bias +- 1.96 SD of the differences.
LOA_Z = 1.96


def _check_pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t, p = as_values(y_true, "y_true"), as_values(y_pred, "y_pred")
    check_same_length(y_true=t, y_pred=p)
    if t.size < 3:
        raise ArrayError(f"regression metrics need at least 3 cases, got {t.size}")
    return t, p


def bland_altman_limits(y_true: Any, y_pred: Any, alpha: float = 0.05) -> dict[str, Any]:
    """Bland-Altman bias and 95% limits of agreement of ``d = y_pred - y_true``, with (1 - alpha)
    intervals.

    ``bias`` = mean(d) with a Student-t interval; ``sd`` = SD(d) (ddof=1); the limits are
    ``bias -+ 1.96 sd``, each with the approximate interval of Bland & Altman (1999, section 5.2):
    SE(limit) = sqrt(3 sd^2 / n), limit -+ t(1 - alpha/2, n - 1) SE. Returns
    ``{"bias", "lower", "upper"}`` (each ``{"value", "ci_low", "ci_high", "method"}``) and
    ``"sd"``, ``"n"``.
    """
    t, p = _check_pair(y_true, y_pred)
    d = p - t
    n = int(d.size)
    m = mean_std_ci(d, alpha=alpha)
    sd = m["std"]
    half = float(student_t.ppf(1 - alpha / 2, df=n - 1)) * math.sqrt(3.0 * sd**2 / n)
    out: dict[str, Any] = {"bias": _interval(m["mean"], m["ci_low"], m["ci_high"], "t")}
    for name, sign in (("lower", -1.0), ("upper", 1.0)):
        limit = m["mean"] + sign * LOA_Z * sd
        out[name] = _interval(limit, limit - half, limit + half, "bland_altman_1999")
    out["sd"] = float(sd)
    out["n"] = n
    return out


def _row_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row pair of (b, n) arrays; nan for a constant row."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(axis=1) / np.where(den > 0, den, 1.0), math.nan)


def _bootstrap(t: np.ndarray, p: np.ndarray, n_boot: int, seed: int) -> dict[str, np.ndarray]:
    def statistic(idx: np.ndarray) -> dict[str, np.ndarray]:
        bt, bp = t[idx], p[idx]
        d = bp - bt
        return {
            "mae": np.abs(d).mean(axis=1),
            "rmse": np.sqrt((d * d).mean(axis=1)),
            "spearman_r": _row_corr(rankdata(bt, axis=1), rankdata(bp, axis=1)),
        }

    return bootstrap_replicates(statistic, [np.arange(t.size)], n_boot, seed)


def _correlation(fn, t: np.ndarray, p: np.ndarray) -> tuple[float, float, Any]:
    """(r, p-value, scipy result); nan for a constant input, where r is undefined."""
    if np.ptp(t) == 0 or np.ptp(p) == 0:
        return math.nan, math.nan, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fn(t, p)
    return float(res.statistic), float(res.pvalue), res


def _binary_osteoporosis(t: np.ndarray, p: np.ndarray, alpha: float) -> dict[str, Any]:
    positive = WHO_CLASSES.index("osteoporosis")
    counts = confusion_counts(who_band_index(t) == positive, who_band_index(p) == positive)
    out: dict[str, Any] = {"cutoff": float(WHO_CUTOFFS[-1]), "rule": "T <= cutoff", "counts": counts}
    for name, fn in (("sensitivity", sensitivity), ("specificity", specificity), ("accuracy", accuracy)):
        num, den = fn(**counts)
        out[name] = _interval(_ratio(num, den), *wilson_interval(num, den, alpha), "wilson")
    return out


def regression_metrics_with_ci(
    y_true: Any,
    y_pred: Any,
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
    target: str = "t_score",
) -> dict[str, Any]:
    """Agreement of predicted and reference values with (1 - alpha) intervals.

    Returns::

        {"task": "regression", "target", "n",
         "mae", "rmse":      bootstrap percentile (cases resampled, seeded)
         "bias":             mean(pred - true), Student-t interval
         "pearson_r":        Fisher-z interval (scipy), plus "p_value" (scipy.stats.pearsonr)
         "spearman_r":       bootstrap percentile, plus "p_value" (scipy.stats.spearmanr)
         "limits_of_agreement": {"lower", "upper"}  bias -+ 1.96 SD(pred - true), each with
                             Bland & Altman's 1999 interval, and "sd" (see bland_altman_limits)
         "alpha", "n_boot", "seed",
         # target == "t_score" only:
         "who_classification": label_metrics_with_ci of the WHO bands of true vs predicted
                             T-scores (classes normal, osteopenia, osteoporosis; no AUC, no loss:
                             there are no probabilities),
         "binary_osteoporosis": {"cutoff": -2.5, "rule", "counts": {tp, fp, fn, tn},
                             "sensitivity", "specificity", "accuracy"} (Wilson) of
                             "predicted T <= -2.5" for "true T <= -2.5"}

    each metric a ``{"value", "ci_low", "ci_high", "method"}`` dict. ``target="bmd"`` has no
    WHO cut-offs (they are defined on T-scores, and BMD's scale depends on the scanner and the
    site), so the two classification keys are absent. A correlation of a constant input is
    ``nan``. Inputs must be finite, of equal length, n >= 3.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    check_interval_settings(n_boot, alpha)
    t, p = _check_pair(y_true, y_pred)
    d = p - t
    boot = _bootstrap(t, p, int(n_boot), seed)
    ba = bland_altman_limits(t, p, alpha=alpha)

    r, r_p, res = _correlation(pearsonr, t, p)
    lo, hi = (math.nan, math.nan)
    if res is not None:
        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
            warnings.simplefilter("ignore")
            ci = res.confidence_interval(confidence_level=1 - alpha)
        lo, hi = float(ci.low), float(ci.high)
    rho, rho_p, _ = _correlation(spearmanr, t, p)

    out: dict[str, Any] = {
        "task": "regression",
        "target": target,
        "n": int(t.size),
        "mae": _interval(float(np.abs(d).mean()), *percentile_interval(boot["mae"], alpha), "bootstrap"),
        "rmse": _interval(float(np.sqrt((d * d).mean())), *percentile_interval(boot["rmse"], alpha), "bootstrap"),
        "bias": ba["bias"],
        "pearson_r": {**_interval(r, lo, hi, "fisher_z"), "p_value": r_p},
        "spearman_r": {
            **_interval(rho, *percentile_interval(boot["spearman_r"], alpha), "bootstrap"),
            "p_value": rho_p,
        },
        "limits_of_agreement": {"lower": ba["lower"], "upper": ba["upper"], "sd": ba["sd"]},
        "alpha": float(alpha),
        "n_boot": int(n_boot),
        "seed": int(seed),
    }
    if target == "t_score":
        out["who_classification"] = label_metrics_with_ci(
            who_band_index(t), who_band_index(p), WHO_CLASSES, alpha=alpha, n_boot=n_boot, seed=seed
        )
        out["binary_osteoporosis"] = _binary_osteoporosis(t, p, alpha)
    return out


def format_regression_table(metrics: Mapping[str, Any]) -> str:
    """Plain text of a :func:`regression_metrics_with_ci` result: one line per agreement metric
    as ``0.412 [0.35, 0.48]``, then (T-scores) the WHO band table and the binary line."""
    loa = metrics["limits_of_agreement"]
    lines = [
        f"{metrics['target']} regression, n = {metrics['n']}",
        f"MAE:        {_cell(metrics['mae'])}",
        f"RMSE:       {_cell(metrics['rmse'])}",
        f"bias:       {_cell(metrics['bias'])}  (mean of predicted - true)",
        f"Pearson r:  {_cell(metrics['pearson_r'])}  p = {metrics['pearson_r']['p_value']:.3g}",
        f"Spearman r: {_cell(metrics['spearman_r'])}  p = {metrics['spearman_r']['p_value']:.3g}",
        f"limits of agreement: lower {_cell(loa['lower'])}, upper {_cell(loa['upper'])}",
    ]
    if "who_classification" in metrics:
        lines += [
            "",
            "WHO bands of predicted vs true T-scores:",
            format_multiclass_table(metrics["who_classification"]),
        ]
    if "binary_osteoporosis" in metrics:
        b = metrics["binary_osteoporosis"]
        lines += [
            "",
            f"osteoporosis (T <= {b['cutoff']}): sensitivity {_cell(b['sensitivity'])}, "
            f"specificity {_cell(b['specificity'])}, accuracy {_cell(b['accuracy'])}",
        ]
    return "\n".join(lines)
