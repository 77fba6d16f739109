"""Has a batch of images drifted away from the films the model was calibrated on? (issue 33)

No labels needed. Two one-dimensional distributions of the batch are compared with what the run
stored when its trust pieces were fitted (:class:`ShiftReference`):

- **domain scores** (feature distances) against held-out in-domain distances: the out-of-fold
  distances of the training images (training, ``calibrate RUN``), or the site's own films'
  distances (``calibrate RUN SITE``). One-sided: the alarm asks whether the batch lies *further*
  from the training images; a batch closer to them is no reason to doubt an answer.
- **calibrated probabilities** against those of the calibration images (validation partition,
  or the site's films). Two-sided: a batch whose probabilities crowd at one end, or in the
  middle, is unlike the calibration set either way. It also moves when the batch's class mix
  differs from the calibration set's (a clinic that sees mostly one class): that is a shift too
  (the conformal guarantee assumes exchangeable images), not necessarily a failing model.

Each comparison is a Kolmogorov-Smirnov statistic (largest gap between the two empirical
distribution functions; one-sided for the domain scores) with a **permutation p-value**
(:func:`scipy.stats.permutation_test`, ``PERMUTATIONS`` resamples, a fixed seed so a batch always
gets the same answer). Permutation rather than the asymptotic KS law: the reference sets are
small (27 validation probabilities on KOP), and the permutation p-value is exact for any sizes
under exchangeability. The two p-values are combined by Bonferroni (the smaller one doubled); the
alarm fires when that is at most ``ALPHA`` (0.01: at most one false alarm in a hundred batches
drawn like the reference). Below ``MIN_SHIFT_IMAGES`` images the test is not run at all: a
handful of films cannot show a shift, and an alarm on them would be noise.

What it cannot see: a shift that leaves both distributions where they were (a site whose films
look alike to the backbone but whose labels mean something else); only the site's labels show
that (``kneeosteo calibrate RUN SITE``'s site check).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kneeosteo.utils.arrays import as_values, check_nonempty

from ._base import TrustEstimator

__all__ = ["ALPHA", "MIN_SHIFT_IMAGES", "PERMUTATIONS", "BatchShift", "ShiftReference", "batch_shift"]

ALPHA = 0.01
MIN_SHIFT_IMAGES = 20
PERMUTATIONS = 2000
_SEED = 0


def _ks(x: np.ndarray, y: np.ndarray, axis: int = -1, one_sided: bool = False) -> np.ndarray:
    """KS statistic of batch ``x`` against reference ``y`` along ``axis`` (vectorised over the rest).

    One-sided: ``max_t F_y(t) - F_x(t)``, large when ``x`` lies above ``y``."""
    x, y = np.moveaxis(x, axis, -1), np.moveaxis(y, axis, -1)
    values = np.concatenate([x, y], axis=-1)
    weights = np.concatenate([np.full(x.shape, -1.0 / x.shape[-1]), np.full(y.shape, 1.0 / y.shape[-1])], axis=-1)
    order = np.argsort(values, axis=-1, kind="stable")
    sorted_values = np.take_along_axis(values, order, axis=-1)
    gap = np.cumsum(np.take_along_axis(weights, order, axis=-1), axis=-1)
    # only where the value changes: tied values enter the distribution functions together
    last = np.concatenate(
        [sorted_values[..., 1:] != sorted_values[..., :-1], np.ones(sorted_values.shape[:-1] + (1,), dtype=bool)],
        axis=-1,
    )
    gap = np.where(last, gap, 0.0)
    return gap.max(axis=-1) if one_sided else np.abs(gap).max(axis=-1)


def _test(batch: np.ndarray, reference: np.ndarray, one_sided: bool) -> dict:
    from scipy.stats import permutation_test  # here: 20 images or more; predict's start-up does without it

    res = permutation_test(
        (batch, reference),
        lambda a, b, axis=-1: _ks(a, b, axis, one_sided),
        permutation_type="independent",
        vectorized=True,
        n_resamples=PERMUTATIONS,
        alternative="greater",
        random_state=_SEED,
    )
    return {
        "statistic": float(res.statistic),
        "p_value": float(res.pvalue),
        "n": int(batch.size),
        "n_reference": int(reference.size),
        "alternative": "further from the training images" if one_sided else "different (either way)",
    }


class ShiftReference(TrustEstimator):
    """What a batch is compared with: ``fit(domain_scores, probabilities, source)`` keeps held-out
    in-domain ``domain_scores_`` (None: not stored, an older run, or no feature check), the
    calibration images' calibrated ``probabilities_`` (None: not stored) and ``source_`` (where each
    came from). :meth:`predict` is the alarm on one batch (:func:`batch_shift`)."""

    def __init__(self):
        pass

    @staticmethod
    def _reference(values, name: str) -> np.ndarray | None:
        if values is None:
            return None
        a = as_values(values, f"shift reference {name}", flatten=True)
        return check_nonempty(a, f"shift reference {name}")

    def fit(self, domain_scores=None, probabilities=None, source: dict | None = None) -> ShiftReference:
        self.domain_scores_ = self._reference(domain_scores, "domain_scores")
        self.probabilities_ = self._reference(probabilities, "probabilities")
        self.source_ = dict(source or {})
        return self

    def predict(self, domain_scores=None, probabilities=None) -> BatchShift:
        """The alarm's answer for one batch."""
        return batch_shift(self, domain_scores, probabilities)

    def get_state(self) -> dict:
        self._check_fitted()
        state: dict = {"source": dict(self.source_)}
        for name in ("domain_scores", "probabilities"):
            a = getattr(self, name + "_")
            if a is not None:
                state[name] = np.asarray(a, dtype=np.float64)
        return state

    @classmethod
    def from_state(cls, state: dict) -> ShiftReference:
        return cls().fit(state.get("domain_scores"), state.get("probabilities"), state.get("source"))


