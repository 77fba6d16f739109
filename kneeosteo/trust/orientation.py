"""Is a film upside down? A learned orientation check on the backbone's features (issue 32).

The first orientation check (issue 28) compared a film's feature distance with that of its
top-to-bottom mirror, one more forward pass per film, and refused the film when the mirror
lay closer to the training films. On a whole film that works: a leg has a hip end and an ankle
end. On a knee region of fixed anatomical size it does not: the region is nearly square and the
femur above the joint looks, to a distance in 1280 dimensions, much like the tibia below it, so
the mirror won about as often as the film (16 of 97 upright reference films refused).

:class:`OrientationCheck` instead learns the difference. At fit time every in-domain training
film is shown twice, as it is (class 0) and mirrored top to bottom (class 1), and a
logistic regression (:class:`sklearn.linear_model.LogisticRegression`, its penalty chosen by
grouped cross-validation, a film and its mirror always in the same fold) separates the two on
standardised features. The refusal threshold is set on the *out-of-fold* scores of the upright
films: the ``1 - max_false_refusals`` quantile (at least 0, i.e. the mirror must be the likelier
reading), so that at most that share of upright in-domain films is refused. What the check
catches is measured the same way and stored: ``detection_`` (out-of-fold share of mirrored films
above the threshold) and ``auc_`` (out-of-fold ranking of mirrored over upright films).

At prediction time it needs only the film's own features: no second forward pass. A run fitted
before it existed keeps the mirror comparison (:meth:`kneeosteo.trust.domain.DomainCheck.assess`).
"""

from __future__ import annotations

import numpy as np

from kneeosteo.errors import ConfigError, DataError

from ._base import TrustEstimator

__all__ = ["MIN_ORIENTATION_IMAGES", "OrientationCheck"]

# Below this many upright films the logistic regression's out-of-fold threshold rests on too few
# scores to honour a 1% false-refusal rate (its quantile is the largest score): not fitted.
MIN_ORIENTATION_IMAGES = 40
_CS = np.logspace(-4, 0, 5)  # the inverse penalties cross-validation chooses among


