"""Start-up: the command line answers ``--help`` and a bad option without importing torch, ONNX
Runtime or scikit-learn (each command imports what it needs in its body), and predicting with the
default engine does not bring the training-only libraries in, nor torch (issue 29: ONNX Runtime
gets its input from :meth:`Preprocess.array`, the same values; checked here on the bundled model).
Checked in a fresh interpreter, since this test session has imported everything already."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import imagegen as g

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


def _run_cli(*args: str, heavy: tuple[str, ...] = HEAVY) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout, not an installed copy
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=heavy), *args],
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
    files read: none of the libraries only fitting and evaluation use (torch: the tests below)."""
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


# what `kneeosteo predict` with ONNX Runtime never needs: torch and what comes with it, the fitting and
# evaluation libraries, SciPy's statistics (the batch shift alarm, 20 images or more) and pydicom (DICOM only)
NOT_FOR_ONNX_PREDICT = (
    "torch",
    "torchvision",
    "timm",
    "sklearn",
    "crepes",
    "matplotlib",
    "statsmodels",
    "scipy.stats",
    "pydicom",
)


@pytest.fixture(scope="module")
def onnx_cache(bundled_run, tmp_path_factory) -> Path:
    """A KNEEOSTEO_CACHE holding the bundled model's ONNX export (made once here: exporting imports
    torch, running the export does not)."""
    from kneeosteo.inference.export import ensure_onnx

    cache = tmp_path_factory.mktemp("onnx-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KNEEOSTEO_CACHE", str(cache))
        ensure_onnx(bundled_run)
    return cache


def _knee_png(path: Path) -> Path:
    return g.png_grey8(path, array=np.rint(g.knee_film(width=600, height=900, joint=(300, 400), plateau=200) * 255))


def _kop_films(kop: Path, n: int) -> list[Path]:
    files = sorted(p for p in kop.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return files[:: max(1, len(files) // n)][:n]


@pytest.mark.parametrize("engine", ["auto", "onnxruntime"])
def test_predict_with_onnx_runtime_never_imports_torch(engine, onnx_cache, tmp_path, monkeypatch):
    """`kneeosteo predict FILM` with the default engine in a fresh process: what is in sys.modules
    when it exits (an eager `import torch` anywhere on the path shows here)."""
    monkeypatch.setenv("KNEEOSTEO_CACHE", str(onnx_cache))
    out = _run_cli("predict", str(_knee_png(tmp_path / "knee.png")), "--engine", engine, heavy=NOT_FOR_ONNX_PREDICT)
    assert out["code"] == 0
    assert out["loaded"] == [], f"`kneeosteo predict --engine {engine}` imported {out['loaded']}"


def test_predict_a_kop_film_never_imports_torch(onnx_cache, kop, monkeypatch):
    """The same on a real film, which passes the pixel checks and so runs the film checks too."""
    monkeypatch.setenv("KNEEOSTEO_CACHE", str(onnx_cache))
    film = _kop_films(kop, 1)[0]
    out = _run_cli("predict", str(film), heavy=NOT_FOR_ONNX_PREDICT)
    assert out["code"] == 0
    assert out["loaded"] == [], f"`kneeosteo predict {film.name}` imported {out['loaded']}"


def _both_forms(films: list[np.ndarray], onnx_cache: Path, monkeypatch):
    """The bundled model in ONNX Runtime on the torch-free inputs and on training's (torch) inputs."""
    import torch

    from kneeosteo.inference import Predictor

    monkeypatch.setenv("KNEEOSTEO_CACHE", str(onnx_cache))
    predictor = Predictor(engine="onnxruntime")
    prep = predictor.info.preprocess
    free = np.stack([prep.array(f) for f in films])
    reference = torch.stack([prep(f) for f in films]).numpy()
    assert np.array_equal(free, reference)  # the inputs, bit for bit
    return predictor, predictor.forward(free), predictor.forward(reference)


def _assert_same_outputs(got, want):
    for name, a, b in zip(("probability", "logit", "features"), got, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=name)


def test_onnx_probabilities_are_unchanged_on_generated_films(onnx_cache, monkeypatch):
    films = [
        g.knee_film(),
        g.knee_film(width=600, height=900, joint=(300, 400), plateau=200, texture=0.3, seed=2),
        g.two_knee_film(g.knee_film(), g.knee_film(seed=1), 30),
        g.picture(900, 500, variant=1).astype(np.float32) / 255,
    ]
    _, free, reference = _both_forms(films, onnx_cache, monkeypatch)
    _assert_same_outputs(free, reference)


def test_onnx_probabilities_are_unchanged_on_kop_films(onnx_cache, kop, monkeypatch):
    """On real films, and through `Predictor.predict` (read, preprocess, both passes, trust):
    its raw probabilities are the network's on training's inputs, within 1e-6."""
    from kneeosteo.data.reader import read_image

    files = _kop_films(kop, 4)
    predictor, free, reference = _both_forms([read_image(f).pixels for f in files], onnx_cache, monkeypatch)
    _assert_same_outputs(free, reference)
    rows = {r.path: r.raw_probability for r in predictor.predict(files, progress=False).predictions}
    np.testing.assert_allclose([rows[str(f)] for f in files], reference[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("which", ["bundled", "previous"])
def test_predict_finds_the_bone_mask_once_per_film(which, onnx_cache, previous_default, tmp_path, monkeypatch):
    """The bone preset's input and the film check (bone regions side by side) both ask for the
    mask; it is computed once, the second ask scales the kept one (the previous bundled model,
    bone preset). The knee-region model asks once per film, for the film check."""
    from collections import OrderedDict

    from kneeosteo.data import bone, preprocess
    from kneeosteo.inference import Predictor

    asked, computed = [], []
    real_mask, real_small = bone.bone_mask, bone._small_mask

    def mask(pixels):
        asked.append(pixels.shape)
        return real_mask(pixels)

    def small(pixels):
        computed.append(pixels.shape)
        return real_small(pixels)

    monkeypatch.setattr(bone, "_kept", OrderedDict())
    monkeypatch.setattr(bone, "bone_mask", mask)
    monkeypatch.setattr(preprocess, "bone_mask", mask)
    monkeypatch.setattr(bone, "_small_mask", small)
    monkeypatch.setenv("KNEEOSTEO_CACHE", str(onnx_cache))
    if which == "previous":
        from kneeosteo.inference.export import ensure_onnx
        from kneeosteo.run import RunDir

        ensure_onnx(RunDir.open(previous_default))  # into the same cache
    predictor = Predictor(previous_default if which == "previous" else None, engine="onnxruntime")
    preset = predictor.info.preprocess.preset
    assert preset == ("bone" if which == "previous" else "knee") and predictor.pixel_limits.film_checks
    asked.clear(), computed.clear()
    films = [_knee_png(tmp_path / "a.png"), g.png_grey8(tmp_path / "b.png", array=np.rint(g.knee_film() * 255))]
    result = predictor.predict(films, progress=False)
    assert len(result.predictions) == 2
    # twice per film for the bone preset (its input and the film check), once for the knee preset
    assert len(asked) == (4 if preset == "bone" else 2), asked
    assert len(computed) == 2, computed  # computed once per film
