"""`kneeosteo serve`: every endpoint and every error code through FastAPI's test client, the
bounded pool's 503, upload hygiene (temporary files only, client paths never opened), the
`serve` command, and a small loopback load test, on the session's tiny run (conftest.tiny)."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import imagegen as g
from kneeosteo import run as run_mod
from kneeosteo.data.reader import read_image
from kneeosteo.inference import Predictor
from kneeosteo.interfaces.cli import main
from kneeosteo.interfaces.web import DEFAULT_CAVEAT, WebSettings, create_app, uploads
from kneeosteo.interfaces.web.app import card_caveat
from kneeosteo.interfaces.web.pool import BoundedPool, PoolFull
from kneeosteo.run import RunDir

REPO = Path(__file__).resolve().parent.parent
SIZE = 64
LIMIT = 200_000  # bytes: small, so 413 is cheap to provoke


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_run(tiny) -> Path:
    """The session's tiny trained run (conftest.tiny), shared with test_inference and test_browser."""
    return tiny.run


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("web-cache")


@pytest.fixture(autouse=True)
def _module_cache(_isolated_cache, module_cache, monkeypatch):
    """The module's own cache for every test (after conftest's per-test one), so the tiny run's
    ONNX export the library side of a comparison needs is made once, not once per test."""
    monkeypatch.setenv("KNEEOSTEO_CACHE", str(module_cache))


@pytest.fixture(scope="module")
def cache_at_module_setup():
    """Where a module-scoped fixture (set up before any per-test fixture) would cache things."""
    from kneeosteo.paths import cache_dir

    return cache_dir()


@pytest.fixture(scope="module")
def app(tiny_run, cache_at_module_setup):
    return create_app(WebSettings(run=tiny_run, workers=2, queue=2, max_upload_bytes=LIMIT))


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("uploads")
    return {
        "png": g.png_grey8(d / "knee.png", array=g.dataset_image(3, "osteoporosis", size=96)),
        "png16": g.png_grey16(d / "knee16.png", variant=1),
        "jpeg": g.jpeg_rgb(d / "knee.jpg", variant=2),
        "dicom": g.dicom(d / "knee.dcm", photometric="MONOCHROME1", variant=3),
        "dicom_bare": g.dicom(d / "IM0001", preamble=False, variant=4),
        "text": g.text_as_png(d / "notes.png"),
        "truncated": g.truncated_png(d / "cut.png"),
        "truncated_jpeg": g.truncated_jpeg(d / "cut.jpg"),
        "bomb": g.bomb_png(d / "bomb.png"),
        "empty": g.zero_byte(d / "empty.png"),
    }


def post(client, endpoint, path: Path, name: str | None = None, mime: str = "application/octet-stream"):
    return client.post(endpoint, files={"file": (name or path.name, path.read_bytes(), mime)})


# --------------------------------------------------------------------------- page, health, model


def test_page_is_one_self_contained_offline_file(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert DEFAULT_CAVEAT in page and "__" not in page.replace("__proto__", "")  # placeholders filled
    for attr in ("src", "href", "action"):  # nothing fetched from elsewhere: no CDN, fonts, scripts
        assert f'{attr}="http' not in page and f"{attr}='http" not in page and f'{attr}="//' not in page
    assert "@import" not in page and "url(" not in page
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert client.head("/").status_code == 200


def test_healthz(client, tiny_run):
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "model_id": RunDir(tiny_run).info.model_id, "busy": 0, "capacity": 4}


def test_module_fixtures_never_touch_the_users_cache(app, cache_at_module_setup, tmp_path_factory):
    """The app above was created (and exported its ONNX) in a module-scoped fixture, which runs
    before any per-test fixture: conftest's session-scoped cache must already be in place, or
    the export lands in (and a stale one is read from) the user's ~/.cache/kneeosteo."""
    from kneeosteo.inference.export import cached_onnx_path

    base = tmp_path_factory.getbasetemp().resolve()
    assert cache_at_module_setup.resolve().is_relative_to(base), cache_at_module_setup
    with pytest.MonkeyPatch.context() as mp:  # the app's export, where the module setup put it
        mp.setenv("KNEEOSTEO_CACHE", str(cache_at_module_setup))
        assert app.state.service.predictor.engine == "onnxruntime"  # the default engine exported it
        assert cached_onnx_path(app.state.service.info).is_file()


