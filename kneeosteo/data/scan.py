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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from kneeosteo.data.reader import MAX_SIDE, ImageMeta, ImageReadError, LoadedImage, NotAnImageError, is_candidate, read_image
from kneeosteo.paths import cache_dir
from kneeosteo.utils.atomic import write_json
from kneeosteo.utils.hashing import sha256_file
from kneeosteo.errors import DataError

log = logging.getLogger(__name__)

POSITIVE_CLASS = "osteoporosis"


@dataclass
class Record:
    """One readable image of the data set; ``path`` is relative to the data root, POSIX style."""

    path: str
    label: str
    target: int  # 1 = positive class
    content_id: str
    phash: str
    meta: ImageMeta

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

    def by_path(self) -> dict[str, Record]:
        return {r.path: r for r in self.records}


def class_folders(root: Path) -> list[str]:
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:  # the data folder itself cannot be listed
        raise DataError(f"{root}: {folder_error(exc)}") from exc


def resolve_classes(root: Path, positive: str = POSITIVE_CLASS) -> list[str]:
    """Return ``[negative, positive]``; a binary task needs exactly two class folders."""
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    folders = class_folders(root)
    if positive not in folders:
        raise DataError(f"{root}: no class folder named '{positive}' (found: {', '.join(folders) or 'none'})")
    others = [f for f in folders if f != positive]
    if len(others) != 1:
        raise DataError(
            f"{root}: expected exactly two class folders (one negative, '{positive}'), found {folders}"
        )
    return [others[0], positive]


def walk_files(folder: str | os.PathLike, errors: list[OSError] | None = None) -> list[Path]:
    """Every file below ``folder``, sorted per folder; hidden files and folders (.DS_Store & co)
    are skipped and symlinked folders are not followed, so link loops cannot hang us. The one
    folder walk: the data scan and the command line's inputs both use it.

    A folder that cannot be listed (permission denied, vanished) is never skipped silently: its
    OSError (``.filename`` names it) is appended to ``errors`` for the caller to report."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False,
                                                onerror=None if errors is None else errors.append):
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
                m = info["meta"]  # a memo from before reduced decoding (no "reduction") of a big image is stale
                if "reduction" in m or max(m["width"], m["height"]) <= MAX_SIDE:
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
) -> Scan:
    """Read every file under the class folders of ``root``; bad files are recorded, never fatal.

    ``on_image(info, image)`` is called (in a worker thread) for every image the scan decodes, so
    a caller that needs the pixels too (training without a split file) can use them then instead
    of decoding the file a second time."""
    root = Path(root)
    if require_binary:
        classes = resolve_classes(root, positive)
    else:
        if not root.is_dir():
            raise DataError(f"{root}: data folder not found")
        classes = class_folders(root)
        if not classes:
            raise DataError(f"{root}: no class folders inside")
    walk_errors: list[OSError] = []
    jobs = [(label, f) for label in classes for f in walk_files(root / label, walk_errors)]
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # Pillow and zlib release the GIL while decoding
        results = list(pool.map(lambda job: _describe(job[1], use_cache, on_image), jobs))
    scan = Scan(root=root, classes=classes, positive=positive)
    for exc in walk_errors:  # folders that could not be listed: their files are missing, say so
        folder = Path(exc.filename) if exc.filename else root
        rel = folder.relative_to(root).as_posix() if folder.is_relative_to(root) else str(folder)
        scan.unreadable.append({"path": rel, "reason": folder_error(exc)})
        log.warning("unreadable folder %s: %s", folder, folder_error(exc))
    for (label, f), (status, info) in zip(jobs, results):
        rel = f.relative_to(root).as_posix()
        if status == "ok":
            meta = ImageMeta(**{**info["meta"], "path": str(f)})
            scan.records.append(
                Record(rel, label, int(label == positive), info["content_id"], info["phash"], meta)
            )
        else:
            getattr(scan, status).append({"path": rel, "reason": info["reason"]})
            log.warning("%s %s: %s", "skipping" if status == "skipped" else "unreadable", f, info["reason"])
    for label in classes:
        if not any(r.label == label for r in scan.records):
            log.warning("class folder '%s' holds no readable image", label)
    return scan
