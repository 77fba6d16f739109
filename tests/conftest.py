"""Shared fixtures: an isolated cache per test, and the KOP data set when it is present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
KOP_DIR = (REPO / ".." / "shared" / "datasets" / "kop").resolve()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own KNEEOSTEO_CACHE, so tests never share or pollute the user's cache."""
    monkeypatch.setenv("KNEEOSTEO_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def kop() -> Path:
    """The KOP data set at ../shared/datasets/kop (relative to the repo root), or skip.

    Session-scoped so that module-scoped fixtures (scan KOP once) can use it."""
    if not KOP_DIR.is_dir():
        pytest.skip(f"KOP data set not found at {KOP_DIR}; tests that need it skip on a fresh clone")
    return KOP_DIR


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: tiny batches gain nothing from more, and on a shared
    2-core machine OpenMP threads competing with other processes made each step several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
