"""Start-up: the command line answers ``--help`` and a bad option without importing torch, ONNX
Runtime or scikit-learn (each command imports what it needs in its body), and predicting with the
default engine does not bring the training-only libraries in. Checked in a fresh interpreter,
since this test session has imported everything already."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "onnxruntime", "sklearn", "scipy", "statsmodels", "matplotlib", "cv2", "crepes")

PROBE = """
import json, sys
from kneeosteo.interfaces.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = {heavy!r}
print(json.dumps({{"code": code, "loaded": sorted(m for m in heavy if m in sys.modules)}}))
"""


def _run_cli(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout, not an installed copy
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "args, code",
    [
        (("--help",), 0),
        (("predict", "--help"), 0),
        (("train", "--help"), 0),
        (("train", "data", "--precision", "fp16"), 2),  # a choice not offered
        (("predict", "x.png", "--batch-size", "0"), 2),  # out of range
        (("no-such-command",), 2),
    ],
)
def test_help_and_bad_options_import_no_heavy_library(args, code):
    out = _run_cli(*args)
    assert out["code"] == code
    assert out["loaded"] == [], f"`kneeosteo {' '.join(args)}` imported {out['loaded']}"


def test_importing_the_cli_imports_no_heavy_library():
    code = f"import sys, kneeosteo.interfaces.cli; print([m for m in {HEAVY!r} if m in sys.modules])"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_the_predict_path_imports_no_training_library():
    """What `predict` imports with the default engine (ONNX Runtime), the bundled model's trust
    files read: torch stays (the preprocessing is the training code's, bit for bit), but none of the
    libraries only fitting and evaluation use."""
    training_only = ("sklearn", "crepes", "pandas", "statsmodels", "matplotlib", "torchvision")
    code = (
        "import sys\n"
        "from kneeosteo.inference import ENGINES, Predictor\n"
        "from kneeosteo.inference.export import OnnxModel, ensure_onnx\n"
        "from kneeosteo.inference.output import format_table, write_predictions\n"
        "from kneeosteo.run import RunDir\n"
        "assert RunDir.bundled().trust is not None\n"
        f"print([m for m in {training_only!r} if m in sys.modules])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr[-2000:]
