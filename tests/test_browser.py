"""The page in a real browser: Debian's Chromium driven by Playwright over a loopback server.

Skips where /usr/bin/chromium or the playwright package is missing, and fails instead under
CI=true (.ci/run installs both; conftest.require). Playwright's own browser download
(`playwright install`) is never used. With KNEEOSTEO_UPDATE_SCREENSHOT=1 the screenshot also replaces docs/screenshot.png (made with the
bundled model when there is one)."""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import require

CHROMIUM = Path("/usr/bin/chromium")
require(
    CHROMIUM.is_file(),
    f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium) to run the browser test",
    module=True,
)
sync_api = None
try:
    from playwright import sync_api
except ImportError:
    require(
        False,
        "the playwright package is not installed (pip install playwright; its browser download is not needed)",
        module=True,
    )

import imagegen as g  # noqa: E402
from kneeosteo.errors import CheckpointError  # noqa: E402
from kneeosteo.interfaces.web import DEFAULT_CAVEAT, WebSettings, create_app, serve_in_thread  # noqa: E402
from kneeosteo.run import RunDir  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UPDATE = os.environ.get("KNEEOSTEO_UPDATE_SCREENSHOT") == "1"


def _bundled_run_dir() -> Path | None:
    try:
        return RunDir.bundled().path
    except CheckpointError:
        return None


@pytest.fixture(scope="module")
def base_url(tiny):
    bundled = _bundled_run_dir() if UPDATE else None
    run = bundled if bundled is not None else tiny.run  # the session's tiny run (conftest.tiny)
    with serve_in_thread(create_app(WebSettings(run=run, workers=1, queue=2))) as url:
        yield url


@pytest.fixture()
def page(tmp_path):
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=FLAGS,
            viewport={"width": 1280, "height": 860},
            timeout=20_000,
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def _api_predict(base_url: str, path: Path) -> dict:
    boundary = "kneeosteo-test"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    req = urllib.request.Request(
        base_url + "/api/predict", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    with urllib.request.urlopen(req, timeout=20) as r:
        return json.loads(r.read())


def test_upload_shows_probability_and_overlays(page, base_url, tmp_path):
    image = g.png_grey8(tmp_path / "knee_radiograph.png", array=g.dataset_image(5, "osteoporosis", size=320))
    elsewhere = []
    page.on("request", lambda r: None if r.url.startswith((base_url, "data:", "blob:")) else elsewhere.append(r.url))
    page.goto(base_url + "/")
    assert DEFAULT_CAVEAT.split(" — ")[0] in page.inner_text("#caveat")
    page.wait_for_function("document.getElementById('modelinfo').textContent.includes('threshold')")

    page.set_input_files("#file", str(image))
    page.wait_for_selector("#result", state="visible", timeout=20_000)
    page.wait_for_function(
        "['image', 'gradcam', 'attention'].every("
        "id => { const e = document.getElementById(id); return e.complete && e.naturalWidth > 0; })"
    )
    shown = float(page.get_attribute("#probability", "data-value"))
    want = _api_predict(base_url, image)
    assert shown == pytest.approx(want["probability"], abs=1e-9)
    assert f"{want['probability']:.3f}" in page.inner_text("#probability")
    assert page.inner_text("#label") == want["label"] and page.inner_text("#threshold") == str(want["threshold"])
    assert page.inner_text("#model") == want["model_id"]
    assert page.eval_on_selector("#gradcam", "e => e.naturalWidth") == 320
    assert not page.is_visible("#error")
    # the status as the API gives it (the tiny run's 2 validation images make every set hold both
    # classes: uncertain), said so on the page
    assert want["status"] in ("ok", "uncertain")
    assert page.inner_text("#verdict") == want["status"]
    if want["status"] == "uncertain":
        assert "Uncertain" in page.inner_text("#notice") and page.is_visible("#notice")

    shot = tmp_path / "screenshot.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if UPDATE:
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "screenshot.png")

    # a blank image is out of domain: the page says so, and shows no label, probability bar or map
    blank = g.png_grey8(tmp_path / "blank.png", array=np.full((200, 200), 100, np.uint8))
    page.set_input_files("#file", str(blank))
    page.wait_for_function(
        "() => document.getElementById('status').textContent.startsWith('Done: blank')"
    )  # not 'Analysing'
    assert _api_predict(base_url, blank)["status"] == "out_of_domain"
    assert page.inner_text("#verdict") == "out of domain"
    assert "does not look like a knee radiograph the model knows" in page.inner_text("#notice")
    assert not page.is_visible("#probcard") and not page.is_visible("#labelcard") and not page.is_visible("#probbar")
    assert not page.is_visible("#gradcam") and not page.is_visible("#attention")

    # a dropped non-image: the page says so in plain words and hides the old result
    page.evaluate("""() => {
        const dt = new DataTransfer();
        dt.items.add(new File(["id,label\\n1,normal\\n"], "patients.csv", {type: "text/csv"}));
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""")
    page.wait_for_selector("#error", state="visible", timeout=10_000)
    assert "not an image the model can read" in page.inner_text("#error")
    assert not page.is_visible("#result")
    assert elsewhere == []  # the page fetched nothing from anywhere but its own server