def test_model_endpoint(client, tiny_run):
    doc = client.get("/api/model").json()
    info = RunDir(tiny_run).info
    assert doc["model_id"] == info.model_id and doc["threshold"] == info.threshold == 0.5
    assert doc["classes"] == {"negative": "normal", "positive": "osteoporosis"}
    config = json.loads((tiny_run / "config.json").read_text())
    assert doc["config"]["identity"]["classes"] == config["identity"]["classes"]
    assert doc["config"]["weights_sha256"] == config["weights_sha256"]
    assert doc["caveat"] == DEFAULT_CAVEAT and doc["card"] is None  # a trained run has no card
    assert doc["limits"] == {
        "max_upload_bytes": LIMIT,
        "max_pixels": 25_000_000,
        "workers": 2,
        "queue": 2,
    }  # 25 MP: the service default


def test_a_run_without_a_fused_model_refuses_covariates_and_answers_image_only(client, files):
    r = client.post(
        "/api/predict",
        files={"file": ("knee.png", files["png"].read_bytes(), "image/png")},
        data={"covariates": '{"age": 70}'},
    )
    assert r.status_code == 422 and "takes no covariates" in r.json()["detail"]
    r = post(client, "/api/predict", files["png"])
    assert r.status_code == 200 and r.json()["answer_basis"] == "image_only" and r.json()["fused_probability"] is None


def test_model_endpoint_tells_a_stranger_nothing_about_the_server(client, tiny_run, tiny):
    """Issue 28 row 5: no absolute path (the run, the data, the venv), no calibration file names."""
    import sys

    text = client.get("/api/model").text
    config = (tiny_run / "config.json").read_text()
    for secret in (str(tiny_run), str(tiny.data)):
        assert secret in config and secret not in text  # in the run's file, not in the answer
    assert sys.prefix not in text
    assert "content_ids" not in text and "command_line" not in text and '"/' not in text


def test_public_doc_withholds_paths_and_calibration_file_names():
    from kneeosteo.interfaces.web.app import public_doc

    doc = {
        "settings": {"data": "../shared/kop", "epochs": 3},
        "record": {
            "calibrated_from": {"run": "/srv/runs/a", "model_id": "m-1"},
            "calibration_data": {"data": "site", "content_ids": {"p/a.png": "00"}},
            "reweight": {"method": "1 / P(own label | file metadata)"},
            "backbone_weights": {"path": "/venv/lib/x.pth", "sha256": "ab"},
        },
        "fitted": {"calibration_set": "/data/site films", "domain_set": "training partition (originals)"},
    }
    out = public_doc(doc)
    assert out == {
        "settings": {"data": None, "epochs": 3},
        "record": {
            "calibrated_from": {"run": None, "model_id": "m-1"},
            "calibration_data": {"data": None},
            "reweight": {"method": "1 / P(own label | file metadata)"},
            "backbone_weights": {"path": None, "sha256": "ab"},
        },
        "fitted": {"calibration_set": None, "domain_set": "training partition (originals)"},
    }


def test_caveat_comes_from_the_model_card():
    card = (
        "# Model card: default\n\n**Research use only — not a diagnostic device.** It has not been\n"
        "validated on any clinical population.\n\n## Data\nKOP.\n"
    )
    assert card_caveat(card) == "Research use only — not a diagnostic device."
    card = "# Card\n\nSome intro.\n\n> For research use only. Do not use it for patients.\n"
    assert card_caveat(card) == "For research use only."
    assert card_caveat("# Card\nNo warning here.\n```\nresearch use\n```") == card_caveat(None) == DEFAULT_CAVEAT


