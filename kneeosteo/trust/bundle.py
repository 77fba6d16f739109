"""A run's fitted trust pieces together: calibrator, operating threshold, conformal sets and the
domain check, stored as one safetensors file (arrays) and one JSON file (everything else).

:class:`TrustBundle` turns one image's raw logit, backbone features and pixels into a
:class:`~.prediction.TrustedPrediction`. A run without a bundle (runs written before issue 15,
the bundled model until it is refitted) uses :func:`untrusted_prediction`: the raw probability,
the run's own threshold, a one-class set from it, status ``ok``, no domain score, and
``calibrated: false``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kneeosteo.errors import DataError

from .calibration import calibrator_from_dict, sigmoid
from .conformal import ConformalClassifier
from .domain import DomainCheck, PixelLimits, pixel_problems
from .operating_point import parse_operating_point
from .prediction import TrustedPrediction, trusted_prediction
from .shift import ShiftReference

__all__ = ["NO_SIGNAL", "TRUST_FORMAT", "TrustBundle", "untrusted_prediction"]

TRUST_FORMAT = "kneeosteo-trust/1"
NO_SIGNAL = "no signal at this site"  # the site check's verdict that makes every answer uncertain


@dataclass
class TrustBundle:
    """``calibrator`` (temperature or Platt), ``threshold`` on the calibrated probability (chosen by
    ``operating_point``), ``conformal`` sets at their coverage, ``domain`` (None for a model with
    no backbone features), the class names, ``fitted`` (what each piece was fitted on), ``shift``
    (the batch shift alarm's reference distributions; None for a run fitted before it existed)
    and ``site_check`` (``calibrate RUN SITE``'s verdict on the site's labelled films; None
    otherwise). A site check whose verdict is ``no signal at this site`` makes every in-domain
    answer ``uncertain`` with that reason."""

    calibrator: object
    threshold: float
    operating_point: str
    conformal: ConformalClassifier
    domain: DomainCheck | None
    classes: tuple[str, str]
    fitted: dict = field(default_factory=dict)
    shift: ShiftReference | None = None
    site_check: dict | None = None

    @property
    def no_signal(self) -> str:
        """The reason every in-domain answer is ``uncertain`` at this site ('' when there is none)."""
        sc = self.site_check or {}
        return str(sc.get("reason") or "no signal at this site") if sc.get("verdict") == NO_SIGNAL else ""

    @property
    def shift_reference(self) -> ShiftReference:
        """The batch shift alarm's reference: the stored one, or, for a run fitted before the
        alarm existed, the calibration images' probabilities recovered from the conformal scores
        (``1 - score`` for a positive, ``score`` for a negative) and no domain distances."""
        if self.shift is not None:
            return self.shift
        s, y = self.conformal.calibration_scores, self.conformal.calibration_labels
        p = None if s is None else np.where(y == 1, 1.0 - s, s)
        return ShiftReference(
            None, p, {"probability_source": "calibration images (from the conformal scores)", "domain_source": None}
        )

    # -- use ------------------------------------------------------------------------------------
    def predict(self, logit: float, features=None, pixels=None, pixel_reasons=None, mirrored=None) -> TrustedPrediction:
        """One image: its raw logit, its backbone features (D,) and its canonical pixels (or, from a
        process that had the pixels, ``pixel_reasons``: what :attr:`pixel_limits`' check found);
        ``mirrored``: the features of the image mirrored top to bottom (the orientation check)."""
        if self.domain is None:  # no feature check fitted (too few training images, no backbone): pixels only
            reasons = (
                list(pixel_reasons) if pixel_reasons is not None else ([] if pixels is None else pixel_problems(pixels))
            )
            ok, score, dthr = not reasons, float("nan"), float("nan")
        else:
            if features is None:
                raise DataError("this run's domain check needs the image's backbone features")
            verdict = self.domain.assess(
                np.asarray(features, dtype=np.float64)[None, :],
                pixels,
                pixel_reasons=pixel_reasons,
                mirrored=None if mirrored is None else np.asarray(mirrored, dtype=np.float64)[None, :],
            )
            score, dthr, ok, reasons = verdict.score, verdict.threshold, verdict.ok, verdict.reasons
        return trusted_prediction(
            logit,
            calibrator=self.calibrator,
            threshold=self.threshold,
            conformal=self.conformal,
            domain_score=score,
            domain_threshold=dthr,
            in_domain=ok,
            class_names=self.classes,
            domain_reasons=tuple(reasons),
            no_signal=self.no_signal,
        )

    @property
    def pixel_limits(self) -> PixelLimits:
        """The limits of the pixel check :meth:`predict` applies."""
        return self.domain.pixel_limits if self.domain is not None else PixelLimits()

    def calibrated(self, logits) -> np.ndarray:
        return self.calibrator.transform(np.asarray(logits, dtype=np.float64))

    # -- storage ------------------------------------------------------------------------------
    def to_state(self) -> tuple[dict[str, np.ndarray], dict]:
        """``(tensors, meta)``: arrays prefixed ``conformal.`` / ``domain.``; JSON for the rest."""
        ct, cm = self.conformal.to_state()
        tensors = {f"conformal.{k}": np.asarray(v, dtype=np.float64) for k, v in ct.items()}
        meta = {
            "format": TRUST_FORMAT,
            "classes": list(self.classes),
            "calibration": self.calibrator.to_dict(),
            "threshold": float(self.threshold),
            "operating_point": self.operating_point,
            "conformal": cm,
            "domain": None,
            "fitted": self.fitted,
        }
        if self.domain is not None:
            dt, dm = self.domain.to_state()
            tensors.update({f"domain.{k}": v for k, v in dt.items()})
            meta["domain"] = dm
        if self.shift is not None:
            st, sm = self.shift.to_state()
            tensors.update({f"shift.{k}": v for k, v in st.items()})
            meta["shift"] = sm
        if self.site_check is not None:
            meta["site_check"] = self.site_check
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict, meta: dict) -> TrustBundle:
        """Inverse of :meth:`to_state`; KeyError/ValueError/TypeError/DataError on a bad state."""
        if meta.get("format") != TRUST_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {TRUST_FORMAT}")
        part = lambda p: {k[len(p) :]: np.asarray(v) for k, v in tensors.items() if k.startswith(p)}  # noqa: E731
        threshold = float(meta["threshold"])
        if not (np.isfinite(threshold) and 0.0 <= threshold <= 1.0):
            raise ValueError(f"threshold {threshold} out of [0, 1]")
        parse_operating_point(meta["operating_point"])
        conformal = ConformalClassifier.from_state(part("conformal."), meta["conformal"])
        domain = None if meta.get("domain") is None else DomainCheck.from_state(part("domain."), meta["domain"])
        if domain is not None and not np.isfinite(domain.threshold):
            raise ValueError("domain threshold is not finite")
        classes = tuple(str(c) for c in meta["classes"])
        if len(classes) != 2 or classes[0] == classes[1]:
            raise ValueError(f"classes {list(classes)} must be two different names")
        conformal.class_names = classes
        shift = ShiftReference.from_state(part("shift."), meta["shift"]) if "shift" in meta else None
        site = meta.get("site_check")
        if site is not None and not isinstance(site, dict):
            raise ValueError("site_check must be a JSON object")
        return cls(
            calibrator_from_dict(meta["calibration"]),
            threshold,
            str(meta["operating_point"]),
            conformal,
            domain,
            classes,
            dict(meta.get("fitted") or {}),
            shift,
            site,
        )

    def summary(self) -> dict:
        """What the interfaces show about the bundle (API /api/model, evaluate)."""
        return {
            "calibration": self.calibrator.to_dict(),
            "threshold": self.threshold,
            "operating_point": self.operating_point,
            "coverage": self.conformal.coverage,
            "domain_threshold": None if self.domain is None else self.domain.threshold,
            "domain_method": None if self.domain is None else self.domain.method,
            "class_conditional": self.conformal.class_conditional,
            "shift_reference": None
            if self.shift is None
            else {
                "domain_scores": None if self.shift.domain_scores is None else int(self.shift.domain_scores.size),
                "probabilities": None if self.shift.probabilities is None else int(self.shift.probabilities.size),
                **self.shift.source,
            },
            "site_check": self.site_check,
            "fitted": self.fitted,
        }


def untrusted_prediction(logit: float, threshold: float, classes: tuple[str, str]) -> TrustedPrediction:
    """A run without trust files: the raw probability and the run's threshold, status ``ok``."""
    raw = float(sigmoid(float(logit)))
    if not np.isfinite(raw):
        raise DataError("the model's logit is not finite")
    label = classes[1] if raw >= threshold else classes[0]
    return TrustedPrediction(
        "ok",
        raw,
        raw,
        label,
        (label,),
        float("nan"),
        float("nan"),
        calibrated=False,
        status_reason="uncalibrated: this run has no trust files (no domain check, no "
        "prediction set; add them with `kneeosteo calibrate`)",
    )