def test_report_opens_offline_with_every_image_and_no_console_error(page, tiny_report, tmp_path):
    """`kneeosteo report` of the tiny run in Chromium: no request leaves the file, no console
    error, every image decoded; the screenshot goes to docs/report.png with KNEEOSTEO_UPDATE_SCREENSHOT=1
    (made from the bundled model on KOP when both are here)."""
    from kneeosteo.reporting import write_report

    kop = REPO.parent / "shared" / "datasets" / "kop"
    bundled = _bundled_run_dir() if UPDATE else None
    if bundled is not None and kop.is_dir():
        html = write_report(bundled, tmp_path / "report.html", data=kop)
    else:
        html = tiny_report
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: None if r.url.startswith(("file:", "data:")) else requests.append(r.url))
    page.goto(html.as_uri())
    page.wait_for_load_state("load")
    n = page.eval_on_selector_all("img", "els => els.length")
    broken = page.eval_on_selector_all(
        "img", "els => els.filter(e => !(e.complete && e.naturalWidth > 0)).map(e => e.alt)"
    )
    assert n >= 8 and broken == []
    assert errors == [] and requests == []
    assert page.eval_on_selector_all("section", "els => els.map(e => e.id)")[0] == "summary"
    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=False)
    assert shot.stat().st_size > 10_000
    if UPDATE:
        shutil.copyfile(shot, REPO / "docs" / "report.png")


def test_the_page_shows_class_probabilities_and_a_t_score_interval(page, hospital):
    """A multiclass run's page lists every class's probability; a T-score run's hides the
    probability card and shows the value with its interval (issue 19)."""
    film = hospital.data / "films" / "p002_left.png"
    for run in (hospital.mc, hospital.reg):
        with serve_in_thread(create_app(WebSettings(run=run, workers=1, queue=1))) as url:
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))  # noqa: B023 (this run's page)
            page.goto(url + "/")
            page.set_input_files("#file", str(film))
            page.wait_for_selector("#result", state="visible", timeout=20_000)
            want = _api_predict(url, film)
            assert page.is_visible("#taskcard") and not errors
            text = page.inner_text("#taskval")
            assert page.inner_text("#label") == want["label"]
            if "probabilities" in want and want["probabilities"]:
                for c, p in want["probabilities"].items():
                    assert f"{c} {p:.3f}" in text
            else:
                assert text.startswith(f"{want['value']:.2f}") and not page.is_visible("#probcard")


def test_the_page_sends_covariates_to_a_run_with_a_fused_model(page, tiny, tmp_path):
    """A run with fused.json (issue 31): the page shows one field per covariate, sends them with
    the film, and shows the fused answer; with one left empty it says image-only and which."""
    from kneeosteo.models.fused import FUSED_FILE, FusedModel
    from kneeosteo.utils.atomic import write_json

    run = tmp_path / "run"
    shutil.copytree(tiny.run, run)
    fused = FusedModel(
        ("age", "sex"),
        (0.0, 60.0, 0.5),
        (1.0, 10.0, 0.5),
        (0.8, 1.2, 0.3),
        -0.4,
        RunDir(run).config.weights_sha256,
        "osteoporosis",
    )
    write_json(run / FUSED_FILE, fused.to_json())
    from kneeosteo.utils.hashing import sha256_file

    RunDir(run).update_record(fused={"sha256": sha256_file(run / FUSED_FILE)})
    film = g.png_grey8(tmp_path / "knee.png", array=g.dataset_image(5, "osteoporosis", size=320))
    with serve_in_thread(create_app(WebSettings(run=run, workers=1, queue=2))) as url:
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.wait_for_selector("#covariates", state="visible")
        page.fill("#covfields input[name=age]", "72")
        page.fill("#covfields input[name=sex]", "female")
        page.set_input_files("#file", str(film))
        page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Done: knee')")
        raw = _api_predict(url, film)["raw_probability"]
        assert page.inner_text("#fused") == f"P {fused.probability(raw, [72, 1.0]):.3f} (image and covariates)"
        page.fill("#covfields input[name=sex]", "")
        page.evaluate("() => { document.getElementById('status').textContent = ''; }")
        page.set_input_files("#file", str(film))
        page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Done: knee')")
        assert page.inner_text("#fused") == "image only: sex missing" and not errors
