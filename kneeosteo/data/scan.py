"""Walk a class-folder data set once and describe every file: label, metadata, content ids.

Audit, split and training all start from this scan, so decoding each radiograph (the slow part)
is done once per file content: results are memoised on disk keyed by the sha256 of the file's
bytes, and a changed file is simply a new key.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kneeosteo.data.reader import (
    MAX_SIDE,
    ImageMeta,
    ImageReadError,
    LoadedImage,
    NotAnImageError,
    is_candidate,
    read_image,
)
from kneeosteo.errors import DataError
from kneeosteo.paths import cache_dir
from kneeosteo.utils.atomic import write_json
from kneeosteo.utils.hashing import sha256_file

log = logging.getLogger(__name__)

POSITIVE_CLASS = "osteoporosis"


@dataclass
class Record:
    """One readable image of the data set; ``path`` is relative to the data root, POSIX style."""

    path: str
    label: str
    target: int  # the label's index in Scan.classes; binary: 1 = positive class
    content_id: str
    phash: str
    meta: ImageMeta
    patient_id: str = ""  # from a label manifest (DICOM's own PatientID is in meta)
    values: dict[str, float] = field(default_factory=dict)  # t_score, bmd from a label manifest
    info: dict[str, str] = field(default_factory=dict)  # the manifest's other columns (side, study_date...)

    def to_json(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "meta"}, "meta": asdict(self.meta)}


@dataclass
class Scan:
    root: Path
    classes: list[str]
    positive: str
    records: list[Record] = field(default_factory=list)
    unreadable: list[dict] = field(default_factory=list)  # {"path", "reason"}
    skipped: list[dict] = field(default_factory=list)  # not images at all
    manifest: str | None = None  # the label manifest read, if any
    left_out: list[dict] = field(default_factory=list)  # manifest rows not used: {"row", "path", "reason"}
    merge: dict[str, str] = field(default_factory=dict)  # class -> the class it was merged into
    target: str = "label"  # label (classification) or a manifest number column (regression)

    def by_path(self) -> dict[str, Record]:
        return {r.path: r for r in self.records}


def class_folders(root: Path) -> list[str]:
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:  # the data folder itself cannot be listed
        raise DataError(f"{root}: {folder_error(exc)}") from exc


def resolve_classes(root: Path, positive: str = POSITIVE_CLASS, merge: dict[str, str] | None = None) -> list[str]:
    """Return ``[negative, positive]`` from the class folders (after ``merge``); a binary task
    needs exactly two."""
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    merge = merge or {}
    found = sorted({merge.get(f, f) for f in class_folders(root)})
    return binary_classes(found, positive, root, "class folder")


def binary_classes(found: list[str], positive: str, where, noun: str = "class") -> list[str]:
    """``[negative, positive]`` out of the class names ``found``, or DataError saying what to do."""
    if positive not in found:
        raise DataError(f"{where}: no {noun} named '{positive}' (found: {', '.join(found) or 'none'})")
    if len(found) != 2:
        hint = (
            "; for more classes use --task multiclass, or merge some, such as --merge osteopenia=normal"
            if len(found) > 2
            else ""
        )
        raise DataError(f"{where}: expected exactly two {noun}s (one negative, '{positive}'), found {found}{hint}")
    return [next(c for c in found if c != positive), positive]


def walk_files(folder: str | os.PathLike, errors: list[OSError] | None = None) -> list[Path]:
    """Every file below ``folder``, sorted per folder; hidden files and folders (.DS_Store & co)
    are skipped and symlinked folders are not followed, so link loops cannot hang us. The one
    folder walk: the data scan and the command line's inputs both use it.

    A folder that cannot be listed (permission denied, vanished) is never skipped silently: its
    OSError (``.filename`` names it) is appended to ``errors`` for the caller to report."""
    out = []
    for dirpath, dirnames, filenames in os.walk(
        folder, followlinks=False, onerror=None if errors is None else errors.append
    ):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return out


def folder_error(exc: OSError) -> str:
    """The reason for a folder the walk could not list, as the scan and predict report it."""
    return f"cannot list folder ({exc.strerror or exc})"


def describe_file(path: Path, use_cache: bool = True) -> dict:
    """content id, pHash and metadata of one image, memoised by the sha256 of the file's bytes.

    Raises ImageReadError / NotAnImageError / OSError like ``read_image``.
    """
    return describe_and_read(path, use_cache)[0]


def file_meta(path: Path) -> ImageMeta:
    """The file's metadata (format, colour mode, size...) from ``describe_file``'s memo."""
    return ImageMeta(**describe_file(path)["meta"])


def describe_and_read(path: Path, use_cache: bool = True) -> tuple[dict, LoadedImage | None]:
    """``describe_file``'s answer, plus the decoded image when it had to decode (no memo yet), so
    a caller that needs the pixels too does not decode the file a second time.

    Only regular files are ever opened: a FIFO, socket or device would block or never end, so
    it is reported (ImageReadError, "not a regular file") before anything reads it."""
    if not stat.S_ISREG(os.stat(path).st_mode):  # follows symlinks, like open(); OSError if broken
        raise ImageReadError(path, "not a regular file")
    if not is_candidate(path):
        raise NotAnImageError(path, "not an image file (unknown suffix)")
    memo = None
    if use_cache:
        try:
            memo = cache_dir() / "scan" / f"{sha256_file(path)}.json"
            if memo.is_file():
                info = json.loads(memo.read_text())
                m = info["meta"]  # a memo from before reduced decoding (no "reduction") of a big image is stale,
                # and so is a DICOM memo from before patient ids were read
                if ("reduction" in m or max(m["width"], m["height"]) <= MAX_SIDE) and (
                    m.get("format") != "DICOM" or "patient_id" in m
                ):
                    return info, None
        except (OSError, ValueError, KeyError, TypeError):
            memo = None
    img = read_image(path)
    info = {"content_id": img.content_id, "phash": str(img.phash()), "meta": asdict(img.meta)}
    if memo is not None:
        try:
            write_json(memo, info)
        except OSError:
            pass
    return info, img


def _describe(path: Path, use_cache: bool, on_image=None) -> tuple[str, dict]:
    """-> ("ok", info) or ("unreadable"/"skipped", {"reason"}); never raises for a bad file.
    ``on_image(info, image)`` sees each image this call had to decode, while it is in memory."""
    try:
        info, img = describe_and_read(path, use_cache)
        if img is not None and on_image is not None:
            on_image(info, img)
        return "ok", info
    except NotAnImageError as exc:
        return "skipped", {"reason": exc.reason}
    except ImageReadError as exc:
        return "unreadable", {"reason": exc.reason}
    except OSError as exc:  # permission denied, broken symlink...
        return "unreadable", {"reason": f"cannot open: {exc.strerror or exc}"}


def scan_dataset(
    root: str | os.PathLike,
    positive: str = POSITIVE_CLASS,
    require_binary: bool = True,
    use_cache: bool = True,
    workers: int | None = None,
    on_image: Callable[[dict, LoadedImage], None] | None = None,
    labels: str | os.PathLike | None = None,
    merge=None,
    target: str = "label",
    classes: list[str] | None = None,
) -> Scan:
    """Read every file of the data set; bad files are recorded, never fatal.

    The files and their labels come from the class folders of ``root``, or, given ``labels``, from
    that label manifest (``data/manifest.py``). ``merge`` ({"osteopenia": "normal"} or
    ``["osteopenia=normal"]``) renames classes before anything else sees them. ``target`` is
    ``"label"`` (classification) or a manifest number column (``t_score``, ``bmd``: regression;
    rows without it are left out). ``classes`` fixes the class names and their order; a label
    outside it is left out as unknown. ``require_binary``: exactly two classes, one of them
    ``positive``, ordered ``[negative, positive]``; otherwise the known WHO names come in
    severity order (normal, osteopenia, osteoporosis), others alphabetically after them.

    ``on_image(info, image)`` is called (in a worker thread) for every image the scan decodes, so
    a caller that needs the pixels too (training without a split file) can use them then instead
    of decoding the file a second time."""
    from kneeosteo.data.manifest import TARGETS, parse_merge, read_manifest

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    if target not in TARGETS:
        raise DataError(f"unknown target {target!r} (choose one of {', '.join(TARGETS)})")
    if target != "label" and labels is None:
        raise DataError(f"target {target!r} needs a label manifest with that column (--labels labels.csv)")
    merge = parse_merge(merge)
    walk_errors: list[OSError] = []
    manifest = None
    if labels is not None:
        manifest = read_manifest(labels, root)
        if target != "label" and target not in manifest.columns:
            raise DataError(f"{manifest.file}: no {target!r} column for --target {target}")
        jobs = [(row, root / row.path) for row in manifest.rows]
    else:
        folders = class_folders(root)
        if not folders:
            raise DataError(f"{root}: no class folders inside")
        if require_binary and not classes:  # a wrong layout fails before any image is decoded
            resolve_classes(root, positive, merge)
        jobs = [(folder, f) for folder in folders for f in walk_files(root / folder, walk_errors)]
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # Pillow and zlib release the GIL while decoding
        results = list(pool.map(lambda job: _describe(job[1], use_cache, on_image), jobs))
    scan = Scan(
        root=root,
        classes=[],
        positive=positive,
        merge=merge,
        target=target,
        manifest=None if manifest is None else str(manifest.file),
    )
    if manifest is not None:
        scan.left_out = list(manifest.left_out)
    for exc in walk_errors:  # folders that could not be listed: their files are missing, say so
        folder = Path(exc.filename) if exc.filename else root
        rel = folder.relative_to(root).as_posix() if folder.is_relative_to(root) else str(folder)
        scan.unreadable.append({"path": rel, "reason": folder_error(exc)})
        log.warning("unreadable folder %s: %s", folder, folder_error(exc))
    for (source, f), (status, info) in zip(jobs, results):
        rel = f.relative_to(root).as_posix()
        if status != "ok":
            getattr(scan, status).append({"path": rel, "reason": info["reason"]})
            log.warning("%s %s: %s", "skipping" if status == "skipped" else "unreadable", f, info["reason"])
            continue
        meta = ImageMeta(**{**info["meta"], "path": str(f)})
        if isinstance(source, str):  # a class folder
            scan.records.append(Record(rel, merge.get(source, source), 0, info["content_id"], info["phash"], meta))
            continue
        reason = _row_problem(source, target, classes, merge)
        if reason:
            scan.left_out.append({"row": source.row, "path": rel, "reason": reason})
            continue
        scan.records.append(
            Record(
                rel,
                _row_label(source, target, merge),
                0,
                info["content_id"],
                info["phash"],
                meta,
                source.patient_id,
                dict(source.values),
                dict(source.info),
            )
        )
    scan.left_out.sort(key=lambda item: item["row"])
    for item in scan.left_out:
        log.warning("%s row %s (%s): %s; left out", scan.manifest, item["row"], item["path"], item["reason"])
    scan.classes = _classes(scan, require_binary, classes, [] if manifest is not None else folders)
    index = {c: k for k, c in enumerate(scan.classes)}
    scan.records = [r for r in scan.records if r.label in index]  # a folder outside --classes
    for r in scan.records:
        r.target = index[r.label]
    for label in scan.classes:
        if not any(r.label == label for r in scan.records):
            log.warning("%s '%s' holds no readable image", "class" if manifest is not None else "class folder", label)
    return scan


def _row_problem(row, target: str, classes: list[str] | None, merge: dict[str, str]) -> str:
    """Why a manifest row cannot be used for ``target`` ("" when it can)."""
    if target == "label":
        if not row.label:
            return "no label"
        label = merge.get(row.label, row.label)
        if classes and label not in classes:
            return f"unknown label {row.label!r} (classes: {', '.join(classes)})"
        return ""
    return "" if target in row.values else f"no {target} value"


def _row_label(row, target: str, merge: dict[str, str]) -> str:
    """The row's class; a regression row without a label is stratified by its WHO band (t_score)
    or falls in one stratum, "all"."""
    if row.label:
        return merge.get(row.label, row.label)
    if "t_score" in row.values:
        from kneeosteo.data.who import who_band

        return who_band(row.values["t_score"])
    return "all"


def _classes(scan: Scan, require_binary: bool, classes: list[str] | None, folders: list[str]) -> list[str]:
    """The class names in index order (see ``scan_dataset``)."""
    from kneeosteo.data.who import severity_order

    found = sorted({r.label for r in scan.records} | {scan.merge.get(f, f) for f in folders})
    if classes:
        return binary_classes(sorted(classes), scan.positive, "classes") if require_binary else list(classes)
    if not require_binary:
        return severity_order(found)
    return binary_classes(found, scan.positive, scan.manifest or scan.root)
