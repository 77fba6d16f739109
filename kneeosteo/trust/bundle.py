"""A run's fitted trust pieces together, for every task: calibrator, operating threshold,
conformal sets or interval, the domain check and the shift reference, stored as one safetensors
file (arrays) and one JSON file, trust.json (format ``kneeosteo-trust/2``, everything else).

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

from .calibration import PlattScaler, TemperatureScaler, calibrator_from_state, sigmoid
from .conformal import ConformalClassifier
from .domain import DomainCheck, PixelLimits, pixel_problems
from .interval import ConformalInterval
from .operating_point import OperatingThreshold
from .orientation import OrientationCheck
from .prediction import TrustedPrediction, trusted_prediction
from .shift import ShiftReference

__all__ = [
    "NO_SIGNAL",
    "TRUST_FORMAT",
    "TRUST_FORMAT_V1",
    "TRUST_PIECES",
    "TrustBundle",
    "untrusted_prediction",
]

TRUST_FORMAT = "kneeosteo-trust/2"  # every task's trust, pieces by name (issue 29)
TRUST_FORMAT_V1 = "kneeosteo-trust/1"  # a binary run's, before: still read
NO_SIGNAL = "no signal at this site"  # the site check's verdict that makes every answer uncertain

# The one table from a trust piece's name (what a task's ``trust_pieces`` lists, the key in
# trust.json's ``pieces``) to the bundle's attribute, the estimator fitted for it and its reader.
# ``operating_point`` is stored as trust.json's top-level ``threshold`` and ``operating_point``.
TRUST_PIECES = {
    "calibration": ("calibrator", TemperatureScaler, calibrator_from_state),
    "operating_point": ("threshold", OperatingThreshold, OperatingThreshold.from_state),
    "conformal": ("conformal", ConformalClassifier, ConformalClassifier.from_state),
    "interval": ("interval", ConformalInterval, ConformalInterval.from_state),
    "domain": ("domain", DomainCheck, DomainCheck.from_state),
    "shift": ("shift", ShiftReference, ShiftReference.from_state),
    "orientation": ("orientation", OrientationCheck, OrientationCheck.from_state),
}
_STORED = [name for name in TRUST_PIECES if name != "operating_point"]


def _split_state(state: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """An estimator's state as (JSON values, arrays)."""
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    return {k: v for k, v in state.items() if k not in arrays}, arrays


