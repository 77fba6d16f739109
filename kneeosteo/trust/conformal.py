"""Split-conformal prediction sets for the binary classifier (Vovk et al.; Angelopoulos & Bates).

Calibrated on held-out images never used to fit the model: each gets the non-conformity score
``1 - p(its true class)`` (``1 - p`` for a positive, ``p`` for a negative). A new image's set
holds every class whose score is no larger than the calibration quantile, so the true class
is in the set for at least ``coverage`` of exchangeable new images. A set of one class is a
confident answer; both classes (or, at low coverage, none) means "uncertain".

The p-values come from crepes' :class:`crepes.ConformalClassifier` (non-smoothed, so a
prediction is deterministic): a class is in the set when its p-value is ``>= 1 - coverage``.
``fit`` turns that rule into one stored quantile per class (``+inf`` when the calibration set is
too small for the coverage, so both classes are always in), and ``predict`` compares against it,
which gives exactly crepes' sets without keeping crepes on the serving path. With
``class_conditional=True`` (Mondrian) each class gets its own quantile from its own calibration
images, so coverage holds within each class, at the price of fewer images per quantile.

The same class takes (n, K) class probabilities of a multiclass run: score ``1 - p(true class)``,
class c in the set when ``1 - p_c`` is no larger than its quantile.
"""

from __future__ import annotations

import numpy as np

from kneeosteo.errors import ConfigError, DataError
from kneeosteo.utils.arrays import as_binary_labels, as_class_indices, as_matrix, as_scores_and_labels, as_values

from ._base import TrustEstimator

__all__ = [
    "CLASS_NAMES",
    "ConformalClassifier",
    "abstention_rate",
    "empirical_coverage",
    "empirical_set_coverage",
    "nonconformity",
]

CLASS_NAMES = ("normal", "osteoporosis")  # index 0 negative, 1 positive


def nonconformity(probabilities) -> np.ndarray:
    """(n, 2) scores: column c is ``1 - p(class c)``, i.e. ``[p, 1 - p]``."""
    p = as_values(probabilities, "probabilities")
    return np.stack([p, 1 - p], axis=1)


def _check_coverage(coverage: float) -> float:
    if not (isinstance(coverage, (int, float)) and 0 < coverage < 1):
        raise ConfigError(f"coverage must lie in (0, 1), such as 0.9; got {coverage!r}")
    return float(coverage)


def _crepes_quantile(cal_alphas: np.ndarray, coverage: float) -> float:
    """The largest score crepes still admits at ``coverage`` (``inf`` if it admits all).

    Inclusion is monotone in the score and changes only at calibration scores, so asking crepes
    for the p-values of the calibration scores themselves (and of one score above them all)
    finds the exact boundary."""
    from crepes import ConformalClassifier as _CrepesClassifier  # fitting only: not on predict's path

    cc = _CrepesClassifier().fit(cal_alphas)
    probe = np.append(np.unique(cal_alphas), np.inf)
    admitted = cc.predict_p(probe, smoothing=False) >= 1 - coverage
    if admitted[-1]:
        return float("inf")
    return float(probe[:-1][admitted[:-1]].max()) if admitted[:-1].any() else float("-inf")


