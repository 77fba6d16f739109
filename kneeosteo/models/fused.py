"""The fused model a run may carry: the image model's evidence plus the patient's covariates.

``evaluate RUN --reference R --covariates age,sex,weight_kg --store-fused`` fits it
(:func:`kneeosteo.evaluation.clinical.fit_fused`) and writes ``RUN/fused.json``: plain numbers,
never a pickle. It is a logistic regression on standardised inputs
``[logit(raw image probability), covariate_1, ...]``::

    z_j = (input_j - mean_j) / scale_j
    P(positive) = 1 / (1 + exp(-(intercept + sum_j coef_j * z_j)))

The image input is the model's *raw* probability (``predictions.csv``'s ``probability``,
``predict``'s ``raw_probability``), so a later ``calibrate`` does not change what it was fitted on.
The file records the weights' sha256 it was fitted for, and config.json's record its own sha256
(``record.fused.sha256``, as for the trust files): an edited, planted or foreign file is refused.

A run "uses" covariates when it holds ``fused.json``. Each answer then says what it rests on
(``answer_basis``): ``image_and_covariates`` when every covariate was given, ``image_only`` when one
is missing (and which), never a zero or a mean in its place; a value that is given but not a
number is a :class:`~kneeosteo.errors.DataError` naming it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kneeosteo.data.reference import covariate_value
from kneeosteo.errors import CheckpointError, DataError

__all__ = ["FORMAT", "FUSED_FILE", "IMAGE_AND_COVARIATES", "IMAGE_ONLY", "FusedModel", "load_fused"]

FUSED_FILE = "fused.json"
FORMAT = "kneeosteo-fused-logistic"
IMAGE_ONLY = "image_only"
IMAGE_AND_COVARIATES = "image_and_covariates"
_EPS = 1e-6


@dataclass(frozen=True)
class FusedModel:
    covariates: tuple[str, ...]
    mean: tuple[float, ...]  # per input: logit(raw image probability), then each covariate
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    weights_sha256: str  # the image model it was fitted for
    definition: str  # the reference truth it predicts (osteoporosis | low_bone_mass)
    threshold: float = 0.5
    fitted_on: dict = field(default_factory=dict)
    estimate: dict = field(default_factory=dict)  # its cross-fitted AUC on the films it was fitted on

    def probability(self, raw_image_probability: float, values: Sequence[float]) -> float:
        """P(positive) from the image model's raw probability and the covariates, in order."""
        p = min(max(float(raw_image_probability), _EPS), 1 - _EPS)
        inputs = [math.log(p / (1 - p)), *map(float, values)]
        if len(inputs) != len(self.coef):
            raise ValueError(f"{len(values)} covariates given, the fused model takes {len(self.covariates)}")
        s = self.intercept + sum(c * (x - m) / sd for c, x, m, sd in zip(self.coef, inputs, self.mean, self.scale))
        return 1 / (1 + math.exp(-s)) if s >= 0 else math.exp(s) / (1 + math.exp(s))

    def answer(self, raw_image_probability: float, cells: Mapping[str, object], where: str) -> dict:
        """``{"fused_probability", "answer_basis", "missing_covariates"}`` for one image; a value
        that is not a number is a DataError naming ``where``."""
        values, missing = [], []
        for name in self.covariates:
            try:
                v = covariate_value(name, cells.get(name))
            except ValueError as exc:
                raise DataError(f"{where}: {exc}") from None
            (missing.append(name) if v is None else values.append(v))
        if missing:
            return {"fused_probability": None, "answer_basis": IMAGE_ONLY, "missing_covariates": missing}
        return {
            "fused_probability": self.probability(raw_image_probability, values),
            "answer_basis": IMAGE_AND_COVARIATES,
            "missing_covariates": [],
        }

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "inputs": ["logit(raw image probability)", *self.covariates],
            "covariates": list(self.covariates),
            "mean": list(self.mean),
            "scale": list(self.scale),
            "coef": list(self.coef),
            "intercept": self.intercept,
            "threshold": self.threshold,
            "weights_sha256": self.weights_sha256,
            "definition": self.definition,
            "fitted_on": self.fitted_on,
            "estimate": self.estimate,
        }

    @classmethod
    def from_json(cls, doc: dict, where: str) -> FusedModel:
        try:
            if doc.get("format") != FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, not {FORMAT}")
            names = tuple(str(n) for n in doc["covariates"])
            arrays = [tuple(float(v) for v in doc[k]) for k in ("mean", "scale", "coef")]
            numbers = [float(doc["intercept"]), float(doc.get("threshold", 0.5))]
            if not names or any(len(a) != len(names) + 1 for a in arrays):
                raise ValueError("mean, scale and coef need one value per input (the image and each covariate)")
            if not all(math.isfinite(v) for a in arrays for v in a) or not all(map(math.isfinite, numbers)):
                raise ValueError("a coefficient is not a finite number")
            if any(v <= 0 for v in arrays[1]):
                raise ValueError("a scale is not positive")
            return cls(
                names,
                arrays[0],
                arrays[1],
                arrays[2],
                numbers[0],
                str(doc["weights_sha256"]),
                str(doc["definition"]),
                numbers[1],
                dict(doc.get("fitted_on") or {}),
                dict(doc.get("estimate") or {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{where}: malformed fused model ({exc})") from None


def load_fused(run_path: str | Path, weights_sha256: str, recorded_sha256: str | None) -> FusedModel | None:
    """``RUN/fused.json``, checked against the sha256 config.json's record holds for it
    (``recorded_sha256``) and against the run's weights; None when the run has none. A file the
    record does not know (planted, or left by an interrupted write), an edited one, or one fitted
    for other weights is a CheckpointError naming it."""
    f = Path(run_path) / FUSED_FILE
    if recorded_sha256 is None:
        if f.exists():
            raise CheckpointError(
                f"{f}: not recorded in config.json (planted or left by an interrupted write); "
                "remove it or refit with `kneeosteo evaluate RUN ... --store-fused`"
            )
        return None
    if not f.is_file():
        raise CheckpointError(
            f"{f}: missing or not a regular file, but config.json records a fused model; copy the whole run folder"
        )
    try:
        data = f.read_bytes()
        if hashlib.sha256(data).hexdigest() != recorded_sha256:
            raise CheckpointError(
                f"{f}: sha256 differs from the one recorded in config.json; the file was edited "
                "or swapped after fitting"
            )
        doc = json.loads(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{f}: unreadable ({exc})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{f}: malformed fused model (not a JSON object)")
    model = FusedModel.from_json(doc, str(f))
    if model.weights_sha256 != weights_sha256:
        raise CheckpointError(
            f"{f}: fitted for weights {model.weights_sha256[:12]}, the run's are "
            f"{weights_sha256[:12]}: refit it (`kneeosteo evaluate RUN ... --store-fused`)"
        )
    return model
