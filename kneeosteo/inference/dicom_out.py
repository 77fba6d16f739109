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
missing type-2 attribute stays empty). A film that is not DICOM (PNG, JPEG, TIFF...) has no
patient or study of its own: with a manifest (``predict --dicom-manifest FILE.csv``,
:func:`read_dicom_manifest`) giving them per file, the film is first written as a DICOM Secondary
Capture of its own (:func:`wrapped_film`: derived, research use only, the manifest's patient and
study, new UIDs), and the SR and the heat map reference that image as they would a DICOM source.
A film without a valid manifest row gets nothing: its patient is never guessed. Every series and SOP instance UID is new
(:func:`new_uid`); the caller keeps them (``interfaces/pacs.py`` does, in its outbox) so that a
retry sends the same objects instead of new copies. Codes of kneeosteo's own concepts use the
private coding scheme ``99KNEEOSTEO``: the classes are the training data's labels, not a
clinical diagnosis, and we do not dress them up as SNOMED concepts.
"""

from __future__ import annotations

import re
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
    "ManifestRow",
    "check_reference",
    "heatmap_rgb",
    "manifest_key",
    "new_uid",
    "read_dicom_manifest",
    "read_sr",
    "require_extra",
    "secondary_capture",
    "structured_report",
    "wrapped_film",
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


# --dicom-manifest: the columns read (others are ignored, so one CSV can also be the input manifest
# or the covariates). Required: without them there is no patient or study to file the film in.
MANIFEST_REQUIRED = ("PatientID", "PatientName", "StudyInstanceUID")
# type 2 in the objects: a blank or absent cell stays empty ("unknown"), never filled in
MANIFEST_OPTIONAL = (
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
    "Laterality",
)
_TIME = re.compile(r"([01]\d|2[0-3])([0-5]\d([0-5]\d(\.\d{1,6})?)?)?")


def _check_text(value: str, limit: int) -> str | None:
    if len(value) > limit:
        return f"longer than {limit} characters"
    if "\\" in value or any(ord(c) < 32 for c in value):
        return "holds a backslash or a control character"
    return None


def _check_name(value: str) -> str | None:
    if value.count("^") > 4:
        return "has more than five ^-separated components"
    return _check_text(value, MAX_LO)


def _check_date(value: str) -> str | None:
    import datetime

    if len(value) != 8 or not value.isdigit():
        return "is not a date YYYYMMDD"
    try:
        datetime.datetime.strptime(value, "%Y%m%d")
    except ValueError:
        return "is not a date YYYYMMDD"
    return None


def _check_uid(value: str) -> str | None:
    import warnings

    from pydicom.uid import UID

    with warnings.catch_warnings():  # pydicom warns of the invalid value we are about to name
        warnings.simplefilter("ignore")
        valid = UID(value).is_valid
    return None if valid else "is not a valid DICOM UID (digits and dots, at most 64)"


_CHECKS = {
    "PatientID": lambda v: _check_text(v, MAX_LO),
    "PatientName": _check_name,
    "StudyInstanceUID": _check_uid,
    "PatientBirthDate": _check_date,
    "PatientSex": lambda v: None if v in ("M", "F", "O") else "is not M, F or O",
    "StudyDate": _check_date,
    "StudyTime": lambda v: None if _TIME.fullmatch(v) else "is not a time HHMMSS",
    "StudyID": lambda v: _check_text(v, 16),
    "AccessionNumber": lambda v: _check_text(v, 16),
    "ReferringPhysicianName": _check_name,
    "StudyDescription": lambda v: _check_text(v, MAX_LO),
    "Laterality": lambda v: None if v in ("R", "L") else "is not R or L",
}


@dataclass(frozen=True)
class ManifestRow:
    """One film's row of a ``--dicom-manifest``: where it is (``FILE row N``) and either its
    checked values (keyword -> value, "" for an empty type-2 one) or the problem that skips it."""

    where: str
    values: dict[str, str]
    problem: str | None = None


def manifest_key(path) -> str:
    """How a manifest row and a prediction find each other: the resolved path."""
    from pathlib import Path

    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):
        return str(Path(path).absolute())


def read_dicom_manifest(file) -> dict[str, ManifestRow]:
    """``--dicom-manifest FILE.csv``: resolved film path -> its :class:`ManifestRow`. A ``path``
    column (relative paths from the CSV's folder, as in an input manifest) and the
    :data:`MANIFEST_REQUIRED` columns must be there (else DataError, one line); a row with a value
    missing or invalid is kept with its problem, so that its film is named and skipped while the
    rest goes on; two rows for one film skip it too (which one is right is not ours to choose)."""
    import csv
    from pathlib import Path

    file = Path(file)
    try:
        with open(file, newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
            reader = csv.DictReader(fh)
            header = [(h or "").strip() for h in reader.fieldnames or []]
            rows = list(reader)
    except (OSError, csv.Error) as exc:
        raise DataError(
            f"{file}: the DICOM manifest cannot be read ({getattr(exc, 'strerror', None) or exc})"
        ) from None
    absent = [c for c in ("path",) + MANIFEST_REQUIRED if c not in header]
    if absent:
        raise DataError(
            f"{file}: no {', '.join(absent)} column, which the DICOM manifest needs "
            f"(columns: {', '.join(header) or 'none'})"
        )
    out: dict[str, ManifestRow] = {}
    for number, raw in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if isinstance(v, str) or v is None}
        path = row.get("path", "")
        if not path:
            continue
        where = f"{file} row {number}"
        values = {k: row.get(k, "") for k in MANIFEST_REQUIRED + MANIFEST_OPTIONAL}
        problem = None
        for keyword in MANIFEST_REQUIRED + MANIFEST_OPTIONAL:
            value = values[keyword]
            if not value:
                if keyword in MANIFEST_REQUIRED:
                    problem = f"{keyword} is empty"
                    break
                continue
            why = _CHECKS[keyword](value)
            if why:
                problem = f"{keyword} {value!r} {why}"
                break
        p = Path(path)
        key = manifest_key(p if p.is_absolute() else file.parent / p)
        if key in out:
            first = out[key].where.rsplit(" ", 1)[-1]
            out[key] = ManifestRow(
                f"{file} rows {first} and {number}",
                {},
                "two rows for one film (which one is right is not ours to choose)",
            )
            continue
        out[key] = ManifestRow(where, values if problem is None else {}, problem)
    return out


def wrapped_film(
    pixels: np.ndarray,
    patient: dict[str, str],
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int = 900,
    instance_number: int = 1,
):
    """A non-DICOM film as a Secondary Capture that an SR can reference: the pixels kneeosteo read
    (``pixels``, (H, W) in [0, 1], MONOCHROME2 16 bit, so an 8-bit file is kept exactly), the
    manifest's patient and study (``patient``, checked by :func:`read_dicom_manifest`; an empty
    value stays empty), new series and instance UIDs, ``DERIVED``, marked research use only."""
    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian

    v = lambda k: patient.get(k) or None  # noqa: E731
    arr = np.rint(np.clip(pixels, 0.0, 1.0) * 65535.0).astype(np.uint16)
    sc = hd.sc.SCImage(
        pixel_array=np.ascontiguousarray(arr),
        photometric_interpretation="MONOCHROME2",
        bits_allocated=16,
        coordinate_system="PATIENT",
        study_instance_uid=patient["StudyInstanceUID"],
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        patient_id=patient["PatientID"],
        patient_name=patient["PatientName"],
        patient_birth_date=v("PatientBirthDate"),
        patient_sex=v("PatientSex"),
        accession_number=v("AccessionNumber"),
        study_id=v("StudyID"),
        study_date=v("StudyDate"),
        study_time=v("StudyTime"),
        referring_physician_name=v("ReferringPhysicianName"),
        laterality=v("Laterality"),
        patient_orientation=("A", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    sc.PatientOrientation = ""  # highdicom wants one; the file says none (type 2: unknown)
    sc.Laterality = patient.get("Laterality") or ""  # a knee is paired: the manifest's side, or unknown (2C)
    if patient.get("StudyDescription"):
        sc.StudyDescription = patient["StudyDescription"]
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"  # from a workstation's exported file
    sc.SeriesDescription = "kneeosteo film from a non-DICOM file (research use only)"
    sc.DerivationDescription = (
        "A non-DICOM film as kneeosteo read it, converted to DICOM; patient and study from a manifest; " + RESEARCH_USE
    )
    sc.ImageComments = RESEARCH_USE
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


def write_dicom_results(
    predictions, explainer, out_dir, manifest: dict[str, ManifestRow] | None = None, progress: bool = False
) -> tuple[list, list[str]]:
    """``predict --dicom-out``: for each prediction of a DICOM file, its SR (and, in domain, its
    heat-map SC) as ``OUT/<source SOPInstanceUID>.sr.dcm`` / ``.sc.dcm``, written atomically. The
    SR holds the prediction's own numbers (the CSV row's, whatever the engine); ``explainer`` (the
    same run, torch) draws the map. A non-DICOM film with a valid row in ``manifest``
    (:func:`read_dicom_manifest`) is first wrapped (:func:`wrapped_film`, ``OUT/<its new
    SOPInstanceUID>.image.dcm``) and its SR and map reference that. Returns (written paths, one
    line per input left out)."""
    from pathlib import Path

    import pydicom

    from kneeosteo.data.reader import read_image
    from kneeosteo.errors import ImageReadError
    from kneeosteo.utils.atomic import atomic_path

    out_dir = Path(out_dir)
    written, skipped = [], []
    for p in predictions:
        objects = []
        pixels = None
        try:
            ds = pydicom.dcmread(p.path, stop_before_pixels=False)
        except Exception:  # pydicom raises several types for a file that is not DICOM
            if manifest is None:
                skipped.append(
                    f"{p.path}: not a DICOM file, so no patient or study to put an SR in "
                    "(give them in --dicom-manifest); no DICOM output"
                )
                continue
            row = manifest.get(manifest_key(p.path))
            if row is None:
                skipped.append(f"{p.path}: not a DICOM file and not in the --dicom-manifest; no DICOM output")
                continue
            if row.problem is not None:
                skipped.append(f"{row.where} ({p.path}): {row.problem}; no DICOM output for it")
                continue
            try:
                pixels = read_image(p.path).pixels
            except ImageReadError as exc:  # it was read a moment ago; changed since
                skipped.append(f"{p.path}: {exc.reason}; no DICOM output")
                continue
            ds = wrapped_film(pixels, row.values, series_uid=new_uid(), sop_uid=new_uid())
            objects.append(("image", ds))
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
        objects.append(
            ("sr", structured_report(ds, t, explainer.info, p.threshold, series_uid=new_uid(), sop_uid=new_uid()))
        )
        if p.status != "out_of_domain":
            if pixels is None:
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
