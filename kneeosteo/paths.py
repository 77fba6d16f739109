"""Where things live: the data set, the cache. One place, so the CLI, Makefile and tests agree."""

from __future__ import annotations

import os
from pathlib import Path

KAGGLE_HELP = (
    "KOP data not found. Get the 'Osteoporosis Knee X-ray Dataset' from Kaggle "
    "(https://www.kaggle.com/datasets/stevepython/osteoporosis-knee-xray-dataset), unpack it so "
    "that it holds the class folders normal/ and osteoporosis/, and pass DATA=/path/to/it "
    "(or set KNEEOSTEO_DATA, or put it at ./data/kop)."
)


def data_candidates(explicit: str | None = None) -> list[Path]:
    """The search order documented in the README and docs/install.md: DATA=, $KNEEOSTEO_DATA, ./data/kop, ../shared/datasets/kop."""
    cands = [explicit, os.environ.get("KNEEOSTEO_DATA"), "data/kop", "../shared/datasets/kop"]
    return [Path(c) for c in cands if c]


def find_data_dir(explicit: str | None = None) -> Path | None:
    for cand in data_candidates(explicit):
        try:
            if cand.is_dir():
                return cand
        except OSError as exc:  # a name too long, a permission: that folder's one line, not a traceback
            from kneeosteo.errors import DataError

            raise DataError(f"{cand}: data folder cannot be used ({exc.strerror or exc})") from exc
        if explicit and cand == Path(explicit):
            return None  # an explicit choice that doesn't exist must not fall through silently
    return None


def cache_dir() -> Path:
    """Feature/scan caches: $KNEEOSTEO_CACHE, else $XDG_CACHE_HOME/kneeosteo, else ~/.cache/kneeosteo."""
    env = os.environ.get("KNEEOSTEO_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kneeosteo"
