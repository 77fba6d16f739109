"""What must stay together in a split: the grouping key.

Two files land in the same partition when they are linked by any of:

- the same picture: exact duplicates (same decoded pixels) and near duplicates (pHash within
  the threshold), as ``duplicates.py`` finds them;
- the same patient: ``patient_id`` from the label manifest;
- the same patient by the file's own word: DICOM ``PatientID``, or, in a file without any
  patient id (anonymised exports often blank it), its ``StudyInstanceUID``.

Groups are the connected components of the graph these links make (scipy), so a patient's left
knee, right knee and follow-up films, and any copy of them, form one unit of the split.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from kneeosteo.data.duplicates import NEAR_DUP_THRESHOLD, component_labels
from kneeosteo.data.scan import Record

__all__ = ["KEY_SOURCES", "dicom_patient_ids", "group_summary", "patient_keys", "split_groups"]

# source name -> what it is, in the order a record's keys are looked up
KEY_SOURCES = {
    "patient_id": "patient_id column of the label manifest",
    "PatientID": "DICOM PatientID",
    "StudyInstanceUID": "DICOM StudyInstanceUID (files without any patient id)",
}


def patient_keys(r: Record) -> list[tuple[str, str]]:
    """The (source, value) keys linking ``r`` to other films of its patient."""
    keys = []
    if r.patient_id:
        keys.append(("patient_id", r.patient_id))
    if r.meta.patient_id:
        keys.append(("PatientID", r.meta.patient_id))
    if not keys and r.meta.study_uid:
        keys.append(("StudyInstanceUID", r.meta.study_uid))
    return keys


def dicom_patient_ids(records: list[Record]) -> int:
    """How many records carry a DICOM PatientID."""
    return sum(1 for r in records if r.meta.patient_id)


def split_groups(records: list[Record], threshold: int = NEAR_DUP_THRESHOLD) -> tuple[dict[str, int], list[str]]:
    """(path -> group id, the key sources that linked anything). Group ids count from 0 in the
    order of first appearance in ``records``."""
    n = len(records)
    dup = component_labels([r.content_id for r in records], [r.phash for r in records], threshold)
    used = ["exact duplicates", f"near duplicates (pHash <= {threshold} bits)"]
    first: dict[tuple, int] = {}
    edges = []
    for i, r in enumerate(records):
        for key in [("picture", int(dup[i]))] + patient_keys(r):
            j = first.setdefault(key, i)
            if j != i:
                edges.append((j, i))
    sources = {k[0] for k in first if k[0] != "picture"}
    used += [s for s in KEY_SOURCES if s in sources]
    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(e), dtype=np.int8), (e[:, 0], e[:, 1])), shape=(n, n))
    comp = connected_components(graph, directed=False)[1].tolist()
    relabel = {c: k for k, c in enumerate(dict.fromkeys(comp))}
    return {r.path: relabel[c] for r, c in zip(records, comp)}, used


def group_summary(records: list[Record]) -> dict:
    """Images per patient, by the patient keys alone (no duplicates): for the audit."""
    by_key: Counter = Counter()
    without = 0
    for r in records:
        keys = patient_keys(r)
        if keys:
            by_key[keys[0]] += 1
        else:
            without += 1
    counts = sorted(by_key.values())
    sources = Counter(k[0] for k in by_key)
    out = {
        "patients": len(by_key),
        "images_with_patient": sum(counts),
        "images_without_patient": without,
        "key_sources": {s: sources[s] for s in KEY_SOURCES if sources[s]},
        "dicom_patient_ids": dicom_patient_ids(records),
        "manifest_patient_ids": sum(1 for r in records if r.patient_id),
    }
    if counts:
        out["images_per_patient"] = {
            "min": counts[0],
            "median": float(np.median(counts)),
            "max": counts[-1],
            "patients_with_2_or_more": sum(1 for c in counts if c >= 2),
        }
    return out
