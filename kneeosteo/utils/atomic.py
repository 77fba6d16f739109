"""Atomic file writes: a crash never leaves a half-written file that looks valid.

Everything the tool writes goes to a temporary file in the destination folder, is flushed
and fsynced, then renamed over the target (rename is atomic on POSIX within one filesystem).
A write that fails (disk full, read-only folder) leaves the previous version untouched and no
temporary file behind, and says so in one line (:class:`OutputError`); the temporaries a
``kill -9`` leaves are removed by the next run (``remove_temporaries``). ``ensure_writable``
checks an output folder *before* hours of work, not after.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kneeosteo.errors import OutputError

MIN_FREE_BYTES = 64 * 2**20
# errors that mean "this folder cannot take our files", as opposed to a bug in the caller
_OUTPUT_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.EISDIR,
    errno.EFBIG,
}


def _reason(exc: OSError) -> str:
    # ENOTDIR: a file in the middle of the path; EEXIST: mkdir(exist_ok=True) found a file where
    # the folder should be (it said "File exists"): in both, a part of the path is a file
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return "a part of the path is a file, not a folder"
    return exc.strerror or str(exc)


def ensure_writable(folder: str | os.PathLike, min_free: int = MIN_FREE_BYTES) -> Path:
    """Create ``folder``, write + fsync + remove a probe file in it, and check its free space."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".kneeosteo-probe-", dir=folder)
        try:
            os.write(fd, b"kneeosteo write probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write output here ({_reason(exc)})") from exc
    if free < min_free:
        raise OutputError(
            f"{folder}: only {free / 2**20:.0f} MiB free on its disk, at least "
            f"{min_free / 2**20:.0f} MiB needed; free some space or choose another folder"
        )
    return folder


def current_umask() -> int:
    """The process's umask, without changing it: Linux shows it in /proc/self/status ("Umask:").
    Elsewhere the only way is to set it and set it back, which races with threads creating files
    meanwhile; that is done once, on first use, and remembered."""
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _umask_by_setting()


@functools.lru_cache(maxsize=1)
def _umask_by_setting() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """What ``open(path, "w")`` would give a new file: 0666 less the umask (0644 under 022)."""
    return 0o666 & ~current_umask()


def new_folder_mode() -> int:
    """What ``mkdir`` would give a new folder: 0777 less the umask (0755 under 022); ``mkdtemp``
    makes it 0700, which would hide an output from the rest of the user's group."""
    return 0o777 & ~current_umask()


def remove_temporaries(folder: str | os.PathLike) -> int:
    """Delete what a killed writer left in ``folder``: its temporaries, never a finished file."""
    stale = [p for pattern in (".*.tmp", ".kneeosteo-probe-*") for p in Path(folder).glob(pattern)]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only on success."""
    target = Path(target)
    tmp_path = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        os.chmod(tmp_path, new_file_mode())  # mkstemp made it 0600: give it the user's usual mode
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    except OutputError:
        raise
    except OSError as exc:
        if exc.errno not in _OUTPUT_ERRNOS:
            raise
        raise OutputError(
            f"{target}: could not be written ({_reason(exc)}); its previous version, if any, is unchanged"
        ) from exc
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | os.PathLike, text: str) -> None:
    # surrogateescape: a file name that is not valid UTF-8 (os.fsdecode gives lone surrogates)
    # is written back as its original bytes, so the path in a CSV still opens that file
    write_bytes(target, text.encode("utf-8", "surrogateescape"))


def write_json(target: str | os.PathLike, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
