"""Paired significance tests and seed aggregation for comparing models on one test set.

Two models scored on the *same* images are correlated; unpaired tests (or overlapping
per-model intervals) waste that pairing and badly understate the power of small test sets.
Hence McNemar for paired correctness and DeLong for paired ROC AUCs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import norm, rankdata
from scipy.stats import t as student_t
from statsmodels.stats.contingency_tables import mcnemar

__all__ = ["mcnemar_exact", "delong_test", "delong_auc_ci", "mean_std_ci", "rank_auc_rows"]


def mcnemar_exact(correct_a: Any, correct_b: Any) -> dict[str, Any]:
    """Exact (binomial) McNemar test on the discordant pairs.

    Exact rather than chi-square because with ~70 test images the discordant count b + c is
    usually far below the ~25 the asymptotic version needs. ``b`` = A right & B wrong,
    ``c`` = A wrong & B right; ``statistic`` is min(b, c) as statsmodels reports it.
    """
    a = np.asarray(correct_a).ravel().astype(bool)
    b_ = np.asarray(correct_b).ravel().astype(bool)
    if a.shape != b_.shape:
        raise ValueError(f"correct_a has {a.size} items but correct_b has {b_.size}")
    b = int(np.sum(a & ~b_))
    c = int(np.sum(~a & b_))
    table = [[int(np.sum(a & b_)), b], [c, int(np.sum(~a & ~b_))]]
    if b == c:  # includes b = c = 0: no evidence either way
        return {"b": b, "c": c, "statistic": float(b), "pvalue": 1.0}
    res = mcnemar(table, exact=True)
    return {"b": b, "c": c, "statistic": float(res.statistic), "pvalue": float(min(1.0, res.pvalue))}


def _auc_from_pooled_ranks(tz: np.ndarray, m: int, n: int) -> np.ndarray:
    """Mann-Whitney U / (m n) per row, from midranks of the pooled [positives | negatives]."""
    return (tz[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)


def rank_auc_rows(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Row-wise AUC of score rows ``pos`` (b, m) against ``neg`` (b, k), ties counting 1/2.

    The DeLong internals' AUC, exposed for the stratified bootstrap: one call ranks all
    replicates at once, where ``sklearn.metrics.roc_auc_score`` per replicate is far slower
    (one call per replicate) and differs in the last bit. Point AUCs
    use ``roc_auc_score``.
    """
    m, n = pos.shape[1], neg.shape[1]
    return _auc_from_pooled_ranks(rankdata(np.concatenate([pos, neg], axis=1), axis=1), m, n)


def _delong_components(y_true: Any, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and DeLong covariance of k score rows, O(k n log n) via midranks (Sun & Xu 2014).

    Placement values: V10 (per positive) = share of negatives scored below it, V01 (per
    negative) = share of positives scored above it, ties counting 1/2. Both come from the
    difference between a case's midrank in the pooled sample and within its own class.
    """
    y = np.asarray(y_true).ravel()
    if not np.all(np.isin(y, (0, 1))):
        raise ValueError("y_true must contain only 0/1 labels")
    probs = np.atleast_2d(np.asarray(probs, dtype=np.float64))
    if probs.shape[1] != y.size:
        raise ValueError(f"y_true has {y.size} items but the scores have {probs.shape[1]}")
    if not np.all(np.isfinite(probs)):
        raise ValueError("scores contain NaN or inf")
    pos, neg = probs[:, y == 1], probs[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs >= 2 cases per class, got {m} positive and {n} negative")
    tx = rankdata(pos, axis=1)
    ty = rankdata(neg, axis=1)
    tz = rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    aucs = _auc_from_pooled_ranks(tz, m, n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def delong_test(y_true: Any, prob_a: Any, prob_b: Any, alpha: float = 0.05) -> dict[str, float]:
    """DeLong's test of H0: AUC_a == AUC_b for two models scored on the same cases.

    Returns both AUCs, ``diff`` = auc_a - auc_b, its standard error, z, the two-sided p-value
    and a (1 - alpha) Wald interval for ``diff``. Identical AUCs give z = 0, p = 1. If the
    variance estimate is exactly 0 while the AUCs differ (degenerate, e.g. one perfect model
    against a constant one), the asymptotic test is undefined and z, p and the CI are nan.
    """
    aucs, cov = _delong_components(y_true, np.vstack([np.ravel(prob_a), np.ravel(prob_b)]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    se = math.sqrt(max(var, 0.0))  # rounding can push a true 0 slightly negative
    out = {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "diff": diff, "se": se}
    if diff == 0.0:
        out.update(z=0.0, pvalue=1.0, ci_low=-norm.ppf(1 - alpha / 2) * se, ci_high=norm.ppf(1 - alpha / 2) * se)
    elif se == 0.0:
        out.update(z=math.nan, pvalue=math.nan, ci_low=math.nan, ci_high=math.nan)
    else:
        z = diff / se
        half = float(norm.ppf(1 - alpha / 2)) * se
        out.update(
            z=float(z),
            pvalue=float(2.0 * norm.sf(abs(z))),
            ci_low=max(-1.0, diff - half),
            ci_high=min(1.0, diff + half),
        )
    return out


def delong_auc_ci(y_true: Any, prob: Any, alpha: float = 0.05) -> dict[str, float]:
    """AUC with a DeLong-variance Wald interval clipped to [0, 1].

    Consistent with ``delong_test`` (same variance), and deterministic unlike the bootstrap.
    At AUC = 1 the variance is 0 and the interval collapses to [1, 1].
    """
    aucs, cov = _delong_components(y_true, np.ravel(prob)[None, :])
    auc = float(aucs[0])
    se = math.sqrt(max(float(cov[0, 0]), 0.0))
    half = float(norm.ppf(1 - alpha / 2)) * se
    return {"auc": auc, "se": se, "ci_low": max(0.0, auc - half), "ci_high": min(1.0, auc + half)}


def mean_std_ci(values: Any, alpha: float = 0.05) -> dict[str, float]:
    """Mean, sample std (ddof=1) and Student-t interval of a metric across training seeds.

    t rather than normal because seed counts are tiny (3-5). With one seed the spread is
    unknown, so std and the interval are nan rather than a misleading 0. A nan value
    (e.g. an undefined precision in one run) propagates instead of being silently dropped.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    n = int(x.size)
    if n == 0:
        raise ValueError("mean_std_ci needs at least one value")
    mean = float(np.mean(x))
    if n == 1:
        return {"mean": mean, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 1}
    std = float(np.std(x, ddof=1))
    half = float(student_t.ppf(1 - alpha / 2, df=n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "n": n}
