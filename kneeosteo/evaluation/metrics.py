"""Binary classification metrics for the knee osteoporosis test set, with confidence intervals.

Plain functions over numpy arrays (MONAI-style ``compute_*`` functions, no stateful metric
objects), so every number in a results table can be recomputed from saved predictions alone.

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
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score
from statsmodels.stats.proportion import proportion_confint

__all__ = [
    "PAPER_COLUMNS",
    "PROPORTION_METRICS",
    "BOOTSTRAP_METRICS",
    "confusion_counts",
    "binary_metrics",
    "metrics_with_ci",
    "format_table",
]

#: Table I column order of the paper (its "Ours" row is TP 34, FP 4, FN 7, TN 27).
PAPER_COLUMNS: tuple[str, ...] = (
    "sensitivity",
    "specificity",
    "precision",
    "fpr",
    "accuracy",
    "f1",
    "loss",
)

#: Metrics that are a binomial proportion count/nobs, hence get a Wilson interval.
PROPORTION_METRICS: tuple[str, ...] = ("sensitivity", "specificity", "precision", "fpr", "accuracy")

#: Metrics that are not a single proportion, hence get a stratified bootstrap interval.
BOOTSTRAP_METRICS: tuple[str, ...] = ("f1", "auc", "loss")

_EPS = 1e-7  # Keras' default epsilon: keeps the loss comparable with the paper's Keras logs.
_BOOT_CHUNK_ELEMS = 2_000_000  # bounds bootstrap memory (~16 MB per float array) for large n.


# ---------------------------------------------------------------------------------------------
# input handling


def _as_labels(y: Any, name: str) -> np.ndarray:
    arr = np.asarray(y).ravel()
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if arr.size and not np.all(np.isin(arr, (0, 1))):
        raise ValueError(f"{name} must contain only 0/1 labels, got values {np.unique(arr)[:10]}")
    return arr.astype(np.int64)


def _as_probs(prob: Any) -> np.ndarray:
    arr = np.asarray(prob, dtype=np.float64).ravel()
    if not np.all(np.isfinite(arr)):
        raise ValueError("prob contains NaN or inf")
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ValueError(f"prob must lie in [0, 1], got range [{arr.min()}, {arr.max()}]")
    return arr


def _check_pair(y_true: Any, prob: Any) -> tuple[np.ndarray, np.ndarray]:
    y = _as_labels(y_true, "y_true")
    p = _as_probs(prob)
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} items but prob has {p.size}")
    if y.size == 0:
        raise ValueError("empty input: no metric is defined on zero cases")
    return y, p


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else math.nan


# ---------------------------------------------------------------------------------------------
# point estimates


def confusion_counts(y_true: Any, y_pred: Any) -> dict[str, int]:
    """Return ``{"tp", "fp", "fn", "tn"}`` as plain ints (positive class = 1)."""
    y = _as_labels(y_true, "y_true")
    yp = _as_labels(y_pred, "y_pred")
    if y.shape != yp.shape:
        raise ValueError(f"y_true has {y.size} items but y_pred has {yp.size}")
    tp = int(np.sum((y == 1) & (yp == 1)))
    fp = int(np.sum((y == 0) & (yp == 1)))
    fn = int(np.sum((y == 1) & (yp == 0)))
    tn = int(np.sum((y == 0) & (yp == 0)))
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _bce(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Per-case cross-entropy; clipping mirrors Keras so a confident miss costs ~16, not inf."""
    pc = np.clip(p, _EPS, 1.0 - _EPS)
    return -(y * np.log(pc) + (1 - y) * np.log1p(-pc))


def _from_counts(tp: float, fp: float, fn: float, tn: float) -> dict[str, float]:
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, fp + tn),
        "precision": _ratio(tp, tp + fp),
        "fpr": _ratio(fp, fp + tn),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def binary_metrics(y_true: Any, prob: Any, threshold: float = 0.5) -> dict[str, Any]:
    """Paper Table II metrics plus AUC at one operating point.

    ``auc`` is threshold-free and ``nan`` when only one class is present (sklearn would raise).
    """
    y, p = _check_pair(y_true, prob)
    counts = confusion_counts(y, (p >= threshold).astype(np.int64))
    out: dict[str, Any] = _from_counts(**counts)
    out["loss"] = float(np.mean(_bce(y, p)))
    out["auc"] = float(roc_auc_score(y, p)) if 0 < y.sum() < y.size else math.nan
    out.update(counts)
    out["threshold"] = float(threshold)
    out["n"] = int(y.size)
    return out


# ---------------------------------------------------------------------------------------------
# intervals


