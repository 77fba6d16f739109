"""Turn the files and folders named on a command line into the list of images to read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from kneeosteo.data.reader import ImageReadError, is_candidate

__all__ = ["collect_inputs"]


def _walk(folder: Path) -> list[Path]:
    """Image candidates below ``folder``, sorted; symlinked folders and dot-files are skipped, as
    in the data scan (link loops cannot hang us, .DS_Store & co are noise)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(p for f in sorted(filenames) if not f.startswith(".")
                   and is_candidate(p := Path(dirpath) / f))
    return out


def collect_inputs(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[ImageReadError]]:
    """(files to read, errors). Folders are searched recursively and non-images in them are
    skipped silently; a file named explicitly is always tried, so the reader reports why it is
    not an image. A file reached twice is read once."""
    files: list[Path] = []
    errors: list[ImageReadError] = []
    seen: set[Path] = set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = _walk(p)
        elif p.exists():
            found = [p]
        else:
            errors.append(ImageReadError(p, "no such file or directory"))
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
