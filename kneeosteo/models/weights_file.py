"""Reading a kneeosteo weights file's identity without torch (issue 29: ``predict`` with ONNX
Runtime reads the run's identity, never its tensors). :mod:`kneeosteo.models.checkpoint` writes
these files and loads their tensors; the format's constants and the checked read live here."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kneeosteo.errors import CheckpointError

__all__ = ["META_KEY", "PARTIAL", "WEIGHTS_FORMAT_VERSION", "read_identity", "read_weights_file"]

WEIGHTS_FORMAT_VERSION = 2
META_KEY = "kneeosteo"
PARTIAL = "without-frozen-backbone"


def read_weights_file(path: Path, sha256: str | None) -> tuple[bytes, dict[str, str]]:
    """The file's bytes and its safetensors metadata, after checking that its sha256 is ``sha256``
    (when given) and that it is a kneeosteo weights file of this format."""
    from safetensors import safe_open

    if path.exists() and not path.is_file():  # a FIFO or device would block the read forever
        raise CheckpointError(f"{path}: not a regular file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: unreadable ({exc.strerror or exc})") from exc
    got = hashlib.sha256(data).hexdigest()
    if sha256 is not None and got != sha256:
        raise CheckpointError(
            f"{path}: sha256 {got[:12]}... differs from the recorded {sha256[:12]}...; "
            "the file is truncated, altered, or from another run"
        )
    try:
        with safe_open(str(path), "numpy") as fh:  # the header only: no framework is loaded
            meta = fh.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    if meta.get("format_version") != str(WEIGHTS_FORMAT_VERSION) or META_KEY not in meta:
        raise CheckpointError(
            f"{path}: not a kneeosteo weights file of format {WEIGHTS_FORMAT_VERSION} "
            "(written by another tool or an older kneeosteo: retrain the model)"
        )
    return data, meta


def read_identity(path: str | os.PathLike, sha256: str | None = None) -> dict[str, Any]:
    """The identity stored in the weights file (``{"model": ..., **identity}``), after checking
    that the file's sha256 is ``sha256`` (when given)."""
    _, meta = read_weights_file(Path(path), sha256)
    return json.loads(meta[META_KEY])