@dataclass
class TrustBundle:
    """One run's fitted trust pieces, whatever its task; each piece is None where the task has none.

    A binary run: ``calibrator`` (temperature or Platt), ``threshold`` on the calibrated probability
    (chosen by ``operating_point``), ``conformal`` sets at their coverage, ``domain`` (None for a
    model with no backbone features), ``shift`` (the batch shift alarm's reference distributions;
    None for a run fitted before it existed) and ``site_check`` (``calibrate RUN SITE``'s verdict
    on the site's labelled films; None otherwise). A site check whose verdict is ``no signal at
    this site`` makes every in-domain answer ``uncertain`` with that reason. A multiclass run: the
    K-logit ``calibrator``, ``conformal`` sets over K classes and ``domain``; a regression:
    ``interval`` and ``domain``. ``classes``: the run's classes; ``fitted``: what each piece was
    fitted on."""

    calibrator: TemperatureScaler | PlattScaler | None
    threshold: float | None
    operating_point: str | None
    conformal: ConformalClassifier | None
    domain: DomainCheck | None
    classes: tuple[str, ...]
    fitted: dict = field(default_factory=dict)
    shift: ShiftReference | None = None
    site_check: dict | None = None
    interval: ConformalInterval | None = None
    orientation: OrientationCheck | None = None

    @property
    def needs_mirror(self) -> bool:
        """Whether :meth:`predict` wants each film's top-to-bottom mirror features: a domain check
        fitted before the learned orientation check (:mod:`.orientation`) compares the film with
        its mirror; a bundle with an orientation check reads the film's own features only."""
        return self.domain is not None and self.orientation is None

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
        s = None if self.conformal is None else self.conformal.calibration_scores_
        p = None if s is None else np.where(self.conformal.calibration_labels_ == 1, 1.0 - s, s)
        return ShiftReference().fit(
            None, p, {"probability_source": "calibration images (from the conformal scores)", "domain_source": None}
        )

    # -- use ------------------------------------------------------------------------------------
    def predict(self, logit: float, features=None, pixels=None, pixel_reasons=None, mirrored=None) -> TrustedPrediction:
        """One image of a binary run: its raw logit, its backbone features (D,) and its canonical
        pixels (or, from a process that had the pixels, ``pixel_reasons``: what :attr:`pixel_limits`'
        check found); ``mirrored``: the features of the image mirrored top to bottom (the
        orientation check of a bundle without :attr:`orientation`; ignored otherwise)."""
        if self.domain is None:  # no feature check fitted (too few training images, no backbone): pixels only
            reasons = (
                list(pixel_reasons) if pixel_reasons is not None else ([] if pixels is None else pixel_problems(pixels))
            )
            ok, score, dthr = not reasons, float("nan"), float("nan")
        else:
            if features is None:
                raise DataError("this run's domain check needs the image's backbone features")
            x = np.asarray(features, dtype=np.float64)[None, :]
            verdict = self.domain.assess(
                x,
                pixels,
                pixel_reasons=pixel_reasons,
                mirrored=None
                if mirrored is None or self.orientation is not None
                else np.asarray(mirrored, dtype=np.float64)[None, :],
            )
            score, dthr, ok, reasons = verdict.score, verdict.threshold, verdict.ok, verdict.reasons
            # the learned orientation check, on an image the distance accepted (as the mirror
            # comparison it replaces: a film the distance refused gets no second reason)
            near = bool(np.isfinite(score) and score <= dthr)
            turned = self.orientation.reason(x) if self.orientation is not None and near else ""
            if turned:
                ok, reasons = False, (turned, *reasons)
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
        return self.domain.pixel_limits_ if self.domain is not None else PixelLimits()

    def calibrated(self, logits) -> np.ndarray:
        return self.calibrator.transform(np.asarray(logits, dtype=np.float64))

    # -- storage ------------------------------------------------------------------------------
    def to_storage(self) -> tuple[dict[str, np.ndarray], dict]:
        """``(tensors, meta)``: each piece's arrays as ``<piece>.<name>`` (safetensors), the rest of
        its state under ``meta["pieces"][<piece>]``, with the threshold, classes, what was fitted
        and the site check (trust.json)."""
        tensors: dict[str, np.ndarray] = {}
        pieces: dict[str, dict] = {}
        for name in _STORED:
            est = getattr(self, TRUST_PIECES[name][0])
            if est is None:
                continue
            pieces[name], arrays = _split_state(est.get_state())
            tensors.update({f"{name}.{k}": np.asarray(v) for k, v in arrays.items()})
        meta = {
            "format": TRUST_FORMAT,
            "classes": list(self.classes),
            "threshold": None if self.threshold is None else float(self.threshold),
            "operating_point": self.operating_point,
            "pieces": pieces,
            "fitted": self.fitted,
            "site_check": self.site_check,
        }
        return tensors, meta

    @classmethod
    def from_storage(cls, tensors: dict, meta: dict) -> TrustBundle:
        """Inverse of :meth:`to_storage`; also reads a binary run's trust files of format 1.
        KeyError/ValueError/TypeError/DataError on a bad state."""
        fmt = meta.get("format")
        if fmt == TRUST_FORMAT_V1:
            meta = _v1_as_v2(meta)
        elif fmt != TRUST_FORMAT:
            raise ValueError(f"format {fmt!r}, expected {TRUST_FORMAT} (or {TRUST_FORMAT_V1})")
        pieces = meta.get("pieces") or {}
        unknown = sorted(set(pieces) - set(_STORED))
        if unknown:
            raise ValueError(f"unknown trust pieces {unknown}")
        found = {}
        for name, stored in pieces.items():
            prefix = name + "."
            arrays = {k[len(prefix) :]: np.asarray(v) for k, v in tensors.items() if k.startswith(prefix)}
            found[TRUST_PIECES[name][0]] = TRUST_PIECES[name][2]({**stored, **arrays})
        classes = tuple(str(c) for c in meta["classes"])
        if len(set(classes)) != len(classes):
            raise ValueError(f"classes {list(classes)} are not different names")
        threshold, op = meta.get("threshold"), meta.get("operating_point")
        if threshold is not None:
            chosen = OperatingThreshold.from_state({"threshold": threshold, "operating_point": op})
            if len(classes) != 2:
                raise ValueError(f"an operating threshold needs two classes, got {list(classes)}")
            threshold, op = chosen.threshold_, str(op)
        conformal = found.get("conformal")
        if conformal is not None:
            if conformal.quantiles_.size != len(classes):
                raise ValueError(f"conformal sets over {conformal.quantiles_.size} classes, the run has {len(classes)}")
            conformal.set_params(class_names=classes)
            conformal.class_names_ = classes
        site = meta.get("site_check")
        if site is not None and not isinstance(site, dict):
            raise ValueError("site_check must be a JSON object")
        return cls(
            found.get("calibrator"),
            threshold,
            op,
            conformal,
            found.get("domain"),
            classes,
            dict(meta.get("fitted") or {}),
            found.get("shift"),
            site,
            found.get("interval"),
            found.get("orientation"),
        )

    @classmethod
    def from_task_record(
        cls, task_trust: dict | None, domain_state: dict | None, domain_fitted: str, classes
    ) -> TrustBundle:
        """A multiclass or regression run of run-folder format 2: its trust in config.json's
        ``record["task_trust"]`` (a temperature and conformal sets, or an interval) and its domain
        check in domain.json + domain.safetensors (``domain_state``: their state merged)."""
        tt = dict(task_trust or {})
        calibrator = calibrator_from_state(tt.pop("temperature")) if "temperature" in tt else None
        conformal = ConformalClassifier.from_state(tt.pop("conformal")) if "conformal" in tt else None
        interval = ConformalInterval.from_state(tt.pop("interval")) if "interval" in tt else None
        domain = None if domain_state is None else DomainCheck.from_state(domain_state)
        classes = tuple(str(c) for c in classes)
        if conformal is not None:
            if conformal.quantiles_.size != len(classes):
                raise ValueError(f"conformal sets over {conformal.quantiles_.size} classes, the run has {len(classes)}")
            conformal.set_params(class_names=classes)
            conformal.class_names_ = classes
        if domain is not None:
            tt["domain"] = domain_fitted
        return cls(calibrator, None, None, conformal, domain, classes, tt, None, None, interval)

    def summary(self) -> dict:
        """What the interfaces show about the bundle (API /api/model, evaluate)."""
        shift = self.shift
        return {
            "calibration": None if self.calibrator is None else self.calibrator.get_state(),
            "threshold": self.threshold,
            "operating_point": self.operating_point,
            "coverage": None if self.conformal is None else self.conformal.coverage,
            "domain_threshold": None if self.domain is None else self.domain.threshold_,
            "domain_method": None if self.domain is None else self.domain.method,
            "orientation": None
            if self.orientation is None
            else {
                "threshold": self.orientation.threshold_,
                "detection": self.orientation.detection_,
                "false_refusals": self.orientation.false_refusals_,
                "auc": self.orientation.auc_,
            },
            "class_conditional": None if self.conformal is None else self.conformal.class_conditional,
            "shift_reference": None
            if shift is None
            else {
                "domain_scores": None if shift.domain_scores_ is None else int(shift.domain_scores_.size),
                "probabilities": None if shift.probabilities_ is None else int(shift.probabilities_.size),
                **shift.source_,
            },
            "site_check": self.site_check,
            "fitted": self.fitted,
        }


def _v1_as_v2(meta: dict) -> dict:
    """A format-1 trust.json (binary: calibration, conformal, domain and shift at the top level)
    in format 2's shape; the arrays' names (``conformal.*``, ``domain.*``, ``shift.*``) are alike."""
    pieces = {"calibration": meta["calibration"], "conformal": meta["conformal"]}
    if meta.get("domain") is not None:
        pieces["domain"] = meta["domain"]
    if "shift" in meta:
        pieces["shift"] = {"source": meta["shift"]}
    classes = meta["classes"]
    if len(classes) != 2 or classes[0] == classes[1]:
        raise ValueError(f"classes {list(classes)} must be two different names")
    return {**meta, "format": TRUST_FORMAT, "pieces": pieces, "threshold": float(meta["threshold"])}


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
