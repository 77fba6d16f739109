"""The suite's own rules: a missing dependency skips locally and fails under CI=true."""

from __future__ import annotations

import pytest

import conftest


@pytest.mark.parametrize("ci, outcome", [(False, pytest.skip.Exception), (True, pytest.fail.Exception)])
def test_require_skips_locally_and_fails_under_ci(monkeypatch, ci, outcome):
    monkeypatch.setattr(conftest, "CI", ci)
    conftest.require(True, "present: nothing happens")
    with pytest.raises(outcome, match="chromium"):
        conftest.require(False, "/usr/bin/chromium not found")


def test_ci_is_read_from_the_environment():
    import os

    assert conftest.CI == (os.environ.get("CI", "").strip().lower() == "true")