class ConformalClassifier(TrustEstimator):
    """Split-conformal sets at ``coverage`` over the classes of calibrated probabilities: (n,)
    probabilities of the positive class (two classes) or (n, K) class probabilities; the data
    decide. Fitted: ``quantiles_`` (K,), ``calibration_scores_`` and ``calibration_labels_`` (for
    p-values), ``n_calibration_``.

    ``class_names``: the names :meth:`predict` gives (default ``normal``/``osteoporosis`` for two
    classes, the class indices for K). With ``class_conditional`` a class without calibration
    images (K classes) gets quantile ``+inf``: it is in every set, as crepes puts every class in
    when it has too few scores; two classes need both."""

    method = "split_conformal"

    def __init__(self, coverage: float = 0.9, class_conditional: bool = False, class_names: tuple | None = None):
        self.coverage = coverage
        self.class_conditional = class_conditional
        self.class_names = class_names

    @staticmethod
    def _scores(probabilities) -> np.ndarray:
        """(n, K) non-conformity scores ``1 - p(class c)``."""
        if np.ndim(probabilities) == 2 and np.shape(probabilities)[1] != 1:
            return 1.0 - as_matrix(probabilities, "probabilities")
        return nonconformity(probabilities)

    def fit(self, probabilities, y) -> ConformalClassifier:
        """Calibrate on held-out probabilities and their labels (0/1, or class indices in [0, K))."""
        coverage = _check_coverage(self.coverage)
        if not isinstance(self.class_conditional, (bool, np.bool_)):
            raise ConfigError(f"class_conditional must be True or False, got {self.class_conditional!r}")
        if np.ndim(probabilities) == 2 and np.shape(probabilities)[1] != 1:
            p = as_matrix(probabilities, "conformal calibration probabilities")
            k = p.shape[1]
            yy = as_class_indices(y, k, "conformal calibration labels", n=p.shape[0])
            alphas = 1.0 - p[np.arange(yy.size), yy]
        else:
            pb, yy = as_scores_and_labels(
                probabilities, y, both_classes=bool(self.class_conditional), name="conformal calibration probabilities"
            )
            k, alphas = 2, nonconformity(pb)[np.arange(pb.size), yy]
        names = self._names(k)
        if self.class_conditional:
            q = [_crepes_quantile(alphas[yy == c], coverage) if np.any(yy == c) else np.inf for c in range(k)]
        else:
            q = [_crepes_quantile(alphas, coverage)] * k
        self.quantiles_ = np.asarray(q, dtype=np.float64)
        self.calibration_scores_, self.calibration_labels_ = alphas, yy
        self.n_calibration_ = int(yy.size)
        self.class_names_ = names
        return self

    def _names(self, k: int) -> tuple[str, ...]:
        if self.class_names is None:
            return CLASS_NAMES if k == 2 else tuple(str(c) for c in range(k))
        names = tuple(str(n) for n in self.class_names)
        if len(names) != k or len(set(names)) != k:
            raise ConfigError(f"class_names {list(names)} must be {k} different names")
        return names

    def predict_mask(self, probabilities) -> np.ndarray:
        """(n, K) booleans: is class c in image i's set (``1 - p_c <= quantile_c``)."""
        self._check_fitted()
        a = self._scores(probabilities)
        if a.shape[1] != self.quantiles_.size:
            raise DataError(f"probabilities have {a.shape[1]} classes, the calibration had {self.quantiles_.size}")
        return a <= self.quantiles_[None, :]

    def predict(self, probabilities) -> list[tuple[str, ...]]:
        """Each image's set as a tuple of class names (``()``, one name, or more)."""
        names = self.class_names_
        return [tuple(n for n, keep in zip(names, row) if keep) for row in self.predict_mask(probabilities)]

    def p_values(self, probabilities) -> np.ndarray:
        """(n, K) crepes p-values (non-smoothed) from the stored calibration scores."""
        from crepes import ConformalClassifier as _CrepesClassifier  # fitting only: not on predict's path

        self._check_fitted()
        if self.calibration_scores_ is None:
            raise DataError("this conformal state keeps no calibration scores (an older multiclass run): no p-values")
        a = self._scores(probabilities)
        cc = _CrepesClassifier()
        if not self.class_conditional:
            return cc.fit(self.calibration_scores_).predict_p(a, smoothing=False)
        cc.fit(self.calibration_scores_, bins=self.calibration_labels_)
        return np.stack(
            [cc.predict_p(a[:, c], bins=np.full(len(a), c), smoothing=False) for c in range(a.shape[1])], axis=1
        )

    def get_state(self) -> dict:
        """Coverage, Mondrian flag, class names and sizes (JSON); quantiles and calibration scores
        and labels (arrays)."""
        self._check_fitted()
        state = {
            "method": self.method,
            "coverage": float(self.coverage),
            "class_conditional": bool(self.class_conditional),
            "class_names": list(self.class_names_),
            "n_calibration": self.n_calibration_,
            "quantiles": self.quantiles_.copy(),
        }
        if self.calibration_scores_ is not None:
            state["calibration_scores"] = self.calibration_scores_.copy()
            state["calibration_labels"] = self.calibration_labels_.copy()
        return state

    @classmethod
    def from_state(cls, state: dict) -> ConformalClassifier:
        """Also reads the two older states: a binary run's (no ``method``) and a multiclass run's
        ``split_conformal_sets_k`` (quantiles as a JSON list, no calibration scores)."""
        if state.get("method", cls.method) not in (cls.method, "split_conformal_sets_k"):
            raise DataError(f"not a conformal-sets state (method {state.get('method')!r})")
        q = np.asarray(state["quantiles"], dtype=np.float64)
        if q.ndim != 1 or q.size < 2:
            raise DataError(f"conformal state: quantiles must be K >= 2 numbers, got shape {q.shape}")
        names = state.get("class_names")
        cc = cls(_check_coverage(float(state["coverage"])), bool(state["class_conditional"]), names)
        cc.class_names_ = cc._names(q.size)
        cc.quantiles_ = q
        if "calibration_scores" in state:
            scores = np.asarray(state["calibration_scores"], dtype=np.float64)
            labels = np.asarray(state["calibration_labels"], dtype=np.int64)
            if scores.shape != labels.shape or not np.all((scores >= 0) & (scores <= 1)):  # also false for NaN
                raise DataError("conformal state: calibration scores are NaN, out of [0, 1] or unlike the labels")
            cc.calibration_scores_, cc.calibration_labels_ = scores, labels
        else:
            cc.calibration_scores_ = cc.calibration_labels_ = None
        if np.isnan(q).any():
            raise DataError("conformal state: quantiles are NaN")
        cc.n_calibration_ = int(state.get("n_calibration", 0 if cc.calibration_scores_ is None else scores.size))
        return cc


def _mask(sets, class_names) -> np.ndarray:
    if isinstance(sets, np.ndarray) and sets.dtype == bool and sets.ndim == 2:
        return sets
    return np.array([[name in s for name in class_names] for s in sets], dtype=bool).reshape(-1, len(class_names))


def empirical_coverage(sets, y, class_names: tuple[str, str] = CLASS_NAMES) -> float:
    """Share of images whose true class is in their set (``sets``: names or an (n, 2) mask)."""
    m, yy = _mask(sets, class_names), as_binary_labels(y, "labels")
    if m.shape[0] != yy.size or yy.size == 0:
        raise DataError(f"coverage: {m.shape[0]} sets but {yy.size} labels")
    return float(m[np.arange(yy.size), yy].mean())


def abstention_rate(sets, class_names: tuple[str, str] = CLASS_NAMES) -> float:
    """Share of sets that are not a single class (both or none: ``uncertain``)."""
    m = _mask(sets, class_names)
    if m.shape[0] == 0:
        raise DataError("abstention rate: no prediction sets")
    return float((m.sum(axis=1) != 1).mean())


def empirical_set_coverage(sets, y) -> float:
    """Share of images whose true class (index in [0, K)) is in their (n, K) boolean set."""
    m = np.asarray(sets, dtype=bool)
    if m.ndim != 2:
        raise DataError(f"set coverage: expected an (n, K) boolean array, got shape {m.shape}")
    yy = as_class_indices(y, m.shape[1], "labels", n=m.shape[0])
    return float(m[np.arange(yy.size), yy].mean())
