"""Turn the files, folders and manifests named on a command line into the list of images to read.

A manifest is a ``.csv`` file listing one image (or folder) per row: the ``path`` column when the
header has one, else the first column; relative paths are taken from the manifest's folder. Its
entries are handled like files named on the command line (a missing one is an error naming it)."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from kneeosteo.data.reader import is_candidate
from kneeosteo.data.scan import folder_error, walk_files
from kneeosteo.errors import ImageReadError

__all__ = ["MANIFEST_SUFFIX", "collect_inputs", "read_manifest"]

MANIFEST_SUFFIX = ".csv"
log = logging.getLogger(__name__)


def read_manifest(path: Path) -> tuple[list[Path], list[ImageReadError]]:
    """The entries of a manifest CSV, or an error naming it when it cannot be read."""
    try:
        # utf-8-sig: Excel's byte-order mark before the header is not part of its first cell
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
            reader = csv.reader(fh)
            rows = [(reader.line_num, r) for r in reader if r and any(c.strip() for c in r)]
    except (OSError, csv.Error) as exc:
        return [], [ImageReadError(path, f"manifest cannot be read ({getattr(exc, 'strerror', None) or exc})")]
    if not rows:
        return [], [ImageReadError(path, "manifest lists no files")]
    header = [c.strip().lower() for c in rows[0][1]]
    col = header.index("path") if "path" in header else 0
    body = rows[1:] if "path" in header else rows
    base = path.parent
    out = []
    first: dict[str, int] = {}
    for number, r in body:
        if col < len(r) and r[col].strip():
            entry = Path(r[col].strip())
            entry = entry if entry.is_absolute() else base / entry
            key = os.path.normpath(entry)
            if key in first:  # a.png and ./a.png: one file, read once, and said so
                log.warning("%s: row %d (%s) repeats row %d; read once", path, number, r[col].strip(), first[key])
                continue
            first[key] = number
            out.append(entry)
    return out, []


def collect_inputs(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[ImageReadError]]:
    """(files to read, errors). Folders are searched recursively and non-images in them are
    skipped silently (a sub-folder that cannot be listed is an error naming it); a file named explicitly is always tried, so the reader reports why it is
    not an image. A file reached twice is read once."""
    files: list[Path] = []
    errors: list[ImageReadError] = []
    seen: set[Path] = set()
    for item in _expand_manifests(inputs, errors):
        p = Path(item)
        try:
            if p.is_dir():
                walk_errors: list[OSError] = []
                found = [f for f in walk_files(p, walk_errors) if is_candidate(f)]
                errors.extend(ImageReadError(e.filename or p, folder_error(e)) for e in walk_errors)
            elif p.exists():
                found = [p]
            else:
                errors.append(ImageReadError(p, "no such file or directory"))
                continue
        except OSError as exc:  # a name too long, a permission: this input's line, the rest go on
            errors.append(ImageReadError(p, f"cannot be opened ({exc.strerror or exc})"))
            continue
        for f in found:
            try:
                key = f.resolve()
            except (OSError, RuntimeError):  # a symlink loop: let the reader report it by name
                key = f.absolute()
            if key not in seen:
                seen.add(key)
                files.append(f)
    return files, errors


def _expand_manifests(inputs, errors: list[ImageReadError]):
    """The inputs with each manifest named on the command line replaced by its entries (a
    manifest's own ``.csv`` entries are not opened as manifests again)."""
    for item in inputs:
        p = Path(item)
        try:
            is_manifest = p.suffix.lower() == MANIFEST_SUFFIX and p.is_file()
        except OSError:  # collect_inputs names it
            is_manifest = False
        if is_manifest:
            entries, errs = read_manifest(p)
            errors.extend(errs)
            yield from entries
        else:
            yield item
