"""Integrity of what a run loads (issue 14, items 1, 2, 9 and the FIFO weights file): a planted
ONNX export, an edited or out-of-range config.json, non-finite weights or probabilities, a FIFO
where the weights should be, and spreadsheet formulas in CSV cells. Each test reproduces a hole a
hostile test found; each failed before its fix."""

from __future__ import annotations

import csv
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import imagegen as g
from kneeosteo.errors import CheckpointError, InferenceError
from kneeosteo.inference import Predictor
from kneeosteo.inference.export import cached_onnx_path, ensure_onnx, export_onnx
from kneeosteo.inference.output import write_predictions
from kneeosteo.inference.predictor import Prediction, PredictionResult
from kneeosteo.run import RunDir
from kneeosteo.utils.csvfile import csv_text
from kneeosteo.utils.hashing import sha256_file


@pytest.fixture
def copy_of_bundled(tmp_path) -> Path:
    run = tmp_path / "bundled_copy"
    shutil.copytree(RunDir.bundled().path, run)
    return run


@pytest.fixture(scope="module")
def knee(tmp_path_factory) -> Path:
    """A generated film with a knee the localiser finds, so that a knee-region model scores it too
    (a film with no knee is answered out_of_domain without running the model)."""
    film = np.rint(g.knee_film(texture=0.12, seed=20) * 255).astype(np.uint8)
    return g.png_grey8(tmp_path_factory.mktemp("img") / "knee.png", array=film)


@pytest.fixture(scope="module")
def bundled_export(tmp_path_factory) -> Path:
    """The export of a copy of the bundled model named as ``copy_of_bundled`` names its copies
    (same folder name and files, so the same model id and metadata): made once per module, the
    tests below derive their doctored files from it instead of exporting again."""
    root = tmp_path_factory.mktemp("bundled-export")
    run = root / "bundled_copy"
    shutil.copytree(RunDir.bundled().path, run)
    return export_onnx(run, root / "model.onnx", verify=False)


def _shifted_onnx(export: Path, out: Path, shift: float = 20.0) -> Path:
    """The run's own export (``export``, from ``bundled_export``) with the head's last bias moved
    by ``shift``, written to ``out``: same metadata, other weights."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(export))
    bias = [t for t in proto.graph.initializer if t.name.endswith("head.out.bias")]
    assert bias, [t.name for t in proto.graph.initializer][-5:]
    arr = numpy_helper.to_array(bias[0]) + np.float32(shift)
    bias[0].CopyFrom(numpy_helper.from_array(arr.astype(np.float32), bias[0].name))
    onnx.save(proto, str(out))
    return out


def test_a_planted_model_onnx_in_the_run_folder_is_never_used(copy_of_bundled, bundled_export, knee):
    """Item 1: RUN/model.onnx with a shifted bias answered 1.0 under the same model id."""
    _shifted_onnx(bundled_export, copy_of_bundled / "model.onnx")
    want = Predictor(copy_of_bundled, engine="torch").predict([knee], progress=False).predictions[0].probability
    got = Predictor(copy_of_bundled).predict([knee], progress=False).predictions[0].probability  # default: ORT
    assert abs(got - want) < 1e-4


def test_a_tampered_cached_export_is_exported_again(copy_of_bundled, bundled_export, knee):
    """The cache is keyed by the weights' sha256 and each export's own sha256 is recorded when
    written: a swapped file there is detected and replaced, not used."""
    first = ensure_onnx(copy_of_bundled)
    assert first == cached_onnx_path(RunDir(copy_of_bundled).info)
    good = sha256_file(first)
    _shifted_onnx(bundled_export, first)  # swapped behind our back, metadata intact
    assert sha256_file(ensure_onnx(copy_of_bundled)) == good


def test_corrupted_weights_are_refused_by_every_engine(copy_of_bundled, knee):
    w = copy_of_bundled / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1000] + bytes(1000))
    for engine in ("torch", "onnxruntime", "auto"):
        with pytest.raises(CheckpointError, match="sha256"):
            Predictor(copy_of_bundled, engine=engine)


def test_an_explicit_onnx_from_other_weights_is_refused(copy_of_bundled, tmp_path):
    other = tmp_path / "other_run"
    shutil.copytree(copy_of_bundled, other)
    _refit(other, lambda t: {**t, "head.out.bias": t["head.out.bias"] + 1.0}, lambda ident: ident)
    onnx_other = export_onnx(other, tmp_path / "other.onnx")
    with pytest.raises(InferenceError, match="exported from model"):
        Predictor(copy_of_bundled, engine="onnxruntime", onnx=onnx_other)


# ------------------------------------------------------------------------------ config.json


def _edit_config(run: Path, edit) -> None:
    doc = json.loads((run / "config.json").read_text())
    edit(doc["identity"])
    (run / "config.json").write_text(json.dumps(doc))


def _refit(run: Path, tensors_edit, identity_edit) -> None:
    """What an attacker who knows the format does: change the tensors and/or the identity inside
    the weights file, then fix up config.json (identity and sha256) to match."""
    from safetensors import safe_open

    w = run / "model.safetensors"
    with safe_open(str(w), "pt") as fh:
        meta = dict(fh.metadata())
    ident = identity_edit(json.loads(meta["kneeosteo"]))
    meta["kneeosteo"] = json.dumps(ident, sort_keys=True)
    save_file(tensors_edit(load_file(str(w))), str(w), metadata=meta)
    doc = json.loads((run / "config.json").read_text())
    doc["identity"], doc["weights_sha256"] = ident, sha256_file(w)
    (run / "config.json").write_text(json.dumps(doc))


def test_an_edited_preprocessing_in_config_json_is_refused(copy_of_bundled):
    """Item 2: the run section's mean moved a probability from 0.015 to 0.708 with the same hash."""
    _edit_config(copy_of_bundled, lambda i: i["preprocess"].update(mean=[0.9, 0.9, 0.9]))
    with pytest.raises(CheckpointError, match="disagree"):
        RunDir(copy_of_bundled).config


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("threshold", 2.0, "threshold"),
        ("threshold", float("nan"), "threshold"),
        ("threshold", -1.0, "threshold"),
        ("std", [0.5, 0.0, 0.5], "std"),
        ("mean", [float("inf"), 0.5, 0.5], "finite"),
        ("classes", ["osteoporosis", "osteoporosis"], "classes"),
    ],
)
def test_out_of_range_settings_are_refused_even_with_the_hash_fixed_up(copy_of_bundled, field, value, words):
    def edit(ident):
        if field in ("std", "mean"):
            ident["preprocess"][field] = value
        else:
            ident[field] = value
        return ident

    _refit(copy_of_bundled, lambda t: t, edit)
    with pytest.raises(CheckpointError, match=words):
        RunDir(copy_of_bundled).config


