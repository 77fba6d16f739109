"""``--pdf``: the report printed by headless Chromium (the Debian package the browser test uses)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from kneeosteo.errors import KneeosteoError
from kneeosteo.utils.atomic import atomic_path

__all__ = ["ChromiumMissingError", "find_chromium", "page_count", "print_pdf", "require_chromium"]

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class ChromiumMissingError(KneeosteoError):
    """--pdf was asked for but no Chromium is installed."""


def find_chromium() -> str | None:
    """``$KNEEOSTEO_CHROMIUM`` if set, else the first Chromium on PATH."""
    env = os.environ.get("KNEEOSTEO_CHROMIUM")
    if env:
        return env if Path(env).is_file() and os.access(env, os.X_OK) else None
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


def require_chromium() -> str:
    """The Chromium to print with, or ChromiumMissingError naming the remedies."""
    exe = find_chromium()
    if exe is None:
        raise ChromiumMissingError(
            "--pdf needs Chromium and none was found: install it (Debian: "
            "apt-get install chromium) or set KNEEOSTEO_CHROMIUM=/path/to/chromium"
        )
    return exe


def print_pdf(html: Path, pdf: Path, timeout: float = 180.0) -> Path:
    """Print ``html`` to ``pdf`` (A4, the page's print styles) with headless Chromium."""
    exe = require_chromium()
    with tempfile.TemporaryDirectory(prefix="kneeosteo-chromium-") as profile, atomic_path(Path(pdf)) as tmp:
        cmd = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--no-pdf-header-footer",
            f"--print-to-pdf={tmp}",
            Path(html).resolve().as_uri(),
        ]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise KneeosteoError(f"{exe}: printing {html} took over {timeout:.0f} s") from None
        if done.returncode != 0 or not Path(tmp).is_file() or Path(tmp).read_bytes()[:5] != b"%PDF-":
            tail = (done.stderr or "").strip().splitlines()[-1:] or ["no output"]
            raise KneeosteoError(f"{exe} could not print {html} to PDF (exit {done.returncode}): {tail[0]}")
    return Path(pdf)


def page_count(pdf: Path) -> int:
    """Pages in a PDF written by Chromium (its page objects say ``/Type /Page``)."""
    return len(re.findall(rb"/Type\s*/Page(?![s\w])", Path(pdf).read_bytes()))