def _matrix(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0:
        raise DataError(f"orientation check: {name}: expected (n_images, n_features), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise DataError(f"orientation check: {name}: feature values are not finite")
    return a


class OrientationCheck(TrustEstimator):
    """Refuses films whose features read as mirrored top to bottom (see the module docstring).

    Parameters: ``max_false_refusals`` (the share of upright in-domain films the threshold may
    refuse, out of fold; default 0.01), ``folds`` (grouped cross-validation folds), ``seed``.
    Fitted: ``mean_``, ``scale_``, ``coef_``, ``intercept_`` (the linear score on standardised
    features), ``threshold_`` (refuse when the score exceeds it), ``detection_``,
    ``false_refusals_``, ``auc_`` (out of fold) and ``n_images_``."""

    def __init__(self, max_false_refusals: float = 0.01, folds: int = 5, seed: int = 0):
        self.max_false_refusals = max_false_refusals
        self.folds = folds
        self.seed = seed

    def _check_params(self) -> None:
        m = self.max_false_refusals
        if not (isinstance(m, (int, float)) and 0 < m < 0.5):
            raise ConfigError(f"orientation check: max_false_refusals must lie in (0, 0.5), such as 0.01; got {m!r}")
        if not (isinstance(self.folds, (int, np.integer)) and self.folds >= 2):
            raise ConfigError(f"orientation check: folds must be an integer of at least 2, got {self.folds!r}")

    def fit(self, upright, mirrored) -> OrientationCheck:
        """``upright``: (N, D) features of in-domain films as they are; ``mirrored``: the same
        films' features mirrored top to bottom, row for row."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import roc_auc_score
        from sklearn.model_selection import GridSearchCV, GroupKFold

        self._check_params()
        up, down = _matrix(upright, "upright features"), _matrix(mirrored, "mirrored features")
        if up.shape != down.shape:
            raise DataError(f"orientation check: {up.shape} upright and {down.shape} mirrored features differ in shape")
        n = up.shape[0]
        if n < max(MIN_ORIENTATION_IMAGES, 2 * self.folds):
            raise DataError(f"orientation check: {n} films are too few (at least {MIN_ORIENTATION_IMAGES})")
        x = np.concatenate([up, down])
        y = np.r_[np.zeros(n, dtype=int), np.ones(n, dtype=int)]
        # a film and its mirror share a group (never one in training, the other scored); the
        # group ids are shuffled once, seeded, so that folds do not follow the caller's order
        order = np.random.default_rng(self.seed).permutation(n)
        groups = np.r_[order, order]
        mean = x.mean(axis=0)
        scale = x.std(axis=0)
        scale = np.where(scale > 1e-12, scale, 1.0)
        z = (x - mean) / scale

        def fit_on(idx: np.ndarray):
            inner = list(GroupKFold(3).split(z[idx], y[idx], groups[idx]))
            search = GridSearchCV(LogisticRegression(max_iter=2000), {"C": _CS}, scoring="roc_auc", cv=inner)
            return search.fit(z[idx], y[idx]).best_estimator_

        oof = np.empty(2 * n)
        for train, test in GroupKFold(self.folds).split(z, y, groups):
            oof[test] = fit_on(train).decision_function(z[test])
        final = fit_on(np.arange(2 * n))
        upright_oof, mirrored_oof = oof[:n], oof[n:]
        threshold = max(0.0, float(np.quantile(upright_oof, 1.0 - self.max_false_refusals, method="higher")))
        self.mean_, self.scale_ = mean, scale
        self.coef_ = np.asarray(final.coef_[0], dtype=np.float64)
        self.intercept_ = float(final.intercept_[0])
        self.threshold_ = threshold
        self.detection_ = float((mirrored_oof > threshold).mean())
        self.false_refusals_ = float((upright_oof > threshold).mean())
        self.auc_ = float(roc_auc_score(y, oof))
        self.n_images_ = int(n)
        return self

    # -- use -----------------------------------------------------------------------------------
    def score(self, features) -> np.ndarray:
        """The linear score of each feature vector (higher: more likely mirrored top to bottom)."""
        self._check_fitted()
        x = np.asarray(features, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.coef_.size:
            raise DataError(f"orientation check: features of shape {x.shape}, fitted on {self.coef_.size}")
        return ((x - self.mean_) / self.scale_) @ self.coef_ + self.intercept_

    def reason(self, features) -> str:
        """The refusal reason for one film's features, '' when it reads upright (a non-finite
        score fails closed)."""
        s = float(self.score(features)[0])
        if np.isfinite(s) and s <= self.threshold_:
            return ""
        return (
            f"upside down or mirrored top to bottom (orientation score {s:.3g} > {self.threshold_:.3g}; "
            f"the check catches {self.detection_:.0%} of mirrored training films)"
        )

    # -- storage -------------------------------------------------------------------------------
    def get_state(self) -> dict:
        self._check_fitted()
        return {
            "max_false_refusals": float(self.max_false_refusals),
            "folds": int(self.folds),
            "seed": int(self.seed),
            "threshold": self.threshold_,
            "intercept": self.intercept_,
            "detection": self.detection_,
            "false_refusals": self.false_refusals_,
            "auc": self.auc_,
            "n_images": self.n_images_,
            "mean": self.mean_.copy(),
            "scale": self.scale_.copy(),
            "coef": self.coef_.copy(),
        }

    @classmethod
    def from_state(cls, state: dict) -> OrientationCheck:
        oc = cls(float(state["max_false_refusals"]), int(state["folds"]), int(state["seed"]))
        oc._check_params()
        arrays = {k: np.asarray(state[k], dtype=np.float64) for k in ("mean", "scale", "coef")}
        d = arrays["coef"].size
        if any(a.ndim != 1 or a.size != d for a in arrays.values()) or d == 0:
            raise ValueError("orientation check: mean, scale and coef must be vectors of one length")
        if not all(np.all(np.isfinite(a)) for a in arrays.values()) or np.any(arrays["scale"] <= 0):
            raise ValueError("orientation check: non-finite arrays or a non-positive scale")
        values = {k: float(state[k]) for k in ("threshold", "intercept", "detection", "false_refusals", "auc")}
        if not all(np.isfinite(v) for v in values.values()):
            raise ValueError("orientation check: non-finite threshold or figures")
        oc.mean_, oc.scale_, oc.coef_ = arrays["mean"], arrays["scale"], arrays["coef"]
        oc.threshold_, oc.intercept_ = values["threshold"], values["intercept"]
        oc.detection_, oc.false_refusals_, oc.auc_ = values["detection"], values["false_refusals"], values["auc"]
        oc.n_images_ = int(state["n_images"])
        return oc