def test_nan_weights_are_refused_even_with_the_hash_fixed_up(copy_of_bundled):
    """Item 2: weights whose bias is NaN (hash fixed up) predicted nan, labelled normal."""
    _refit(
        copy_of_bundled,
        lambda t: {**t, "head.out.bias": torch.full_like(t["head.out.bias"], float("nan"))},
        lambda ident: ident,
    )
    with pytest.raises(CheckpointError, match="non-finite"):
        RunDir(copy_of_bundled).load_model()


def test_a_non_finite_probability_is_an_error_never_a_label(knee, monkeypatch):
    p = Predictor(engine="torch")
    monkeypatch.setattr(
        p._model, "forward", lambda images=None, features=None: torch.full((images.shape[0],), float("nan"))
    )
    with pytest.raises(InferenceError, match="non-finite"):
        p.predict([knee], progress=False)


def test_a_fifo_named_model_safetensors_is_refused_not_waited_on(copy_of_bundled):
    """Item 3 (run side): predict hung on a FIFO named model.safetensors."""
    (copy_of_bundled / "model.safetensors").unlink()
    os.mkfifo(copy_of_bundled / "model.safetensors")
    outcome = {}

    def load():
        try:
            RunDir(copy_of_bundled).config
        except CheckpointError as exc:
            outcome["error"] = str(exc)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(20)
    if t.is_alive():  # unblock the reader so the thread can end, then fail
        with open(copy_of_bundled / "model.safetensors", "wb"):
            pass
        pytest.fail("reading a FIFO named model.safetensors blocked")
    assert "not a regular file" in outcome.get("error", "")


# ------------------------------------------------------------------------------ CSV cells


@pytest.mark.parametrize("name", ["=1+2.png", "+1.png", "-2.png", "@SUM(A1).png", "\t=1.png", "\r=1.png"])
def test_csv_cells_that_a_spreadsheet_would_run_are_escaped(tmp_path, name):
    """Item 9: a file named =1+2.png wrote a cell starting with '='."""
    row = Prediction(name, "ab" * 32, "ok", 0.25, 0.25, "normal", ("normal",), None, None, False, 0.5, "m-1")
    out = write_predictions(PredictionResult([row]), tmp_path / "p.csv")
    with open(out, newline="") as fh:
        cell = list(csv.reader(fh))[1][0]
    assert cell == "'" + name


def test_plain_numbers_and_ordinary_text_are_written_as_they_are():
    text = csv_text(["a", "b", "c", "d"], [["-0.5", -0.5, "knee.png", "x=1"]])
    assert text.splitlines()[1] == "-0.5,-0.5,knee.png,x=1"
