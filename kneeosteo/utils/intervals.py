"""Confidence intervals, written once: Wilson for a binomial proportion, and a seeded percentile
bootstrap that resamples cases (within strata) and asks a callback for the statistic.

Every interval of the package comes from here: the evaluation's metrics (binary, K-class,
regression), the trust layer's ECE, the shortcut probes, Table I. statsmodels is imported on
first use, so importing this module costs nothing at start-up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "BOOT_CHUNK_ELEMS",
    "bootstrap_replicates",
    "check_interval_settings",
    "percentile_interval",
    "wilson_interval",
]

#: Bounds a bootstrap's memory: at most this many resampled case indices (times ``case_cost``)
#: are drawn at once (~16 MB per float array).
BOOT_CHUNK_ELEMS = 2_000_000


def check_interval_settings(n_boot: int, alpha: float) -> None:
    """A bootstrap needs at least one resample and a (1 - alpha) interval an alpha in (0, 1)."""
    if int(n_boot) < 1:
        raise ValueError("n_boot must be >= 1")
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must be in (0, 1)")


def wilson_interval(count: int, nobs: int, alpha: float = 0.05) -> tuple[float, float]:
    """The (1 - alpha) Wilson interval of ``count`` successes in ``nobs`` trials
    (``statsmodels.stats.proportion.proportion_confint``); ``(nan, nan)`` when ``nobs`` is 0.

    Wilson rather than Wald: stays inside [0, 1] and keeps coverage near 0/1 and at n ~ 30."""
    if nobs == 0:
        return math.nan, math.nan
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = proportion_confint(count, nobs, alpha=alpha, method="wilson")
    return float(lo), float(hi)


def percentile_interval(replicates: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """The (alpha / 2, 1 - alpha / 2) quantiles of the finite replicates; ``(nan, nan)`` if none is."""
    samples = np.asarray(replicates, dtype=np.float64)
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(finite, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def bootstrap_replicates(
    statistic: Callable[[np.ndarray], Mapping[str, np.ndarray]],
    strata: Sequence[np.ndarray],
    n_boot: int,
    seed: int | np.random.Generator,
    *,
    case_cost: int = 1,
    chunk: int | None = None,
) -> dict[str, np.ndarray]:
    """``n_boot`` replicates of ``statistic`` on resamples of the cases.

    ``strata`` are arrays of case indices; each resample draws, from each stratum in turn, as many
    of its members as it holds, with replacement (one stratum of all cases: the plain bootstrap;
    one per class: the stratified one, which keeps the class counts). Empty strata are skipped.
    ``statistic(idx)`` receives a (b, n) array of case indices for b resamples at once (each
    stratum's draws side by side, in the order given) and returns named arrays whose first axis is
    b; the result concatenates them over all ``n_boot`` resamples. Resamples are drawn ``chunk``
    at a time (default: as many as keep ``b * n * case_cost`` under :data:`BOOT_CHUNK_ELEMS`)
    from ``numpy.random.default_rng(seed)``, so a seed gives the same replicates on every run.
    """
    rng = np.random.default_rng(seed)
    members = [np.asarray(s, dtype=np.int64) for s in strata if len(s)]
    n = sum(m.size for m in members)
    if chunk is None:
        chunk = max(1, BOOT_CHUNK_ELEMS // max(1, n * case_cost))
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, int(n_boot), chunk):
        b = min(chunk, int(n_boot) - start)
        blocks = [m[rng.integers(0, m.size, size=(b, m.size))] for m in members]
        idx = np.concatenate(blocks, axis=1) if blocks else np.empty((b, 0), dtype=np.int64)
        for name, values in statistic(idx).items():
            parts.setdefault(name, []).append(np.asarray(values))
    return {name: np.concatenate(values, axis=0) for name, values in parts.items()}
