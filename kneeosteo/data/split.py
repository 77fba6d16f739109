"""Leakage-safe train/val/test splits, and the stable JSON format every command accepts.

De-duplication comes first: one representative per exact-duplicate group, groups whose copies
carry different labels excluded, and near-duplicate clusters assigned as a unit so no picture
(or a re-encoded copy of it) is on both sides of a partition.

File format (paths relative to DATA, POSIX, the label is the first path component)::

    {"format": "kneeosteo-split/1", "data": "...", "seed": 0, "protocol": "paper",
     "train": [...], "val": [...], "test": [...],
     "excluded": [{"path": ..., "reason": ...}], ...}

``--protocol kfold`` replaces train/val/test by ``"folds": [{"train", "val", "test"}, ...]``.
``--protocol holdout-reference --reference tscores.csv`` holds a whole source out: test = every
film of the reference manifest with a single truth (one per exact-duplicate group), labelled by its
T-score under the chosen ``definition``; train/val = the other films with their own labels, less
every film linked to a held-out one by a duplicate, a near duplicate or a patient. The test set
is the same for every seed; ``"reference"`` records the manifest, its sha256 and the definition.
Files written by other tools need only the partition keys (and ``data`` if DATA isn't given).
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from kneeosteo.data.duplicates import NEAR_DUP_THRESHOLD, deduplicate
from kneeosteo.data.grouping import patient_keys, split_groups
from kneeosteo.data.scan import POSITIVE_CLASS, Record, Scan, binary_classes
from kneeosteo.data.who import severity_order
from kneeosteo.errors import ConfigError, DataError
from kneeosteo.utils.atomic import write_json
from kneeosteo.utils.hashing import sha256_file

log = logging.getLogger(__name__)

FORMAT = "kneeosteo-split/1"
PAPER_TEST_SIZE = 72
PARTS = ("train", "val", "test")
PROTOCOLS = ("paper", "kfold", "holdout-reference")


def _units(records: list[Record], threshold: int) -> tuple[list[list[Record]], list[str]]:
    """The split's units (files that must stay together, ``grouping.split_groups``) and the key
    sources that formed them."""
    groups, used = split_groups(records, threshold)
    units: dict[int, list[Record]] = defaultdict(list)
    for r in records:
        units[groups[r.path]].append(r)
    return [sorted(u, key=lambda r: r.path) for _, u in sorted(units.items())], used


def _take(units: list[list[Record]], targets: dict[str, int], rng: np.random.Generator):
    """Greedily move whole units into a partition until each class reaches its target count."""
    chosen, rest, counts = [], [], Counter()
    for k in rng.permutation(len(units)):
        u = units[k]
        need = Counter(r.label for r in u)
        if all(counts[lab] + n <= targets.get(lab, 0) for lab, n in need.items()):
            chosen.append(u)
            counts.update(need)
        else:
            rest.append(u)
    return chosen, rest


def _stratified_targets(units: list[list[Record]], total: int) -> dict[str, int]:
    counts = Counter(r.label for u in units for r in u)
    n = sum(counts.values())
    raw = {lab: total * c / n for lab, c in counts.items()}
    targets = {lab: int(round(v)) for lab, v in raw.items()}
    # Rounding each class on its own can miss the total (4.5 + 4.5 rounds half-to-even to 8, not
    # 9); move the shortfall/excess to the classes whose rounding was furthest off.
    while sum(targets.values()) < total:
        lab = max(sorted(raw), key=lambda k: raw[k] - targets[k])
        targets[lab] += 1
    while sum(targets.values()) > total:
        lab = min(sorted(raw), key=lambda k: raw[k] - targets[k])
        targets[lab] -= 1
    return targets


def _flat(units: list[list[Record]]) -> list[str]:
    return sorted(r.path for u in units for r in u)


def _train_val(units, val_fraction: float, rng) -> dict[str, list[str]]:
    n = sum(len(u) for u in units)
    val, train = _take(units, _stratified_targets(units, int(round(val_fraction * n))), rng)
    return {"train": _flat(train), "val": _flat(val)}


def make_split(
    scan: Scan,
    protocol: str = "paper",
    seed: int = 0,
    test_size: int = PAPER_TEST_SIZE,
    val_fraction: float = 0.1,
    folds: int = 5,
    near_threshold: int = NEAR_DUP_THRESHOLD,
    reference=None,
    definition: str = "osteoporosis",
) -> dict:
    """Build the split document (see module docstring). ``reference``: a
    :class:`~kneeosteo.data.reference.Reference` (needed by ``holdout-reference``); ``definition``:
    its binary truth (``osteoporosis`` or ``low_bone_mass``)."""
    if protocol == "holdout-reference":
        return _holdout_reference(scan, reference, definition, seed, val_fraction, near_threshold)
    if reference is not None:
        raise ConfigError(f"--reference holds a source out: use it with --protocol holdout-reference, not {protocol!r}")
    empty = [c for c in scan.classes if not any(r.label == c for r in scan.records)]
    if scan.target == "label" and (len(scan.classes) < 2 or empty):
        raise DataError(
            f"{scan.manifest or scan.root}: a split needs images in "
            f"{'both classes' if len(scan.classes) == 2 else 'every class'} {scan.classes}"
            + (f" (none in {', '.join(empty)})" if empty else "")
        )
    if not scan.records:
        raise DataError(f"{scan.manifest or scan.root}: no usable images to split")
    kept, excluded = deduplicate(scan.records)
    units, used = _units(kept, near_threshold)
    rng = np.random.default_rng(seed)
    doc = _split_header(scan, seed, protocol, near_threshold, used, len(units))
    if protocol == "paper":
        if test_size >= len(kept):
            raise DataError(f"{scan.root}: test size {test_size} >= {len(kept)} usable images")
        test, rest = _take(units, _stratified_targets(units, test_size), rng)
        doc.update(_train_val(rest, val_fraction, rng))
        doc["test"] = _flat(test)
    elif protocol == "kfold":
        unit_y = [Counter(r.label for r in u).most_common(1)[0][0] for u in units]
        cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        doc["folds"] = []
        for tr, te in cv.split(np.zeros(len(units)), unit_y, groups=np.arange(len(units))):
            fold = _train_val([units[i] for i in tr], val_fraction, rng)
            fold["test"] = _flat([units[i] for i in te])
            doc["folds"].append(fold)
    else:
        raise ConfigError(f"unknown protocol {protocol!r} (use {', '.join(PROTOCOLS)})")
    doc["excluded"] = sorted(excluded, key=lambda e: e["path"])
    doc["content_ids"] = {r.path: r.content_id for r in kept}
    doc["labels"] = {r.path: r.label for r in kept}  # the class of each file, whatever its folder
    values = {r.path: r.values for r in kept if r.values}
    if values:
        doc["values"] = values
    return doc


def _reference_units(records: list[Record], reference, threshold: int) -> tuple[list[list[Record]], list[str]]:
    """The split's units over every record, with films sharing a reference patient (source_id)
    joined too: a patient filed under two paths is one unit."""
    patient = {}
    for f in reference.files.values():
        ids = sorted({r.patient for r in f.rows if r.patient})
        if ids:
            patient[f.path] = ids
    by_id: dict[str, list[str]] = defaultdict(list)
    for path, ids in patient.items():
        for i in ids:
            by_id[i].append(path)
    units, used = _units(records, threshold)
    # merge units that share a reference patient (union-find over unit indices)
    parent = list(range(len(units)))

    def find(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    unit_of = {r.path: k for k, u in enumerate(units) for r in u}
    for paths in by_id.values():
        ks = [unit_of[p] for p in paths if p in unit_of]
        for k in ks[1:]:
            parent[find(k)] = find(ks[0])
    merged: dict[int, list[Record]] = defaultdict(list)
    for k, u in enumerate(units):
        merged[find(k)].extend(u)
    if by_id:
        used = used + ["reference patient (source_id)"]
    return [sorted(u, key=lambda r: r.path) for _, u in sorted(merged.items())], used


def _holdout_reference(
    scan: Scan, reference, definition: str, seed: int, val_fraction: float, near_threshold: int
) -> dict:
    """The held-out-source split (module docstring)."""
    from kneeosteo.data.reference import DEFINITIONS, check_definition

    if reference is None:
        raise ConfigError("--protocol holdout-reference needs --reference (a manifest of the held-out films' T-scores)")
    check_definition(definition)
    if scan.target != "label" or len(scan.classes) != 2:
        raise ConfigError("--protocol holdout-reference scores a binary classifier against the reference's truth")
    by_path = scan.by_path()
    held = [f for f in reference.files.values() if f.path in by_path]
    if not held:
        raise DataError(f"{reference.file}: none of its files is among the data's {len(scan.records)} images")
    units, used = _reference_units(scan.records, reference, near_threshold)
    ref_files = {f.path: f for f in held}
    negative, positive = scan.classes
    test, excluded, rest = [], [], []
    for u in units:
        refs = [r for r in u if r.path in ref_files]
        if not refs:
            rest.append(u)
            continue
        kept_ids: dict[str, str] = {}
        held_names = ", ".join(r.path for r in refs[:3]) + (" ..." if len(refs) > 3 else "")
        for r in u:
            f = ref_files.get(r.path)
            if f is None:
                excluded.append(
                    {
                        "path": r.path,
                        "reason": f"linked to the held-out film(s) {held_names} "
                        "(duplicate, near duplicate or patient): kept out of training",
                    }
                )
            elif not f.single_truth:
                excluded.append({"path": r.path, "reason": f"reference gives no single truth: {', '.join(f.bands)}"})
            elif r.content_id in kept_ids:
                excluded.append({"path": r.path, "reason": f"exact duplicate of held-out {kept_ids[r.content_id]}"})
            else:
                kept_ids[r.content_id] = r.path
                test.append(r)
    rest_records = [r for u in rest for r in u]
    kept, dup_excluded = deduplicate(rest_records)
    excluded += dup_excluded
    train_units, _ = _units(kept, near_threshold)
    rng = np.random.default_rng(seed)
    doc = _split_header(scan, seed, "holdout-reference", near_threshold, used, len(units))
    doc["reference"] = {
        "file": str(reference.file),
        "sha256": sha256_file(reference.file),
        "definition": definition,
        "meaning": DEFINITIONS[definition][0],
        "test_truth": "reference T-score / diagnosis",
        "multi_truth": [f.path for f in reference.multi_truth],
    }
    doc.update(_train_val(train_units, val_fraction, rng))
    doc["test"] = sorted(r.path for r in test)
    if not doc["test"] or not doc["train"]:
        raise DataError(
            f"{reference.file}: the held-out split leaves {len(doc['train'])} training and "
            f"{len(doc['test'])} test films"
        )
    doc["excluded"] = sorted(excluded, key=lambda e: e["path"])
    chosen = [r for u in train_units for r in u] + test
    doc["content_ids"] = {r.path: r.content_id for r in chosen}
    labels = {r.path: r.label for u in train_units for r in u}
    labels.update({r.path: positive if ref_files[r.path].positive(definition) else negative for r in test})
    doc["labels"] = labels
    doc["folder_labels"] = {r.path: r.label for r in test}  # the held-out films' own labels, for the record
    values = {r.path: r.values for r in chosen if r.values}
    t_scores = {r.path: {"t_score": ref_files[r.path].t_score} for r in test if ref_files[r.path].t_score is not None}
    for path, v in t_scores.items():
        values[path] = {**values.get(path, {}), **v}
    if values:
        doc["values"] = values
    return doc


def held_out_leaks(doc: dict, records: list[Record], threshold: int | None = None) -> list[dict]:
    """Training or validation films of a split document that are a held-out (test) film, a copy
    of one (same content id) or in one split unit with one (duplicate, near duplicate, patient:
    ``grouping.split_groups`` over ``records``): [{"path", "part", "test"}]. Empty for a sound
    holdout split."""
    threshold = doc.get("near_duplicate_threshold", NEAR_DUP_THRESHOLD) if threshold is None else threshold
    part_of = {p: part for part in PARTS for p in doc[part]}
    named = [r for r in records if r.path in part_of]
    groups, _ = split_groups(named, threshold)
    test_by_group: dict[int, str] = {}
    test_ids = {}
    for r in named:
        if part_of[r.path] == "test":
            test_by_group.setdefault(groups[r.path], r.path)
            test_ids.setdefault(r.content_id, r.path)
    out = []
    for r in named:
        if part_of[r.path] == "test":
            continue
        hit = test_ids.get(r.content_id) or test_by_group.get(groups[r.path])
        if hit:
            out.append({"path": r.path, "part": part_of[r.path], "test": hit})
    return out


def write_split(doc: dict, path: str | Path) -> None:
    write_json(path, doc)


@dataclass
class SplitSets:
    """One train/val/test assignment with labels resolved; ``missing`` lists named but absent files."""

    data: Path
    classes: list[str]
    positive: str
    train: list[str]
    val: list[str]
    test: list[str]
    seed: int = 0
    missing: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)  # path -> class; absent: the path's first folder
    values: dict[str, dict[str, float]] = field(default_factory=dict)  # path -> {"t_score": ...}
    target: str = "label"  # or a number column: items() then gives that number
    # held-out-source splits: the test films' folder labels (the truth training and calibration
    # used), beside ``labels`` (their reference truth, what they are scored against)
    folder_labels: dict[str, str] = field(default_factory=dict)

    def merged(self, merge: dict[str, str], positive: str | None = None) -> SplitSets:
        """The same split with classes merged (``{"osteopenia": "normal"}``); ``positive``: a binary
        task, classes ordered [negative, positive]."""
        paths = self.train + self.val + self.test
        labels = {p: merge.get(self.label(p), self.label(p)) for p in paths}
        found = sorted(set(labels.values()) | {merge.get(c, c) for c in self.classes})
        classes = binary_classes(found, positive, "the merged split") if positive else severity_order(found)
        return replace(self, labels=labels, classes=classes, positive=positive or self.positive)

    def label(self, path: str) -> str:
        return self.labels.get(path) or path.split("/", 1)[0]

    def items(self, part: str) -> list[tuple[str, float]]:
        """(path, target) of a partition: the class index (binary: 1 = positive) or, for a
        regression target, the file's value."""
        if self.target != "label":
            return [(p, float(self.values[p][self.target])) for p in getattr(self, part)]
        index = {c: k for k, c in enumerate(self.classes)}
        return [(p, index[self.label(p)]) for p in getattr(self, part)]


