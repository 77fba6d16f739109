"""Using a trained model: `predict` (torch and ONNX Runtime), `explain`, `export`, the bundled
default model (its card's figures and its ONNX export on KOP). The session's tiny run
(conftest.tiny) is used throughout, exported to ONNX once for the module."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import imagegen as g
from conftest import require
from kneeosteo import run as run_mod
from kneeosteo.data.preprocess import Preprocess
from kneeosteo.data.reader import read_image
from kneeosteo.errors import CheckpointError
from kneeosteo.inference import COLUMNS, Explainer, ModelInfo, OnnxModel, Predictor, RunDir, collect_inputs
from kneeosteo.inference.explain import to_image_shape
from kneeosteo.interfaces.cli import main
from kneeosteo.models import build_model

SIZE = 64
GOOD = ("a.png", "b16.png", "c.jpg", "d1.dcm", "d2.dcm", "folder/e.png", "folder/nested/f.png")


def _main(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    return exc.value.code


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("inference-cache")


@pytest.fixture(autouse=True)
def _module_cache(_isolated_cache, module_cache, monkeypatch):
    """One cache for the module (after conftest's per-test one): the run's ONNX export is made
    once and reused by every test that asks for the default engine. Tests about the cache itself
    set their own."""
    monkeypatch.setenv("KNEEOSTEO_CACHE", str(module_cache))


@pytest.fixture(scope="module")
def ws(tiny, tmp_path_factory, one_thread):
    """The session's tiny trained run, its ONNX export (via the CLI) and a folder of good and bad images."""
    root = tmp_path_factory.mktemp("inference")
    run = tiny.run
    assert _main(["export", "--run", run, "--out", root / "model.onnx"]) == 0
    im = root / "images"
    g.png_grey8(im / "a.png", variant=0)
    g.png_grey16(im / "b16.png", variant=1)
    g.jpeg_rgb(im / "c.jpg", variant=2)
    g.dicom(im / "d1.dcm", photometric="MONOCHROME1", variant=3)
    g.dicom(im / "d2.dcm", photometric="MONOCHROME2", variant=4)
    g.png_grey8(im / "folder" / "e.png", variant=5)
    g.png_grey8(im / "folder" / "nested" / "f.png", variant=6, size=(40, 70))
    g.text_as_png(im / "folder" / ".hidden.png")
    (im / "folder" / "notes.txt").write_text("not an image")
    g.truncated_png(im / "folder" / "bad.png")
    (im / "readme.txt").write_text("named explicitly, so reported")
    inputs = [im / n for n in GOOD[:5]] + [im / "folder", im / "readme.txt"]
    return SimpleNamespace(root=root, run=run, onnx=root / "model.onnx", images=im, inputs=inputs)


@pytest.fixture(scope="module")
def torch_result(ws):
    return Predictor(ws.run, engine="torch").predict(ws.inputs)


# --------------------------------------------------------------------------- inputs and predict


def test_collect_inputs_recurses_skips_and_reports(ws, tmp_path):
    files, errors = collect_inputs(ws.inputs + [ws.images / "a.png", tmp_path / "missing.png"])
    assert [f.relative_to(ws.images).as_posix() for f in files] == [
        "a.png",
        "b16.png",
        "c.jpg",
        "d1.dcm",
        "d2.dcm",
        "folder/bad.png",
        "folder/e.png",
        "folder/nested/f.png",
        "readme.txt",
    ]  # folder: sorted, .txt and dot-files skipped; a.png once
    assert [e.reason for e in errors] == ["no such file or directory"]
    (tmp_path / "d").mkdir()
    g.png_grey8(tmp_path / "real" / "x.png")
    os.symlink(tmp_path / "real", tmp_path / "d" / "link", target_is_directory=True)
    assert collect_inputs([tmp_path / "d"]) == ([], [])  # symlinked folders are not followed


def test_predict_every_format(ws, torch_result):
    res = torch_result
    assert [Path(p.path).relative_to(ws.images).as_posix() for p in res.predictions] == list(GOOD)
    sha = hashlib.sha256((ws.run / "model.safetensors").read_bytes()).hexdigest()
    for p in res.predictions:
        assert 0.0 <= p.probability <= 1.0
        assert p.content_id == read_image(p.path).content_id
        assert p.label == ("osteoporosis" if p.probability >= p.threshold else "normal")
        assert p.threshold == 0.5 and p.model == f"run-{sha[:12]}"
    assert len({p.content_id for p in res.predictions}) == len(GOOD)  # MONOCHROME1 is not MONOCHROME2
    reasons = {Path(e.path).name: e.reason for e in res.errors}
    assert set(reasons) == {"bad.png", "readme.txt"}
    assert "truncated" in reasons["bad.png"] and "not an image" in reasons["readme.txt"]


def test_batch_size_and_threshold(ws, torch_result):
    probs = [p.probability for p in torch_result.predictions]
    one = Predictor(ws.run, batch_size=1, threshold=0.0).predict(ws.inputs)
    np.testing.assert_allclose([p.probability for p in one.predictions], probs, atol=1e-5)
    assert {p.label for p in one.predictions} == {"osteoporosis"} and one.predictions[0].threshold == 0.0
    with pytest.raises(ValueError):
        Predictor(ws.run, threshold=1.5)


def test_cli_predict_csv_json_table_and_exit_codes(ws, torch_result, tmp_path, capsys):
    want = {p.path: p for p in torch_result.predictions}
    args = ["predict", "--run", ws.run, *ws.inputs]
    assert _main(args + ["--out", tmp_path / "p.csv"]) == 0
    assert "bad.png: corrupt or truncated" in capsys.readouterr().err
    with open(tmp_path / "p.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == COLUMNS and len(rows) == len(GOOD)
    for r in rows:
        # the CLI's default engine is ONNX Runtime (1e-6 from torch here), the CSV keeps 6 decimals
        assert abs(float(r["probability"]) - want[r["path"]].probability) < 1e-5
        assert r["content_id"] == want[r["path"]].content_id and r["label"] == want[r["path"]].label

    assert _main(args + ["--out", tmp_path / "p.json"]) == 0
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["columns"] == list(COLUMNS) and [tuple(r) for r in doc["predictions"]] == [COLUMNS] * len(GOOD)
    assert {Path(e["path"]).name for e in doc["errors"]} == {"bad.png", "readme.txt"}

    capsys.readouterr()
    assert _main(["predict", "--run", ws.run, ws.images / "a.png", "--threshold", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == [*COLUMNS[:12], "status_reason"] and "osteoporosis" in out[1]

    bad = [ws.images / "folder" / "bad.png", ws.images / "readme.txt"]
    assert _main(["predict", "--run", ws.run, *bad]) == 1
    err = capsys.readouterr().err
    assert "bad.png" in err and "readme.txt" in err and "no image could be read" in err
    assert _main(["predict", "--run", ws.run, ws.images / "a.png", "--out", tmp_path / "p.txt"]) == 2
    assert not (tmp_path / "p.txt").exists()
    assert _main(["predict", "--run", tmp_path, ws.images / "a.png"]) == 1  # not a run folder


# --------------------------------------------------------------------------- explain


def test_explain_maps(ws):
    ex = Explainer(ws.run)
    a, b = g.picture(64, 48, 0).astype(np.float32), g.picture(64, 48, 1).astype(np.float32)
    maps = {
        (name, t): ex.explain(img, target=t) for name, img in (("a", a), ("b", b)) for t in ("positive", "negative")
    }
    for e in maps.values():
        for m in (e.gradcam, e.attention):
            assert m.shape == (48, 64) and np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1
        assert e.layer == "backbone.bn2" and e.attention_raw.shape == (SIZE // 16,) * 2
    # one logit: the negative class's Grad-CAM is ReLU of minus the positive's weighted sum
    assert maps["a", "positive"].gradcam_raw.max() + maps["a", "negative"].gradcam_raw.max() > 0
    assert not np.allclose(maps["a", "positive"].attention, maps["b", "positive"].attention)
    assert any(not np.allclose(maps["a", t].gradcam, maps["b", t].gradcam) for t in ("positive", "negative"))
    tall = ex.explain(g.picture(30, 90, 2).astype(np.float32))
    assert tall.gradcam.shape == tall.attention.shape == (90, 30)
    # the loaded model is left as it was: frozen backbone, no gradients kept, eval mode
    assert not any(p.requires_grad for p in ex.model.backbone.parameters())
    assert all(p.grad is None for p in ex.model.parameters()) and not ex.model.training


@pytest.mark.parametrize(
    "backbone, use_backbone, attention, layer",
    [
        ("densenet169", True, True, "backbone.features.norm5"),
        ("efficientnet_lite0", False, True, "attention.features"),
        ("efficientnet_lite0", True, False, "backbone.bn2"),
    ],
)
def test_explain_other_architectures(backbone, use_backbone, attention, layer):
    model, _ = build_model(backbone, weights="none", attention=attention, use_backbone=use_backbone)
    info = ModelInfo("x", Preprocess("robust", SIZE), 0.5, "normal", "osteoporosis")
    e = Explainer.from_model(model, info).explain(g.picture(50, 40, 0).astype(np.float32))
    assert e.layer == layer and e.gradcam.shape == (40, 50) and np.isfinite(e.gradcam).all()
    assert (e.attention is None) == (not attention)


@pytest.mark.parametrize("preset", ["paper", "robust", "bone"])
def test_maps_return_to_the_original_geometry(preset):
    """A map that *is* the preprocessed picture comes back as (nearly) the original picture."""
    y, x = np.mgrid[0:40, 0:90]
    pixels = ((x / 89 + y / 39) / 2).astype(np.float32)  # smooth: interpolation error stays small
    prep = Preprocess(preset, 32)
    # 'bone' letterboxes as 'robust' does (its mask changes the pixels, not where they land)
    picture = Preprocess("robust" if preset == "bone" else preset, 32).geometry(pixels)[0].numpy()
    back = to_image_shape(picture, pixels.shape, prep)
    assert back.shape == pixels.shape and np.abs(back - pixels).mean() < 0.03


def test_cli_explain_writes_png_and_json(ws, tmp_path):
    out = tmp_path / "expl"
    args = ["explain", "--run", ws.run, ws.images / "a.png", ws.images / "d1.dcm", ws.images / "folder" / "bad.png"]
    assert _main(args + ["--out", out]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.png", "d1.json", "d1.png"]
    assert (out / "a.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    doc = json.loads((out / "d1.json").read_text())
    assert doc["image_shape"] == [g.H, g.W] and 0 <= doc["probability"] <= 1
    assert doc["content_id"] == read_image(ws.images / "d1.dcm").content_id
    for m in ("gradcam", "attention"):
        assert doc[m]["image"]["shape"] == [g.H, g.W]
        assert set(doc[m]["raw"]) == {"shape", "min", "max", "mean", "std", "argmax"}
    assert _main(["explain", "--run", ws.run, ws.images / "readme.txt", "--out", out]) == 1


# --------------------------------------------------------------------------- ONNX


def test_onnx_export_is_valid_and_matches_torch(ws):
    """The export against PyTorch itself (engine="torch"): the default engine on a CPU *is* ONNX
    Runtime, so a Predictor(run) reference would compare the export with itself."""
    import onnx

    proto = onnx.load(str(ws.onnx))
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    ref = Predictor(ws.run, engine="torch")
    assert ref.engine == "torch" and ref._session is None  # really PyTorch, not a session
    assert meta["kneeosteo.model_id"] == ref.model_id
    assert json.loads(meta["kneeosteo.preprocess"])["size"] == SIZE
    ort = OnnxModel(ws.onnx)
    assert ort.info == ref.info
    x = torch.stack(
        [ref.info.preprocess(g.picture(64, 48, v).astype(np.float32)) for v in range(3)]
        + [ref.info.preprocess(read_image(f).pixels) for f in ws.inputs[:5]]
    )
    want = ref.probabilities(x)
    assert np.ptp(want) > 100 * 1e-4  # the outputs differ by far more than the tolerance
    for batch, w in ((x, want), (x[:1], want[:1])):  # dynamic batch axis
        got = ort(batch.numpy())
        assert got.shape == (len(batch),)
        np.testing.assert_allclose(got, w, atol=1e-4)
    # the default engine (ONNX Runtime, exported on demand) agrees with PyTorch too
    auto = Predictor(ws.run)
    assert auto.engine == "onnxruntime"
    np.testing.assert_allclose(auto.probabilities(x), want, atol=1e-4)


def test_predict_with_onnxruntime_matches_torch(ws, torch_result, tmp_path, monkeypatch):
    res = Predictor(engine="onnxruntime", onnx=ws.onnx).predict(ws.inputs)  # no run folder needed
    assert [(p.path, p.content_id, p.model) for p in res.predictions] == [
        (p.path, p.content_id, p.model) for p in torch_result.predictions
    ]
    for a, b in zip(res.predictions, torch_result.predictions):
        assert abs(a.probability - b.probability) < 1e-4
        if abs(b.probability - b.threshold) > 1e-4:
            assert a.label == b.label
    assert len(res.errors) == 2

    # without --onnx: exported on demand into the cache, then reused
    cache = tmp_path / "cache"
    monkeypatch.setenv("KNEEOSTEO_CACHE", str(cache))
    assert (
        _main(
            ["predict", "--engine", "onnxruntime", "--run", ws.run, ws.images / "a.png", "--out", tmp_path / "o.json"]
        )
        == 0
    )
    (cached,) = (cache / "onnx").glob("*.onnx")
    stamp = cached.stat().st_mtime_ns
    Predictor(ws.run, engine="onnxruntime")
    assert cached.stat().st_mtime_ns == stamp
    row = json.loads((tmp_path / "o.json").read_text())["predictions"][0]
    assert abs(row["probability"] - torch_result.predictions[0].probability) < 1e-4
    assert _main(["export", "--run", ws.run, "--format", "tflite", "--out", tmp_path / "m"]) == 2


# --------------------------------------------------------------------------- bundled model


def test_missing_bundled_model_is_a_clear_error(ws, monkeypatch, capsys):
    # the package's assets as a fresh install without the model would have them (run.py only)
    monkeypatch.setattr(run_mod, "resources", SimpleNamespace(files=lambda pkg: ws.root / "no_such_folder"))
    with pytest.raises(CheckpointError, match="--run"):
        RunDir.bundled()
    with pytest.raises(CheckpointError, match="--run"):
        Predictor()
    assert _main(["predict", ws.images / "a.png"]) == 1
    assert "no bundled default model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def bundled_cache(tmp_path_factory) -> Path:
    """One KNEEOSTEO_CACHE for this module's tests of the bundled model: its ONNX export (~5-10 s)
    is made once, not once per test."""
    return tmp_path_factory.mktemp("bundled-cache")


@pytest.fixture(scope="module")
def bundled_on_kop(bundled_run, kop, bundled_cache, tmp_path_factory):
    """The bundled model scored on its own KOP test split by `evaluate` (PyTorch fp32), and its
    ONNX export run on the same prepared inputs (read back from the cache evaluate filled:
    each image is decoded once)."""
    from kneeosteo.data.split import load_split
    from kneeosteo.evaluation.evaluate import evaluate_run
    from kneeosteo.features.cache import TensorCache
    from kneeosteo.features.prepare import prepare
    from kneeosteo.inference.export import ensure_onnx

    split = bundled_run / "split.json"
    require(split.is_file(), f"{split} missing: the bundled model's test split is unknown")
    root = tmp_path_factory.mktemp("bundled-kop")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KNEEOSTEO_CACHE", str(bundled_cache))
        metrics, where = evaluate_run(bundled_run, data=kop, split=split, out=root / "eval", probes=False)
        rd = RunDir(bundled_run)
        prep = rd.config.preprocess
        sets = load_split(split, kop)
        cache = TensorCache(bundled_cache / "tensors")
        inputs = prepare(sets.items("test"), kop, prep, cache, label="onnx")
        onnx_probs = OnnxModel(ensure_onnx(rd))(prep.normalise(inputs.grey.float()).numpy())
    with open(where / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return SimpleNamespace(
        metrics=metrics,
        where=where,
        out=root / "eval",
        rows=rows,
        paths=inputs.paths,
        onnx=onnx_probs,
        decoded_again=cache.misses,
    )


def test_bundled_model_loads_and_predicts(bundled_run, bundled_cache, monkeypatch):
    monkeypatch.setenv("KNEEOSTEO_CACHE", str(bundled_cache))
    p = Predictor()
    probs = p.predict_pixels([g.knee_film(seed=v).astype(np.float32) for v in range(2)])
    assert probs.shape == (2,) and np.isfinite(probs).all() and ((probs >= 0) & (probs <= 1)).all()
    if p.knee_run:  # a film with no knee gets no number (predict_trusted says why), never a guess
        assert np.isnan(p.predict_pixels([g.picture(64, 48, 0).astype(np.float32)])).all()
    assert p.model_id.startswith(bundled_run.name + "-")
    sha = hashlib.sha256((bundled_run / "model.safetensors").read_bytes()).hexdigest()
    assert p.model_id == f"{bundled_run.name}-{sha[:12]}" == RunDir.open(None).model_id


def test_bundled_model_metrics_match_its_card(bundled_run, bundled_on_kop):
    """Every figure of the card, not only accuracy: drift that flips no label (a slightly scaled
    logit) still moves the loss, and one that reorders images moves the AUC."""
    card = json.loads((bundled_run / "metrics.json").read_text())
    got = bundled_on_kop.metrics
    assert bundled_on_kop.where == bundled_on_kop.out
    n_test = len(json.loads((bundled_run / "split.json").read_text())["test"])  # every test film scored
    assert got["counts"] == card["counts"] and got["n"] == card["n"] == n_test
    for name in ("accuracy", "auc", "loss", "sensitivity", "specificity", "f1"):
        assert abs(got[name]["value"] - card[name]["value"]) < 1e-6, (name, got[name]["value"], card[name]["value"])


def test_bundled_model_onnx_export_matches_torch_on_kop(bundled_on_kop):
    """The real model's export against PyTorch fp32 on the KOP test images (a tiny model can hide
    an export bug that a 1792-feature DenseNet-sized head would not)."""
    torch_probs = {r["path"]: float(r["probability"]) for r in bundled_on_kop.rows}
    assert bundled_on_kop.decoded_again == 0  # the prepared inputs came from evaluate's cache
    want = np.array([torch_probs[p] for p in bundled_on_kop.paths])
    assert len(want) == bundled_on_kop.metrics["n"] and np.ptp(want) > 0.5
    np.testing.assert_allclose(bundled_on_kop.onnx, want, atol=1e-4)  # predictions.csv keeps 6 decimals


def test_bundled_model_refuses_a_non_knee_image_that_passes_every_pixel_check(
    bundled_run, bundled_cache, monkeypatch, tmp_path
):
    """The feature distance, not the pixel checks, is what refuses these: a generated page of text
    and an MR slice pass every pixel check (the photo-like scenes no longer do: the film checks see
    several bone-like regions side by side in them), and the bundled run answers out_of_domain (no
    label, no set) through Predictor and through the API, with the distance above the threshold."""
    from fastapi.testclient import TestClient

    from kneeosteo.interfaces.web import WebSettings, create_app
    from kneeosteo.trust.domain import pixel_problems

    monkeypatch.setenv("KNEEOSTEO_CACHE", str(bundled_cache))
    trust = RunDir(bundled_run).trust
    assert trust is not None and trust.domain is not None
    junk = [p for p in g.non_knee_corpus(tmp_path / "junk") if p.name in ("document_0.png", "MR_small.dcm")]
    assert len(junk) == 2
    for p in junk:
        assert pixel_problems(read_image(p).pixels, limits=trust.pixel_limits) == [], p.name
    app = create_app(WebSettings(run=bundled_run, workers=1, queue=1))
    predictor = app.state.service.predictor  # the API's own Predictor (ONNX Runtime, as `predict` runs)
    assert isinstance(predictor, Predictor) and predictor.trust is not None
    rows = predictor.predict(junk, progress=False).predictions
    assert len(rows) == 2
    by_distance = 0
    for r in rows:
        assert (r.status, r.label, tuple(r.prediction_set)) == ("out_of_domain", "", ()), r
        if predictor.knee_run and r.status_reason.startswith("no knee found"):  # the localiser refused it first
            continue
        assert r.domain_score > r.domain_threshold == pytest.approx(trust.domain.threshold_)
        assert "features unlike the training images" in r.status_reason, r  # the distance refused it
        by_distance += 1
    assert by_distance >= 1  # the feature distance is exercised, not only the localiser
    with TestClient(app) as client:
        for p, row in zip(junk, rows, strict=True):
            mime = "application/dicom" if p.suffix == ".dcm" else "image/png"
            r = client.post("/api/predict", files={"file": (p.name, p.read_bytes(), mime)})
            assert r.status_code == 200, r.text
            body = r.json()
            assert (body["status"], body["label"], body["prediction_set"]) == ("out_of_domain", "", []), body
            assert body["status_reason"] == row.status_reason  # the API says what predict says
            if "features unlike the training images" in row.status_reason:
                assert body["domain_score"] > body["domain_threshold"]


def test_bundled_model_conformal_coverage_on_images_that_did_not_calibrate_it(bundled_run, bundled_on_kop):
    """Held-out coverage: the bundled run's conformal sets were calibrated on its validation
    images; on its test images (none of them a calibration image, by content id) the true class
    is in the set as often as split conformal promises: at least the 0.1% quantile of the
    beta-binomial law of held-out coverage (Vovk 2012; Angelopoulos & Bates 2021, section 3.2).

    The guarantee is about the truth the calibration films carried: KOP's folder labels. A model
    tested on the held-out source (T-score truth) is held to it on those films' folder labels, and
    its coverage of the T-score truth, which no calibration film carried, is reported beside it
    (evaluate and the card), not promised."""
    from scipy.stats import betabinom

    from kneeosteo.trust import logit

    trust = RunDir(bundled_run).trust
    split = json.loads((bundled_run / "split.json").read_text())
    ids = split["content_ids"]
    n_cal = trust.conformal.calibration_scores_.size
    assert n_cal == trust.fitted["calibration_images"] == len(split["val"])  # fitted on its validation films
    assert not {ids[p] for p in split["val"]} & {ids[r["path"]] for r in bundled_on_kop.rows}
    scored = np.array([int(r["label"]) for r in bundled_on_kop.rows])
    raw = np.array([float(r["probability"]) for r in bundled_on_kop.rows])
    mask = trust.conformal.predict_mask(trust.calibrated(logit(raw)))
    t = bundled_on_kop.metrics["trust"]
    assert mask[np.arange(scored.size), scored].mean() == pytest.approx(t["conformal_coverage"], abs=1e-12)
    folder = split.get("folder_labels")
    if folder:  # the held-out source: the guarantee is checked on the folder labels
        classes = split["classes"]
        y = np.array([classes.index(folder[r["path"]]) for r in bundled_on_kop.rows])
        covered = int(mask[np.arange(y.size), y].sum())
        assert covered == t["conformal_coverage_folder_labels"]["covered"]
        card = (bundled_run / "MODEL_CARD.md").read_text()
        assert f"{covered} of {y.size}" in card  # both coverages are on the card
        assert f"{int(mask[np.arange(y.size), scored].sum())} of {y.size}" in card
    else:
        y = scored
        covered = int(mask[np.arange(y.size), y].sum())
    k = int(np.ceil((n_cal + 1) * trust.conformal.coverage))  # the rank of the calibration quantile
    assert k <= n_cal  # a finite quantile: single-class sets are possible at all
    assert covered >= betabinom(y.size, k, n_cal + 1 - k).ppf(0.001), (covered, y.size)
    assert (mask.sum(axis=1) == 1).any()  # and the sets say something: not every answer is "both"


def test_model_card_states_the_measured_accuracy(bundled_run):
    measured = json.loads((bundled_run / "metrics.json").read_text())["accuracy"]["value"]
    card = (bundled_run / "MODEL_CARD.md").read_text()
    assert f"**{measured:.4f}**" in card
    assert "not a diagnostic device" in card
