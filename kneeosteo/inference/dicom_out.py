"""Results as DICOM objects a PACS viewer shows (issue 34): a Structured Report per film and a
Secondary Capture of its Grad-CAM heat map, both in the source film's study.

- The **SR** is a Comprehensive 3D SR holding an Imaging Measurement Report (TID 1500, written
  with ``highdicom``): one measurement group that references the source image and carries the
  algorithm (the model's id, kneeosteo's version, the run's threshold and positive class as its
  parameters), the status and its reason, and, for an in-domain film, the finding (the label at
  the threshold), the calibrated and raw probabilities, the conformal prediction set, and the
  domain score. An **out-of-domain film gets an SR that says so and no finding**: no label, no
  probability, no prediction set (a probability for a film unlike the training films is not a
  result); its status, reason and domain score are there.
- The **SC** is the radiograph with the Grad-CAM map laid over it, ``DERIVED\\SECONDARY``, with
  "RESEARCH USE ONLY" burned into its pixels (``BurnedInAnnotation`` YES). Out-of-domain films
  get none.

Patient and study data are copied from the source dataset by highdicom, never invented (a
missing type-2 attribute stays empty). Every series and SOP instance UID is new
(:func:`new_uid`); the caller keeps them (``interfaces/pacs.py`` does, in its outbox) so that a
retry sends the same objects instead of new copies. Codes of kneeosteo's own concepts use the
private coding scheme ``99KNEEOSTEO``: the classes are the training data's labels, not a
clinical diagnosis, and we do not dress them up as SNOMED concepts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kneeosteo import __version__
from kneeosteo.errors import DataError, KneeosteoError
from kneeosteo.run import ModelInfo
from kneeosteo.trust import TrustedPrediction

__all__ = [
    "MANUFACTURER",
    "REFERENCE_TAGS",
    "RESEARCH_USE",
    "SCHEME",
    "DicomResult",
    "check_reference",
    "heatmap_rgb",
    "new_uid",
    "read_sr",
    "require_extra",
    "secondary_capture",
    "structured_report",
    "write_dicom_results",
]

SCHEME = "99KNEEOSTEO"
MANUFACTURER = "kneeosteo"
RESEARCH_USE = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS"
# what a reference to the source needs (the SR's evidence and image library, the SC's study),
# plus the image attributes highdicom copies into the SC
REFERENCE_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
MAX_LO = 64  # a DICOM LO value's length


def require_extra(*modules: str) -> None:
    """One line instead of an ImportError when the ``pacs`` extra is not installed."""
    import importlib

    for name in ("highdicom",) + modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise KneeosteoError(
                f"DICOM output needs highdicom and dicomweb-client ({exc}); pip install 'kneeosteo[pacs]'"
            ) from None


def new_uid() -> str:
    """A fresh UID (highdicom's: the pydicom root and random entropy), never a reused one."""
    import highdicom as hd

    return str(hd.UID())


def check_reference(ds, name: str) -> None:
    """Raise DataError naming ``name`` and every attribute a reference to it needs but it lacks."""
    missing = [k for k in REFERENCE_TAGS if not str(getattr(ds, k, "") or "").strip()]
    if missing:
        raise DataError(
            f"{name}: the DICOM lacks {', '.join(missing)}, which the SR's reference to it needs; "
            "nothing was written for it"
        )


# type-2 patient and study attributes the copies need: present (maybe empty) in a valid source;
# one that is absent is copied as empty ("unknown"), never filled with an invented value
TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def _reference_copy(source):
    """``source`` without its pixel data, with absent type-2 patient/study attributes empty."""
    from pydicom.dataset import Dataset

    ref = Dataset()
    for elem in source:
        if elem.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            ref.add(elem)
    for keyword in TYPE2_COPIED:
        if keyword not in ref:
            setattr(ref, keyword, "")
    return ref


def _code(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value[:16], scheme_designator=SCHEME, meaning=meaning[:MAX_LO])


# the report's private concepts: (code value, meaning)
CONCEPTS = {
    "procedure": ("KNEE-AI", "Knee radiograph osteoporosis model"),
    "probability": ("PROB-CAL", "Calibrated probability of the positive class"),
    "raw": ("PROB-RAW", "Uncalibrated model probability"),
    "threshold": ("THRESHOLD", "Decision threshold on the probability"),
    "domain": ("DOMAIN-SCORE", "Domain score (feature distance)"),
    "domain_threshold": ("DOMAIN-THR", "Domain score threshold"),
    "status": ("STATUS", "Prediction status"),
    "reason": ("REASON", "Reason for the status"),
    "set": ("PRED-SET", "Conformal prediction set member"),
    "positive": ("POS-CLASS", "Positive class"),
    "use": ("INTENDED-USE", "Intended use"),
}
STATUS_MEANINGS = {
    "ok": "ok: in domain, one class in the prediction set",
    "uncertain": "uncertain: the prediction set is not one class",
    "out_of_domain": "out of domain: no finding",
}


def status_reason(t: TrustedPrediction) -> tuple[str, str]:
    """(code, meaning) of why the film got its status."""
    if t.status == "out_of_domain":
        if np.isfinite(t.domain_score) and np.isfinite(t.domain_threshold) and t.domain_score > t.domain_threshold:
            return "DOMAIN-FAR", "features beyond the domain threshold"
        return "PIXELS", "pixel check failed: not like a knee radiograph"
    if t.status == "uncertain":
        return (
            ("SET-EMPTY", "empty prediction set")
            if not t.prediction_set
            else ("SET-BOTH", "prediction set holds both classes")
        )
    return (
        ("CALIBRATED", "in domain, calibrated")
        if t.calibrated
        else ("UNCALIBRATED", "in domain; run has no calibration")
    )


@dataclass(frozen=True)
class DicomResult:
    """What :func:`read_sr` finds in a kneeosteo SR."""

    source_sop_uid: str
    model_id: str
    status: str
    probability: float | None
    finding: str | None


def _algorithm(info: ModelInfo, threshold: float):
    from highdicom.sr import AlgorithmIdentification

    # TEXT items (UT): the model id is kept whole however long its folder name, since a later pass
    # compares it to know which films are done
    return AlgorithmIdentification(
        name=f"kneeosteo model {info.model_id}",
        version=__version__,
        parameters=[f"threshold={threshold:g}", f"positive class={info.positive}", f"negative class={info.negative}"],
    )


def structured_report(
    source,
    t: TrustedPrediction,
    info: ModelInfo,
    threshold: float,
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int = 901,
    instance_number: int = 1,
):
    """The SR (a ``highdicom.sr.Comprehensive3DSR``) of one film's verdict ``t``.

    ``source`` is the film's pydicom dataset (pixel data not needed); ``threshold`` the run's
    operating threshold; the UIDs are the caller's (new ones, kept for retries)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    check_reference(source, "source film")
    source = _reference_copy(source)
    ood = t.status == "out_of_domain"
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_device_uid(info), name="kneeosteo", manufacturer_name=MANUFACTURER, model_name=info.model_id[:MAX_LO]
        ),
    )
    context = hd.sr.ObservationContext(observer_device_context=observer)
    algorithm = _algorithm(info, threshold)
    num = lambda key, v: hd.sr.Measurement(  # noqa: E731
        name=_code(*CONCEPTS[key]), value=float(v), unit=codes.UCUM.NoUnits, algorithm_id=algorithm
    )
    measurements = []
    if not ood and np.isfinite(t.probability):
        measurements += [num("probability", t.probability), num("raw", t.raw_probability)]
    measurements.append(num("threshold", threshold))
    if np.isfinite(t.domain_score):
        measurements += [num("domain", t.domain_score), num("domain_threshold", t.domain_threshold)]
    qual = lambda key, value: hd.sr.QualitativeEvaluation(_code(*CONCEPTS[key]), value)  # noqa: E731
    evaluations = [
        qual("status", _code(t.status.upper().replace("_", "-"), STATUS_MEANINGS[t.status])),
        qual("reason", _code(*status_reason(t))),
        qual("positive", _code(info.positive, f"'{info.positive}' as labelled in the training data")),
        qual("use", _code("RESEARCH", RESEARCH_USE)),
    ]
    if not ood:
        evaluations.insert(0, hd.sr.QualitativeEvaluation(codes.DCM.Finding, _code(t.label, t.label)))
        evaluations += [qual("set", _code(c, c)) for c in t.prediction_set]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=new_uid(), identifier=f"kneeosteo {source.SOPInstanceUID}"[:MAX_LO]
        ),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    report = hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=_code(*CONCEPTS["procedure"]), imaging_measurements=[group]
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=report,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        series_description=f"kneeosteo SR (research use only) {info.model_id}"[:MAX_LO],
        is_complete=True,
    )
    _mark(sr)
    from pydicom.dataset import Dataset

    scheme = Dataset()  # the private scheme, declared as PS3.3 C.12.1.1.2 asks
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "kneeosteo concepts"
    scheme.CodingSchemeResponsibleOrganization = "the kneeosteo project"
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


def _device_uid(info: ModelInfo) -> str:
    # the device is the model: one UID per model id, the same in every report it makes (a device
    # UID identifies the observer, it is not an instance UID)
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["kneeosteo model", info.model_id])


def _mark(ds) -> None:
    """What every object we write says about itself, in attributes viewers show."""
    ds.ManufacturerModelName = "kneeosteo"
    ds.SoftwareVersions = __version__


def heatmap_rgb(pixels: np.ndarray, gradcam: np.ndarray, caption: str) -> np.ndarray:
    """The radiograph (H, W) in [0, 1] with Grad-CAM laid over it (jet, 45 %), and two lines burned
    in at the top: RESEARCH USE ONLY and ``caption``; uint8 (H, W, 3)."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    grey = np.repeat(np.clip(pixels, 0, 1)[..., None], 3, axis=2)
    heat = colormaps["jet"](np.clip(gradcam, 0, 1))[..., :3]
    rgb = (0.55 * grey + 0.45 * heat) * 255
    img = Image.fromarray(np.rint(rgb).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    h, w = pixels.shape
    size = max(8, min(w // 28, h // 10, 48))
    try:
        from PIL import ImageFont

        font = ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1: one bitmap size
        from PIL import ImageFont

        font = ImageFont.load_default()
    for i, line in enumerate((RESEARCH_USE, caption)):
        xy = (4, 4 + i * (size + 4))
        box = draw.textbbox(xy, line, font=font)
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text(xy, line, fill=(255, 255, 0), font=font)
    return np.asarray(img)


def secondary_capture(
    source, rgb: np.ndarray, *, series_uid: str, sop_uid: str, series_number: int = 902, instance_number: int = 1
):
    """The heat map ``rgb`` (uint8 (H, W, 3)) as a Secondary Capture in ``source``'s study,
    marked derived, with burned-in annotation, and referencing the source image."""
    import highdicom as hd
    from pydicom.dataset import Dataset

    check_reference(source, "source film")
    source = _reference_copy(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.ascontiguousarray(rgb, dtype=np.uint8),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        patient_orientation=("A", "F"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    # highdicom wants an orientation; the SC's is the source's, verbatim, or empty (type 2: unknown)
    sc.PatientOrientation = source.get("PatientOrientation", "") or ""
    # a knee is a paired structure: the side from the source (its series' Laterality, or the
    # image's when that is R or L), else empty (type 2C: unknown)
    side = str(source.get("Laterality", "") or source.get("ImageLaterality", "") or "")
    sc.Laterality = side if side in ("R", "L") else ""
    if source.get("BodyPartExamined"):
        sc.BodyPartExamined = source.BodyPartExamined
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.SeriesDescription = "kneeosteo heat map (research use only)"
    sc.DerivationDescription = "Grad-CAM of the kneeosteo model over the source radiograph; " + RESEARCH_USE
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    _mark(sc)
    return sc


def read_sr(ds) -> DicomResult | None:
    """A kneeosteo SR's source film, model id, status, probability and finding (None: not ours)."""
    if str(getattr(ds, "Manufacturer", "")) != MANUFACTURER or str(getattr(ds, "Modality", "")) != "SR":
        return None
    found: dict[str, object] = {}

    def walk(items) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
            key = (name.CodingSchemeDesignator, name.CodeValue) if name is not None else None
            vt = getattr(item, "ValueType", "")
            if vt == "TEXT" and name is not None and name.CodeMeaning == "Algorithm Name":
                found.setdefault("algorithm", str(item.TextValue))
            elif vt == "NUM" and key == (SCHEME, CONCEPTS["probability"][0]):
                found["probability"] = float(item.MeasuredValueSequence[0].NumericValue)
            elif vt == "CODE" and key == (SCHEME, CONCEPTS["status"][0]):
                found["status"] = str(item.ConceptCodeSequence[0].CodeValue).lower().replace("-", "_")
            elif vt == "CODE" and key == ("DCM", "121071"):
                found["finding"] = str(item.ConceptCodeSequence[0].CodeValue)
            elif vt == "IMAGE" and "ReferencedSOPSequence" in item:
                found.setdefault("source", str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(getattr(ds, "ContentSequence", []))
    algorithm = str(found.get("algorithm", ""))
    prefix = "kneeosteo model "
    if not algorithm.startswith(prefix) or "source" not in found:
        return None
    return DicomResult(
        str(found["source"]),
        algorithm[len(prefix) :],
        str(found.get("status", "")),
        found.get("probability"),
        found.get("finding"),
    )


def write_dicom_results(predictions, explainer, out_dir, progress: bool = False) -> tuple[list, list[str]]:
    """``predict --dicom-out``: for each prediction of a DICOM file, its SR (and, in domain, its
    heat-map SC) as ``OUT/<source SOPInstanceUID>.sr.dcm`` / ``.sc.dcm``, written atomically. The
    SR holds the prediction's own numbers (the CSV row's, whatever the engine); ``explainer`` (the
    same run, torch) draws the map. Returns (written paths, one line per input left out)."""
    from pathlib import Path

    import pydicom

    from kneeosteo.data.reader import read_image
    from kneeosteo.errors import ImageReadError
    from kneeosteo.utils.atomic import atomic_path

    out_dir = Path(out_dir)
    written, skipped = [], []
    for p in predictions:
        try:
            ds = pydicom.dcmread(p.path, stop_before_pixels=False)
        except Exception:  # pydicom raises several types for a file that is not DICOM
            skipped.append(f"{p.path}: not a DICOM file, so no patient or study to put an SR in; no DICOM output")
            continue
        try:
            check_reference(ds, p.path)
        except DataError as exc:
            skipped.append(str(exc))
            continue
        t = TrustedPrediction(
            p.status,
            p.probability,
            p.raw_probability,
            p.label,
            tuple(p.prediction_set),
            float("nan") if p.domain_score is None else p.domain_score,
            float("nan") if p.domain_threshold is None else p.domain_threshold,
            p.calibrated,
        )
        objects = [
            ("sr", structured_report(ds, t, explainer.info, p.threshold, series_uid=new_uid(), sop_uid=new_uid()))
        ]
        if p.status != "out_of_domain":
            try:
                pixels = read_image(p.path).pixels
            except ImageReadError as exc:  # it was read a moment ago; changed since
                skipped.append(f"{p.path}: {exc.reason}; no DICOM output")
                continue
            ex = explainer.explain(pixels)
            caption = f"P({explainer.info.positive}) {p.probability:.2f}: {p.label} ({p.status})"
            objects.append(
                (
                    "sc",
                    secondary_capture(
                        ds, heatmap_rgb(pixels, ex.gradcam, caption), series_uid=new_uid(), sop_uid=new_uid()
                    ),
                )
            )
        for kind, obj in objects:
            target = out_dir / f"{ds.SOPInstanceUID}.{kind}.dcm"
            with atomic_path(target) as tmp:
                obj.save_as(tmp, enforce_file_format=True)
            written.append(target)
    return written, skipped