def _wilson(count: int, nobs: int, alpha: float) -> tuple[float, float]:
    """Wilson rather than Wald: stays inside [0, 1] and keeps coverage near 0/1 and at n ~ 30."""
    if nobs == 0:
        return math.nan, math.nan
    lo, hi = proportion_confint(count, nobs, alpha=alpha, method="wilson")
    return float(lo), float(hi)


def _rank_auc_rows(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Row-wise AUC via the Mann-Whitney U statistic (midranks give ties credit 1/2)."""
    m, n = pos.shape[1], neg.shape[1]
    ranks = rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    u = ranks[:, :m].sum(axis=1) - m * (m + 1) / 2.0
    return u / (m * n)


def _stratified_bootstrap(
    y: np.ndarray, p: np.ndarray, threshold: float, n_boot: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Resample positives and negatives separately so every replicate keeps the test set's
    class balance (and AUC stays defined), vectorised over replicates in memory-bounded chunks."""
    p_pos, p_neg = p[y == 1], p[y == 0]
    l_pos, l_neg = _bce(np.ones_like(p_pos), p_pos), _bce(np.zeros_like(p_neg), p_neg)
    m, k = p_pos.size, p_neg.size
    n = m + k
    f1 = np.empty(n_boot)
    auc = np.full(n_boot, math.nan)
    loss = np.empty(n_boot)
    chunk = max(1, _BOOT_CHUNK_ELEMS // n)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        ip = rng.integers(0, m, size=(b, m)) if m else np.empty((b, 0), dtype=np.int64)
        ineg = rng.integers(0, k, size=(b, k)) if k else np.empty((b, 0), dtype=np.int64)
        bp, bn = p_pos[ip], p_neg[ineg]
        tp = (bp >= threshold).sum(axis=1)
        fp = (bn >= threshold).sum(axis=1)
        fn = m - tp
        den = 2 * tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            f1[start : start + b] = np.where(den > 0, 2 * tp / den, math.nan)
        loss[start : start + b] = (l_pos[ip].sum(axis=1) + l_neg[ineg].sum(axis=1)) / n
        if m and k:
            auc[start : start + b] = _rank_auc_rows(bp, bn)
    return {"f1": f1, "auc": auc, "loss": loss}


def _percentile_ci(samples: np.ndarray, alpha: float) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(finite, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


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

    Proportions get Wilson intervals (exact-count based, no resampling noise); f1, auc and
    loss are not single proportions and get stratified percentile-bootstrap intervals
    (seeded ``numpy.random.Generator``, so reruns are bit-identical).

    Each metric maps to ``{"value", "ci_low", "ci_high", "method"}``; undefined values and
    intervals are ``nan``. Also returned: ``counts``, ``threshold``, ``n``, ``n_positive``,
    ``n_negative``, and the ``alpha``, ``n_boot``, ``seed`` used.
    """
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must be in (0, 1)")
    y, p = _check_pair(y_true, prob)
    point = binary_metrics(y, p, threshold=threshold)
    tp, fp, fn, tn = (point[k] for k in ("tp", "fp", "fn", "tn"))
    proportions = {
        "sensitivity": (tp, tp + fn),
        "specificity": (tn, fp + tn),
        "precision": (tp, tp + fp),
        "fpr": (fp, fp + tn),
        "accuracy": (tp + tn, tp + fp + fn + tn),
    }
    out: dict[str, Any] = {}
    for name, (count, nobs) in proportions.items():
        lo, hi = _wilson(count, nobs, alpha)
        out[name] = {"value": point[name], "ci_low": lo, "ci_high": hi, "method": "wilson"}

    boot = _stratified_bootstrap(y, p, float(threshold), int(n_boot), np.random.default_rng(seed))
    for name in BOOTSTRAP_METRICS:
        value = point[name]
        lo, hi = _percentile_ci(boot[name], alpha) if not math.isnan(value) else (math.nan, math.nan)
        out[name] = {"value": value, "ci_low": lo, "ci_high": hi, "method": "bootstrap"}

    out["counts"] = {"tp": tp, "fp": fp, "fn": fn, "tn": tn}
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
    columns: Sequence[str] = PAPER_COLUMNS + ("auc",),
) -> str:
    """Markdown table, one row per model, cells "value [lo, hi]" to 4 decimals.

    Accepts ``metrics_with_ci`` outputs (with intervals) or ``binary_metrics`` outputs (bare
    values) so the paper's numbers and ours can sit in one table; a missing metric shows "-".
    """
    header = ["model", *columns]
    body = [[str(name), *(_fmt_cell(row.get(col)) for col in columns)] for name, row in rows.items()]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in body)])