def test_openapi_schema_lists_every_endpoint(client):
    schema = client.get("/openapi.json").json()
    assert {"/api/predict", "/api/explain", "/api/model", "/healthz"} <= set(schema["paths"])
    codes = set(schema["paths"]["/api/predict"]["post"]["responses"])
    assert {"200", "413", "415", "422", "503"} <= codes
    assert "file" in json.dumps(schema["components"])


# --------------------------------------------------------------------------- predict and explain


@pytest.mark.parametrize("kind", ["png", "png16", "jpeg", "dicom", "dicom_bare"])
def test_predict_every_format_matches_the_library(client, files, tiny_run, kind, tmp_path):
    r = post(client, "/api/predict", files[kind])
    assert r.status_code == 200, r.text
    body = r.json()
    ref = files[kind]
    if kind == "dicom_bare":  # the web service sniffs it; the library wants a DICOM suffix for it
        ref = tmp_path / "IM0001.dcm"
        ref.write_bytes(files[kind].read_bytes())
    want = Predictor(tiny_run).predict([ref], progress=False).predictions[0]
    assert body["probability"] == pytest.approx(want.probability, abs=1e-5)
    assert body["content_id"] == want.content_id == read_image(ref).content_id
    assert body["label"] == want.label and body["threshold"] == 0.5 and body["model_id"] == want.model
    assert body["positive_class"] == "osteoporosis" and body["filename"] == files[kind].name
    assert body["format"] == ("DICOM" if "dicom" in kind else "JPEG" if kind == "jpeg" else "PNG")


