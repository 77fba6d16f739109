"""Turn the files and folders named on a command line into the list of images to read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from kneeosteo.data.reader import is_candidate
from kneeosteo.data.scan import folder_error, walk_files
from kneeosteo.errors import ImageReadError

__all__ = ["collect_inputs"]


def collect_inputs(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[ImageReadError]]:
    """(files to read, errors). Folders are searched recursively and non-images in them are
    skipped silently (a sub-folder that cannot be listed is an error naming it); a file named explicitly is always tried, so the reader reports why it is
    not an image. A file reached twice is read once."""
    files: list[Path] = []
    errors: list[ImageReadError] = []
    seen: set[Path] = set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            walk_errors: list[OSError] = []
            found = [f for f in walk_files(p, walk_errors) if is_candidate(f)]
            errors.extend(ImageReadError(e.filename or p, folder_error(e)) for e in walk_errors)
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