@dataclass(frozen=True)
class BatchShift:
    """The alarm's answer for one batch. ``verdict``: ``shift``, ``no shift detected``,
    ``too few images`` or ``unavailable``; ``statistic`` and ``p_value`` of the deciding
    comparison (Bonferroni-adjusted p), ``n`` the batch's images, ``tests`` each comparison,
    ``note`` the sentence a user reads."""

    verdict: str
    n: int
    statistic: float | None = None
    p_value: float | None = None
    tests: dict | None = None
    note: str = ""

    @property
    def fired(self) -> bool:
        return self.verdict == "shift"

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "statistic": self.statistic,
            "p_value": self.p_value,
            "n": self.n,
            "alpha": ALPHA,
            "min_n": MIN_SHIFT_IMAGES,
            "test": "Kolmogorov-Smirnov, permutation p-value "
            f"({PERMUTATIONS} resamples), Bonferroni over the comparisons run",
            "tests": self.tests or {},
            "note": self.note,
        }

    def line(self) -> str:
        """One line for the console."""
        if self.p_value is None:
            return f"batch shift: {self.verdict} ({self.note})"
        return f"batch shift: {self.verdict} (n {self.n}, KS {self.statistic:.3f}, p {self.p_value:.3g}; {self.note})"


def batch_shift(reference: ShiftReference | None, domain_scores=None, probabilities=None) -> BatchShift:
    """Compare a batch's domain scores and calibrated probabilities (one per image; NaN or None
    entries, images without a score, are left out of that comparison) with ``reference``."""
    p = np.asarray([] if probabilities is None else probabilities, dtype=np.float64).reshape(-1)
    d = np.asarray(
        [] if domain_scores is None else [np.nan if v is None else v for v in domain_scores], dtype=np.float64
    ).reshape(-1)
    p, d = p[np.isfinite(p)], d[np.isfinite(d)]
    n = int(max(p.size, d.size))
    if reference is None or (reference.probabilities_ is None and reference.domain_scores_ is None):
        return BatchShift(
            "unavailable",
            n,
            note="this run stores no reference distributions (fitted before "
            "the alarm existed); refit its trust files with `kneeosteo calibrate`",
        )
    if n < MIN_SHIFT_IMAGES:
        return BatchShift(
            "too few images", n, note=f"the alarm needs at least {MIN_SHIFT_IMAGES} images; {n} cannot show a shift"
        )
    tests, missing = {}, []
    if reference.domain_scores_ is not None and d.size >= MIN_SHIFT_IMAGES:
        tests["domain_score"] = _test(d, reference.domain_scores_, one_sided=True)
    elif reference.domain_scores_ is None:
        missing.append(
            "domain scores: no reference distances stored (run fitted before the alarm existed, or "
            "without a feature check)"
        )
    if reference.probabilities_ is not None and p.size >= MIN_SHIFT_IMAGES:
        tests["probability"] = _test(p, reference.probabilities_, one_sided=False)
    if not tests:
        return BatchShift("unavailable", n, note="; ".join(missing) or "nothing to compare")
    name, worst = min(tests.items(), key=lambda kv: kv[1]["p_value"])
    adjusted = min(1.0, worst["p_value"] * len(tests))
    fired = adjusted <= ALPHA
    what = {
        "domain_score": "the images lie further from the training films than held-out ones do",
        "probability": "the calibrated probabilities are distributed unlike the calibration images'",
    }[name]
    note = (
        f"{what} (p {adjusted:.3g} <= {ALPHA}); the prediction sets' coverage does not hold for this batch"
        if fired
        else f"no comparison reached p <= {ALPHA}"
    )
    if missing:
        note += "; not compared: " + "; ".join(missing)
    return BatchShift("shift" if fired else "no shift detected", n, worst["statistic"], adjusted, tests, note)