def load_split(
    path: str | Path, data: str | Path | None = None, fold: int | None = None, target: str | None = None
) -> SplitSets:
    """Read and check a split file; missing files are dropped with a warning naming them.
    ``target``: train on that number (``t_score``, ``bmd``) of the split's values instead of
    the split's own target."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read split file ({exc})") from exc
    if "folds" in doc:
        k = 0 if fold is None else fold
        if not 0 <= k < len(doc["folds"]):
            raise DataError(f"{path}: fold {k} out of range (file has {len(doc['folds'])})")
        parts = doc["folds"][k]
    else:
        parts = doc
    if any(not isinstance(parts.get(p), list) for p in PARTS):
        raise DataError(f"{path}: split file needs lists 'train', 'val' and 'test'")
    if data is None and not doc.get("data"):
        # Path("") is ".": without this, every file would be looked up in the working directory
        # and silently dropped as missing
        raise DataError(f"{path}: split file names no data folder (pass DATA)")
    root = Path(data) if data is not None else Path(doc["data"])
    if not root.is_dir():
        raise DataError(f"{path}: data folder {root} not found (pass DATA)")
    seen: dict[str, str] = {}
    for p in PARTS:
        for f in parts[p]:
            if f in seen:
                raise DataError(f"{path}: '{f}' is in both {seen[f]} and {p}")
            seen[f] = p
    classes = doc.get("classes") or sorted({f.split("/", 1)[0] for f in seen})
    if not classes:
        raise DataError(f"{path}: split file names no images")
    # A file without "positive_class" (written by another tool) uses the package's positive class
    # when it is there: "the alphabetically last folder" would silently invert the labels of,
    # e.g., osteoporosis/ vs. reference/.
    positive = doc.get("positive_class") or (POSITIVE_CLASS if POSITIVE_CLASS in classes else classes[-1])
    if "classes" not in doc:
        classes = [c for c in classes if c != positive] + [positive]  # [negative, positive]
    missing = sorted(f for f in seen if not (root / f).is_file())
    for f in missing:
        log.warning("%s: split names %s, which does not exist in %s; skipped", path, f, root)
    keep = {p: [f for f in parts[p] if f not in set(missing)] for p in PARTS}
    labels = doc.get("labels") or {}
    values = doc.get("values") or {}
    target = str(target or doc.get("target") or "label")
    sets = SplitSets(
        root,
        classes,
        positive,
        keep["train"],
        keep["val"],
        keep["test"],
        int(doc.get("seed", 0)),
        missing,
        labels,
        values,
        target,
        {str(k): str(v) for k, v in (doc.get("folder_labels") or {}).items()},
    )
    named = set(keep["train"] + keep["val"] + keep["test"])
    if target != "label":
        lacking = sorted(f for f in named if target not in values.get(f, {}))
        if lacking:
            raise DataError(f"{path}: no {target} value for {len(lacking)} file(s), such as {lacking[0]}")
    unknown = sorted({sets.label(f) for f in named} - set(classes)) if target == "label" else []
    if unknown:
        raise DataError(f"{path}: label(s) {', '.join(unknown)} not among the split's classes {classes}")
    return sets


def patient_leaks(sets: SplitSets, records: list[Record]) -> list[dict]:
    """Patients (by the keys of ``grouping.patient_keys``) whose films sit in more than one
    partition of ``sets``: [{"key", "partitions": {part: [paths]}}]. Empty for a sound split."""
    part_of = {p: name for name in PARTS for p in getattr(sets, name)}
    by_key: dict[tuple, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.path in part_of:
            for key in patient_keys(r):
                by_key[key][part_of[r.path]].append(r.path)
    out, seen = [], set()
    for k, parts in sorted(by_key.items()):
        films = frozenset(p for v in parts.values() for p in v)
        if len(parts) > 1 and films not in seen:  # a patient named by two keys (manifest + DICOM) counts once
            seen.add(films)
            out.append({"key": f"{k[0]}={k[1]}", "partitions": {p: sorted(v) for p, v in parts.items()}})
    return out


def _split_header(scan, seed: int, protocol: str, near_threshold: int, used, groups: int) -> dict:
    """What every split file records before its partitions: the data, the protocol, and what kept
    files together (duplicates always, patient ids where the data had them)."""
    doc = {
        "format": FORMAT,
        "data": str(scan.root),
        "seed": seed,
        "protocol": protocol,
        "classes": scan.classes,
        "positive_class": scan.positive,
        "near_duplicate_threshold": near_threshold,
        "group_key": used,
        "groups": groups,
        "target": scan.target,
    }
    if scan.merge:
        doc["merge"] = scan.merge
    if scan.manifest:
        doc["manifest"] = {"file": scan.manifest, "sha256": sha256_file(scan.manifest), "left_out": scan.left_out}
    return doc