def _png(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    assert img.format == "PNG"
    return img


def test_explain_returns_prediction_and_overlays(client, files):
    pred = post(client, "/api/predict", files["png"]).json()
    r = post(client, "/api/explain", files["png"])
    assert r.status_code == 200, r.text
    body = r.json()
    for key in pred:
        assert body[key] == pred[key]  # the same numbers as /api/predict
    assert body["gradcam_layer"] == "backbone.bn2" and body["gradcam_target"] == "osteoporosis"
    assert isinstance(body["gradcam_all_zero"], bool)
    assert _png(body["image_png"]).size == (96, 96) and _png(body["image_png"]).mode == "L"
    for key in ("gradcam_png", "attention_png"):
        img = _png(body[key])
        assert img.size == (96, 96) and img.mode == "RGB"


def test_overlays_are_shrunk_for_display(client, tmp_path):
    big = g.png_grey8(tmp_path / "big.png", size=(1600, 1200))
    body = post(client, "/api/explain", big).json()
    assert _png(body["gradcam_png"]).size == (768, 576) and (body["width"], body["height"]) == (1600, 1200)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("endpoint", ["/api/predict", "/api/explain"])
@pytest.mark.parametrize(
    "kind, code, words",
    [
        ("text", 415, "not an image"),
        ("truncated", 422, "truncated"),
        ("truncated_jpeg", 422, "corrupt or truncated"),
        ("bomb", 422, "decompression bomb"),
        ("empty", 422, "empty"),
    ],
)
def test_bad_uploads_get_a_reason(client, files, endpoint, kind, code, words):
    r = post(client, endpoint, files[kind])
    assert r.status_code == code
    detail = r.json()["detail"]
    assert words in detail and detail.startswith(files[kind].name + ": ")
    assert tempfile.gettempdir() not in detail  # the server's temporary path is not leaked


def test_bomb_by_pixel_count_is_refused_before_decoding(tiny_run, files):
    app = create_app(WebSettings(run=tiny_run, max_pixels=1000))  # the 96x96 png is over it
    with TestClient(app) as c:
        r = post(c, "/api/predict", files["png"])
    assert (
        r.status_code == 422
        and "decompression bomb: 96x96 = 9216 pixels exceeds the limit of 1000" in r.json()["detail"]
    )


def test_damaged_files_that_start_like_images_are_422_others_415(client):
    for head in (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"II*\x00", b"GIF89a"):
        r = client.post("/api/predict", files={"file": ("x.png", head + b"junk" * 20)})
        assert r.status_code == 422 and "corrupt" in r.json()["detail"], head
    r = client.post("/api/predict", files={"file": ("x.dcm", b"not dicom at all" * 20)})  # DICOM by name only
    assert r.status_code == 415 and "not a recognised image format" in r.json()["detail"]
    for data in (b"%PDF-1.7\n" + bytes(300), b"BMI table\n" * 30, b"\x00" * 400):
        assert client.post("/api/predict", files={"file": ("x.png", data)}).status_code == 415, data[:9]


def test_missing_file_field_is_422(client):
    assert client.post("/api/predict").status_code == 422
    assert client.post("/api/predict", data={"other": "1"}).status_code == 422
    assert client.get("/api/predict").status_code == 405


def test_too_large_is_413(client):
    over = b"\x89PNG\r\n\x1a\n" + bytes(LIMIT)
    # the file alone is over the limit, the request is not (multipart slack): counted while copied
    r = client.post("/api/predict", files={"file": ("big.png", over)})
    assert r.status_code == 413 and "the limit is 0.2 MB" in r.json()["detail"]
    assert "connection" not in r.headers  # not the Content-Length path (which closes)


def _body(sent: list, chunks: int = 40, size: int = 10_000):
    """A request body that records how many of its chunks the server asked for."""
    for i in range(chunks):
        sent.append(i)
        yield bytes(size)


def test_413_from_content_length_reads_no_body(client):
    """A request declared far too large is refused from its Content-Length header alone: the
    middleware answers before reading one chunk of the body, and closes the connection."""
    sent: list = []
    r = client.post(
        "/api/explain",
        content=_body(sent),
        headers={"content-type": "multipart/form-data; boundary=x", "content-length": str(40 * 10_000)},
    )
    assert r.status_code == 413 and "the limit is 0.2 MB" in r.json()["detail"]
    assert r.headers.get("connection") == "close"
    assert sent == []  # refused before the body


def test_413_while_streaming_without_content_length(client):
    """Chunked, with no Content-Length: refused by counting the bytes as they arrive (the test
    client hands the app the whole body, so how far it got is not observable here; which path
    answered is: the Content-Length refusal closes the connection, the counted one does not)."""
    sent: list = []
    r = client.post("/api/predict", content=_body(sent), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413 and "content-length" not in r.request.headers
    assert "the limit is 0.2 MB" in r.json()["detail"]
    assert r.headers.get("connection") != "close" and sent  # the body was read: counted, not declared


def test_client_file_names_are_never_opened(client, files):
    r = post(client, "/api/predict", files["png"], name="/etc/passwd")
    assert r.status_code == 200 and r.json()["filename"] == "passwd"
    r = post(client, "/api/predict", files["text"], name=str(files["png"]))  # a real image's path
    assert r.status_code == 415
    r = post(client, "/api/predict", files["png"], name="..\\..\\x.png")
    assert r.json()["filename"] == "x.png"


def test_uploads_live_only_in_a_temporary_folder_removed_after_the_request(client, files, tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    opened = []
    real = uploads.read_image
    monkeypatch.setattr(uploads, "read_image", lambda path, **kw: opened.append(Path(path)) or real(path, **kw))
    for kind in ("png", "dicom", "truncated", "bomb"):
        post(client, "/api/predict", files[kind])
    post(client, "/api/explain", files["jpeg"])
    assert len(opened) == 5 and all(p.parent.parent == tmp for p in opened)
    assert list(tmp.iterdir()) == []


# --------------------------------------------------------------------------- bounded pool


def test_pool_counts_and_refuses():
    pool = BoundedPool(workers=1, queue=1)
    gate = threading.Event()
    jobs = [pool.submit(gate.wait, 10) for _ in range(2)]
    with pytest.raises(PoolFull):
        pool.submit(gate.wait, 10)
    assert pool.pending == 2
    gate.set()
    assert [j.result(10) for j in jobs] == [True, True]
    assert pool.submit(lambda: 7).result(10) == 7
    pool.shutdown()
    assert pool.pending == 0
    with pytest.raises(ValueError):
        BoundedPool(workers=0, queue=1)


def test_full_pool_answers_503_with_retry_after_then_recovers(client, app, files, monkeypatch):
    pool = app.state.pool
    gate = threading.Event()
    blockers = [pool.submit(gate.wait, 30) for _ in range(pool.capacity)]
    try:
        for endpoint in ("/api/predict", "/api/explain"):  # refused before the upload is read
            r = post(client, endpoint, files["png"])
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert "busy" in r.json()["detail"]
        assert client.get("/healthz").json()["busy"] == pool.capacity  # health stays up under load
        # the pool filling up while an upload arrives: the pool itself refuses the job
        monkeypatch.setattr(type(pool), "full", property(lambda self: False))
        r = post(client, "/api/predict", files["png"])
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
    finally:
        gate.set()
        for b in blockers:
            b.result(30)
    assert post(client, "/api/predict", files["png"]).status_code == 200


# --------------------------------------------------------------------------- the command


def _main(argv) -> int:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    return exc.value.code


def test_serve_without_a_model_fails_clearly(tmp_path, monkeypatch, capsys):
    # the package's assets as a fresh install without the model would have them (run.py only)
    monkeypatch.setattr(run_mod, "resources", SimpleNamespace(files=lambda pkg: tmp_path / "no_such_folder"))
    assert _main(["serve"]) == 1
    assert "no bundled default model" in capsys.readouterr().err
    assert _main(["serve", "--run", tmp_path]) == 1
    assert "not a run folder" in capsys.readouterr().err


def test_serve_starts_uvicorn_on_loopback(tiny_run, monkeypatch, capsys):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    assert _main(["serve", "--run", tiny_run, "--port", "8123", "--workers", "1", "--queue", "0"]) == 0
    app, kw = calls[0]
    assert kw["host"] == "127.0.0.1" and kw["port"] == 8123
    assert app.state.pool.capacity == 1 and "warning" not in capsys.readouterr().err
    assert _main(["serve", "--run", tiny_run, "--host", "0.0.0.0", "--max-upload-mb", "1"]) == 0
    assert calls[1][0].state.service.settings.max_upload_bytes == 1_000_000
    assert "no authentication" in capsys.readouterr().err


# --------------------------------------------------------------------------- load


def test_load_smoke(tiny_run, client, tmp_path):
    """A small run of benchmarks/load_test.py: every request answered, 200 or 503. Its time limit
    is 60 s, or 400 times one request of the same image measured now through the module's app
    when more: 20 requests through one worker take 20 of them, and a loaded machine stretches all."""
    import time

    spec = importlib.util.spec_from_file_location("load_test", REPO / "benchmarks" / "load_test.py")
    lt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lt)
    image = g.png_grey8(tmp_path / "k.png", size=(128, 128)).read_bytes()
    t0 = time.monotonic()
    assert client.post("/api/predict", files={"file": ("k.png", image, "image/png")}).status_code == 200
    limit = max(60.0, 400 * (time.monotonic() - t0))
    result = lt.run_load_test(tiny_run, requests=20, clients=5, workers=1, queue=1, time_limit=limit, image=image)
    assert result["sent"] == 20 and result["all_answered_200_or_503"], result["status_counts"]
    assert set(result["status_counts"]) <= {"200", "503"} and result["status_counts"].get("200", 0) >= 1
    js, md = lt.write_results(result, tmp_path / "results", label="smoke")
    assert json.loads(js.read_text())["requests"] == 20 and md.read_text().count("\n| 20") == 1
