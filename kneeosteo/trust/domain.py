"""Does an input look like the knee radiographs the model was trained on? (out-of-distribution)

Two parts, both cheap at prediction time:

1. **Feature distance.** Fitted on in-domain feature vectors (the frozen backbone's pooled
   features of the training images). Features are standardised per dimension, then either
   - ``mahalanobis``: distance to the training mean under a Ledoit-Wolf shrinkage covariance
     (:class:`sklearn.covariance.LedoitWolf`; shrinkage keeps the inverse stable when there are
     fewer images than dimensions, as with 1664 DenseNet features and ~250 training images), or
   - ``knn``: mean Euclidean distance to the ``k`` nearest training vectors
     (:class:`sklearn.neighbors.NearestNeighbors`).
   The ``domain_score`` is that distance: higher is further from the training images.

2. **Pixel checks** on the canonical greyscale image in [0, 1] (and the RGB original if there
   was one): blank or uniform (standard deviation below ``min_std``), too few grey levels (a
   document, a binary mask: fewer than ``min_grey_levels`` distinct 8-bit levels), colour
   (mean HSV saturation of the RGB above ``max_saturation``; a radiograph saved as RGB has
   none), implausible shape (longer side over shorter above ``max_aspect``).

The threshold is the ``acceptance`` quantile (default 0.95) of distances of *held-out*
in-domain vectors: given ones, or else out-of-fold distances on the training vectors (each
fold scored by a model fitted without it). Distances of the vectors a model was fitted on are
optimistically small, markedly so in high dimensions, and a threshold taken from them would
reject far more than 5% of new in-domain images.

An input is in domain when its distance is at most the threshold and no pixel check fails.
``to_state`` gives plain numpy arrays (for safetensors) and a JSON dict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from kneeosteo.errors import ConfigError, DataError

from ._base import TrustEstimator

if TYPE_CHECKING:  # scikit-learn and SciPy are imported where a check is fitted, not on predict's path
    from sklearn.neighbors import NearestNeighbors

__all__ = [
    "MAX_DOMAIN_THRESHOLD",
    "METHODS",
    "MIN_DOMAIN_IMAGES",
    "DomainCheck",
    "DomainVerdict",
    "PixelLimits",
    "bone_columns",
    "noise_level",
    "pixel_problems",
]

METHODS = ("mahalanobis", "knn")


# Below this many in-domain images the feature check is not fitted: with 14 images in 1280
# dimensions (the test suite's tiny run) out-of-fold distances spread over two orders of magnitude
# and the check rejected one of ten images of the run's own data; only the pixel checks apply then.
MIN_DOMAIN_IMAGES = 50
# A stored threshold above this is not one a fit gives (the bundled model's: 129.7 in 1280
# standardised dimensions); with it, anything at all would pass the feature check.
MAX_DOMAIN_THRESHOLD = 1e5


@dataclass(frozen=True)
class PixelLimits:
    min_std: float = 0.02
    min_grey_levels: int = 32
    max_saturation: float = 0.15
    max_aspect: float = 3.0
    # the film checks (issue 28): applied with a fitted feature check (``DomainCheck`` turns them on),
    # which is what says a film is a knee film at all. max_noise: the noise level (:func:`noise_level`)
    # above which an image is refused as strong noise; max_bone_columns: bone regions side by side in
    # the top or bottom of the bone region (:func:`bone_columns`; two knees in one image: 2)
    film_checks: bool = False
    max_noise: float = 0.03
    max_bone_columns: int = 1


def noise_level(pixels: np.ndarray) -> float:
    """Pixel noise of a [0, 1] greyscale image (Donoho's estimate: the median absolute high-pass
    residual / 0.6745) on every k-th pixel, k such that 512 px remain on the longest side:
    subsampling, unlike averaging, keeps each pixel's noise, so the level does not fall with the
    scan size (KOP's 246 training films of the bundled model: median 0.006, at most 0.016;
    Gaussian noise of sigma 0.05 added: at least 0.034)."""
    import cv2

    g = np.asarray(pixels, dtype=np.float32)
    h, w = g.shape
    s = 512 / max(h, w)
    small = cv2.resize(g, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_NEAREST)
    return float(np.median(np.abs(small - cv2.GaussianBlur(small, (0, 0), 1.0))) / 0.6745)


def bone_columns(pixels: np.ndarray) -> int:
    """How many bone regions stand side by side in the top (5-30%) or bottom (70-95%) band of the
    label-free bone region: 1 for a knee film (a femur above, tibia and fibula below), 2 for two
    knees side by side (separated by a gap of at least 3% of the width)."""
    from kneeosteo.data.bone import bone_mask

    m = bone_mask(np.asarray(pixels, dtype=np.float32))
    ys = np.nonzero(m.any(axis=1))[0]
    if ys.size == 0 or m.all():
        return 0
    top, bottom = int(ys[0]), int(ys[-1])
    gap = max(1, int(0.03 * m.shape[1]))
    most = 0
    for lo, hi in ((0.05, 0.3), (0.7, 0.95)):
        band = m[top + int(lo * (bottom - top)) : top + int(hi * (bottom - top)) + 1]
        idx = np.nonzero(band.mean(axis=0) > 0.5)[0]
        most = max(most, 0 if idx.size == 0 else 1 + int(np.sum(np.diff(idx) > gap)))
    return most


def pixel_problems(pixels=None, rgb=None, limits: PixelLimits = PixelLimits()) -> list[str]:
    """Reasons (short phrases) why an image cannot be an in-domain radiograph; [] if none.

    ``pixels``: the canonical greyscale image, 2-D floats in [0, 1]; ``rgb``: the original
    colour image (H, W, 3), integers or floats in [0, 1], when the file had colour."""
    problems = []
    if pixels is not None:
        g = np.asarray(pixels, dtype=np.float64)
        if g.ndim != 2 or g.size == 0:
            raise DataError(f"pixel check: expected a 2-D greyscale image, got shape {g.shape}")
        if not np.all(np.isfinite(g)):
            return ["pixel values are not finite"]
        if float(g.std()) < limits.min_std:
            problems.append(f"blank or uniform image (grey-level spread {g.std():.3f} < {limits.min_std})")
        else:
            levels = int(
                np.count_nonzero(np.bincount(np.clip(np.rint(g * 255), 0, 255).astype(np.uint8).ravel(), minlength=256))
            )
            if levels < limits.min_grey_levels:
                problems.append(f"too few grey levels ({levels} < {limits.min_grey_levels})")
        h, w = g.shape
        aspect = max(h, w) / min(h, w)
        if aspect > limits.max_aspect:
            problems.append(f"implausible aspect ratio ({aspect:.2f} > {limits.max_aspect})")
        if limits.film_checks and not problems:
            noise = noise_level(g)
            if noise > limits.max_noise:
                problems.append(f"strong noise (noise level {noise:.3f} > {limits.max_noise})")
            columns = bone_columns(g)
            if columns > limits.max_bone_columns:
                problems.append(f"{columns} bone regions side by side (two knees or films in one image?)")
    if rgb is not None:
        c = np.asarray(rgb)
        if c.ndim != 3 or c.shape[2] < 3:
            raise DataError(f"pixel check: expected an (H, W, 3) colour image, got shape {c.shape}")
        c = c[..., :3].astype(np.float64)
        if np.issubdtype(np.asarray(rgb).dtype, np.integer):
            c /= np.iinfo(np.asarray(rgb).dtype).max
        hi, lo = c.max(axis=2), c.min(axis=2)
        sat = np.where(hi > 0, (hi - lo) / np.where(hi > 0, hi, 1), 0.0)
        if float(sat.mean()) > limits.max_saturation:
            problems.append(f"colour image (mean saturation {sat.mean():.2f} > {limits.max_saturation})")
    return problems


def _shrunk_inverse(z: np.ndarray) -> dict[str, np.ndarray]:
    """The inverse of the Ledoit-Wolf covariance of standardised, centred ``z`` (n, d), in the
    cheaper of two exact forms.

    Ledoit-Wolf's estimate is ``C = (1 - s) * z'z / n + s * mu * I`` (``mu`` the mean variance).
    With more images than features its inverse is stored as the (d, d) ``precision``; with fewer
    (the usual case: ~250 images, 1280-1664 features) the Woodbury identity gives
    ``x' C^-1 x = (|x|^2 - b |W x|^2) / a`` with ``a = s * mu``, ``b = (1 - s) / n`` and
    ``W = L^-1 z`` (``L L' = a I + b z z'``, n by n), so only the (n, d) ``factor`` is stored
    and no d by d matrix is ever inverted."""
    from scipy.linalg import cho_factor, cho_solve, solve_triangular  # fitting only: not on predict's path
    from sklearn.covariance import LedoitWolf, ledoit_wolf_shrinkage

    n, d = z.shape
    if n > d:
        cov = LedoitWolf(assume_centered=True, store_precision=False).fit(z).covariance_
        return {"precision": cho_solve(cho_factor(cov), np.eye(d))}
    mu = float((z * z).sum() / (n * d))
    if mu <= 0:
        raise DataError("domain check: every feature is constant across the in-domain images")
    s = max(float(ledoit_wolf_shrinkage(z, assume_centered=True)), 1e-6)
    a, b = s * mu, (1 - s) / n
    lower = np.linalg.cholesky(a * np.eye(n) + b * (z @ z.T))
    return {"factor": solve_triangular(lower, z, lower=True), "coef": np.array([a, b])}


def _nearest_neighbours(k: int, reference: np.ndarray) -> NearestNeighbors:
    from sklearn.neighbors import NearestNeighbors  # a kNN check only: the default (Mahalanobis) predicts without it

    return NearestNeighbors(n_neighbors=k).fit(reference)


@dataclass(frozen=True)
class DomainVerdict:
    """One image's domain check: ``score`` (feature distance), ``threshold``, ``ok`` and the
    ``reasons`` it failed (distance above threshold and/or pixel problems)."""

    score: float
    threshold: float
    ok: bool
    reasons: tuple[str, ...] = field(default_factory=tuple)


class DomainCheck(TrustEstimator):
    """The feature-distance check (see the module docstring). Parameters: ``method``
    (``mahalanobis`` or ``knn``), ``acceptance`` (the held-out quantile the threshold sits at),
    ``k`` (kNN), ``pixel_limits`` (the pixel check; a fitted check also runs the film checks),
    ``folds`` and ``seed`` (the out-of-fold threshold without held-out features). Fitted:
    ``threshold_``, ``heldout_scores_`` (the held-out in-domain distances the threshold was taken
    from: the batch shift alarm's reference; not part of the state), ``arrays_`` (mean, scale and
    the shrunk inverse covariance or the kNN reference), ``n_features_``, ``pixel_limits_``."""

    def __init__(
        self,
        method: str = "mahalanobis",
        acceptance: float = 0.95,
        k: int = 5,
        pixel_limits: PixelLimits = PixelLimits(),
        folds: int = 5,
        seed: int = 0,
    ):
        self.method = method
        self.acceptance = acceptance
        self.k = k
        self.pixel_limits = pixel_limits
        self.folds = folds
        self.seed = seed

    def _check_params(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"domain-check method {self.method!r} is not one of: {', '.join(METHODS)}")
        if not (isinstance(self.acceptance, (int, float)) and 0 < self.acceptance < 1):
            raise ConfigError(f"domain-check acceptance must lie in (0, 1), such as 0.95; got {self.acceptance!r}")
        if not (isinstance(self.k, (int, np.integer)) and self.k >= 1):
            raise ConfigError(f"domain-check k must be an integer of at least 1, got {self.k!r}")
        if not (isinstance(self.folds, (int, np.integer)) and self.folds >= 2):
            raise ConfigError(f"domain-check folds must be an integer of at least 2, got {self.folds!r}")
        if not isinstance(self.pixel_limits, PixelLimits):
            raise ConfigError(
                f"domain-check pixel_limits must be a PixelLimits, got {type(self.pixel_limits).__name__}"
            )

    # -- fitting -----------------------------------------------------------------------------
    @staticmethod
    def _features(x, name: str = "features") -> np.ndarray:
        a = np.asarray(x, dtype=np.float64)
        if a.ndim == 1:
            a = a[None, :]
        if a.ndim != 2 or a.shape[0] == 0:
            raise DataError(f"{name}: expected (n_images, n_features), got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise DataError(f"{name}: feature values are not finite")
        return a

    def _fit_arrays(self, x: np.ndarray) -> dict[str, np.ndarray]:
        mean = x.mean(axis=0)
        scale = x.std(axis=0)
        scale = np.where(scale > 1e-12, scale, 1.0)
        z = (x - mean) / scale
        if self.method == "mahalanobis":
            return {"mean": mean, "scale": scale, **_shrunk_inverse(z)}
        if x.shape[0] <= self.k:
            raise DataError(f"domain check: kNN with k={self.k} needs more than {self.k} in-domain images")
        return {"mean": mean, "scale": scale, "reference": z}

    def _distance(self, arrays: dict[str, np.ndarray], x: np.ndarray, nn: NearestNeighbors | None = None) -> np.ndarray:
        if x.shape[1] != arrays["mean"].size:
            raise DataError(f"domain check: {x.shape[1]} features given, fitted on {arrays['mean'].size}")
        z = (x - arrays["mean"]) / arrays["scale"]
        if self.method == "mahalanobis":
            if "precision" in arrays:
                d2 = ((z @ arrays["precision"]) * z).sum(axis=1)
            else:  # Woodbury form: (|z|^2 - b |W z|^2) / a
                a, b = arrays["coef"]
                d2 = ((z * z).sum(axis=1) - b * ((z @ arrays["factor"].T) ** 2).sum(axis=1)) / a
            return np.sqrt(np.maximum(d2, 0.0))
        nn = nn or _nearest_neighbours(self.k, arrays["reference"])
        return nn.kneighbors(z, n_neighbors=self.k)[0].mean(axis=1)

    def fit(self, features, heldout_features=None) -> DomainCheck:
        """Fit on in-domain ``features``; set the threshold on ``heldout_features`` if given,
        else on out-of-fold distances of ``features`` (``folds``-fold, shuffled by ``seed``)."""
        self._check_params()
        x = self._features(features)
        if heldout_features is not None:
            scores = self._distance(self._fit_arrays(x), self._features(heldout_features, "held-out features"))
        else:
            if x.shape[0] < 2 * self.folds:
                raise DataError(
                    f"domain check: {x.shape[0]} in-domain images are too few for "
                    f"{self.folds}-fold threshold setting; give held-out features"
                )
            from sklearn.model_selection import KFold

            scores = np.empty(x.shape[0])
            for train, test in KFold(self.folds, shuffle=True, random_state=self.seed).split(x):
                scores[test] = self._distance(self._fit_arrays(x[train]), x[test])
        self.threshold_ = float(np.quantile(scores, self.acceptance, method="higher"))
        self.heldout_scores_ = np.asarray(scores, dtype=np.float64)
        self.pixel_limits_ = replace(self.pixel_limits, film_checks=True)  # a film check needs a fitted film domain
        self._set_arrays(self._fit_arrays(x))
        return self

    def refit_threshold(self, heldout_features) -> DomainCheck:
        """Keep the fitted arrays; set ``threshold_`` to the ``acceptance`` quantile of the
        distances of ``heldout_features`` (in-domain images the arrays were not fitted on, e.g.
        a site's own films). Returns ``self``."""
        self._check_fitted()
        scores = self._distance(self.arrays_, self._features(heldout_features, "held-out features"), self._nn)
        self.threshold_ = float(np.quantile(scores, self.acceptance, method="higher"))
        self.heldout_scores_ = np.asarray(scores, dtype=np.float64)
        return self

    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        # C order, float64: what safetensors gives back, so a reloaded check scores bit for bit alike
        arrays = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()}
        self.arrays_ = arrays
        self.n_features_ = int(arrays["mean"].size)
        self._nn = _nearest_neighbours(self.k, arrays["reference"]) if self.method == "knn" else None

    # -- scoring -----------------------------------------------------------------------------
    def distance(self, features) -> np.ndarray:
        """Domain scores (distances) of a batch of feature vectors."""
        self._check_fitted()
        return self._distance(self.arrays_, self._features(features), self._nn)

    def accepts(self, features) -> np.ndarray:
        """Booleans: is each feature vector's distance at most ``threshold_``."""
        return self.distance(features) <= self.threshold_

    def assess(self, features, pixels=None, rgb=None, pixel_reasons=None, mirrored=None) -> DomainVerdict:
        """The verdict for one image (one feature vector, optionally its pixels, or the reasons
        :func:`pixel_problems` gave for them under :attr:`pixel_limits_` where the pixels were).
        ``mirrored``: the features of the image mirrored top to bottom; when that mirror image is
        closer to the training films than the image itself, the image is upside down (or
        mirrored top to bottom) and refused."""
        x = self._features(features)
        if x.shape[0] != 1:
            raise DataError(f"domain check: assess takes one image's features, got {x.shape[0]}")
        score = float(self.distance(x)[0])
        threshold = self.threshold_
        reasons = list(pixel_reasons) if pixel_reasons is not None else pixel_problems(pixels, rgb, self.pixel_limits_)
        if not np.isfinite(score):  # fail closed: NaN > threshold is False
            reasons.insert(0, "feature distance is not finite")
        elif score > threshold:
            reasons.insert(0, f"features unlike the training images (distance {score:.3g} > {threshold:.3g})")
        elif mirrored is not None:
            flipped = float(self.distance(self._features(mirrored, "mirrored features"))[0])
            if not flipped >= score:
                reasons.insert(
                    0,
                    f"upside down or mirrored top to bottom (its mirror image is closer to the "
                    f"training images: distance {flipped:.3g} < {score:.3g})",
                )
        return DomainVerdict(score, threshold, not reasons, tuple(reasons))

    def score(self, features, pixels=None, rgb=None) -> tuple[float, bool]:
        """``(domain_score, ok)`` for one image."""
        v = self.assess(features, pixels, rgb)
        return v.score, v.ok

    # -- storage -----------------------------------------------------------------------------
    def get_state(self) -> dict:
        """Method, acceptance, k, threshold, sizes and pixel limits (JSON); the float64 arrays."""
        self._check_fitted()
        return {
            "method": self.method,
            "acceptance": float(self.acceptance),
            "k": int(self.k),
            "threshold": self.threshold_,
            "n_features": self.n_features_,
            "pixel_limits": asdict(self.pixel_limits_),
            **{k: v.copy() for k, v in self.arrays_.items()},
        }

    @classmethod
    def from_state(cls, state: dict) -> DomainCheck:
        dc = cls(state["method"], state["acceptance"], state["k"], PixelLimits(**state.get("pixel_limits", {})))
        dc._check_params()
        if dc.method == "knn":
            needed = ("mean", "scale", "reference")
        else:
            needed = ("mean", "scale", "precision") if "precision" in state else ("mean", "scale", "factor", "coef")
        missing = [n for n in needed if n not in state]
        if missing:
            raise DataError(f"domain-check state lacks {', '.join(missing)}")
        arrays = {n: np.asarray(state[n], dtype=np.float64) for n in needed}
        bad = [n for n, v in arrays.items() if not np.all(np.isfinite(v))]
        if bad:
            raise DataError(f"domain-check state: {', '.join(bad)} not finite")
        if np.any(arrays["scale"] <= 0) or ("coef" in arrays and np.any(arrays["coef"] <= 0)):
            raise DataError("domain-check state: a scale or shrinkage coefficient is not positive")
        threshold = float(state["threshold"])
        if not (np.isfinite(threshold) and 0 < threshold <= MAX_DOMAIN_THRESHOLD):
            raise DataError(f"domain-check state: threshold {threshold!r} out of (0, {MAX_DOMAIN_THRESHOLD:g}]")
        dc._set_arrays(arrays)
        dc.threshold_ = threshold
        dc.heldout_scores_ = None
        dc.pixel_limits_ = replace(dc.pixel_limits, film_checks=True)
        return dc
