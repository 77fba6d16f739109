"""`kneeosteo report`: one self-contained page of evidence (issue 16).

The tiny session run (conftest.tiny) is reported once per module; the tests parse the HTML and
check each section, the absence of any external reference, the error gallery's contents and
order, the saliency sanity check, the reproducibility facts and the checklist. Chromium prints
the PDF where it is installed (a failure under CI=true where it is not)."""

from __future__ import annotations

import csv
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import require
from kneeosteo.errors import DataError
from kneeosteo.models import build_model
from kneeosteo.reporting import write_report
from kneeosteo.reporting.checklist import ITEMS
from kneeosteo.reporting.gallery import select_cases
from kneeosteo.reporting.pdf import ChromiumMissingError, find_chromium, page_count
from kneeosteo.reporting.run_report import SECTIONS
from kneeosteo.reporting.sanity import randomised_copy, rank_correlation, sanity_check, verdict
from kneeosteo.run import RunDir
from kneeosteo.utils.hashing import sha256_file


class Page(HTMLParser):
    """Every tag's attributes, the ids, and the text of each section."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.ids: set[str] = set()
        self.text: dict[str, list[str]] = {}
        self._section: str | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "section":
            self._section = a.get("id")

    def handle_data(self, data):
        if self._section:
            self.text.setdefault(self._section, []).append(data)

    def section(self, sid: str) -> str:
        return " ".join(" ".join(self.text.get(sid, [])).split())


@pytest.fixture(scope="module")
def report(tiny_report):
    html = tiny_report.read_text()
    return tiny_report, html, Page(html)


def _predictions(run: Path) -> list[dict]:
    with open(RunDir(run).predictions_file, newline="") as fh:
        return list(csv.DictReader(fh))


def test_every_section_in_order_and_none_missing(report):
    _, html, page = report
    ids = [a["id"] for t, a in page.tags if t == "section"]
    assert ids == [sid for sid, _ in SECTIONS]
    for sid in ids:  # a section that could not be filled says so; the tiny run has everything
        assert "Not in this report" not in page.section(sid), sid


def test_no_external_reference_and_every_link_lands(report):
    _, html, page = report
    for tag, a in page.tags:
        assert tag not in ("link", "script", "iframe", "object", "embed"), tag
        for attr in ("src", "href", "srcset", "action", "data"):
            v = a.get(attr)
            if v is None:
                continue
            assert v.startswith(("data:image/png;base64,", "data:image/jpeg;base64,", "#")), (tag, attr, v[:60])
            if v.startswith("#"):
                assert v[1:] in page.ids, v  # internal links land on an element
    assert "url(" not in html and "@import" not in html
    imgs = [a for t, a in page.tags if t == "img"]
    assert len(imgs) >= 8 and all(a.get("alt") for a in imgs)


def test_summary_and_performance_carry_the_runs_numbers(tiny, report):
    _, _, page = report
    m = json.loads(RunDir(tiny.run).metrics_file.read_text())
    summary = page.section("summary")
    assert RunDir(tiny.run).model_id in summary and "Research use only" in summary
    acc = m["accuracy"]
    assert f"{acc['value']:.3f} [{acc['ci_low']:.3f}, {acc['ci_high']:.3f}]" in summary
    perf = page.section("performance")
    c = m["counts"]
    assert f"TP {c['tp']}, FP {c['fp']}, FN {c['fn']}, TN {c['tn']}" in perf
    auc = m["auc"]
    assert f"{auc['value']:.3f} [{auc['ci_low']:.3f}, {auc['ci_high']:.3f}]" in perf


def test_probe_section_carries_the_runs_within_source_auc(tiny, report):
    _, _, page = report
    w = json.loads(RunDir(tiny.run).metrics_file.read_text())["shortcut_probes"]["within_source"]
    probes = page.section("probes")
    assert "auc" in w  # the generated films are one source holding both classes
    assert (
        f"AUC within one source {w['auc']:.3f} [{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}] ({w['pairs']} pairs" in probes
    )


def test_data_flow_counts_add_up_to_the_split(tiny, report):
    _, _, page = report
    doc = json.loads(RunDir(tiny.run).split_file.read_text())
    flow = page.section("data-flow")
    total = sum(len(doc[p]) for p in ("train", "val", "test")) + len(doc["excluded"])
    assert f"files read {total}" in flow and "unreadable 0" in flow
    for part, name in (("train", "training"), ("val", "validation"), ("test", "test")):
        n_pos = sum(p.split("/")[0] == doc["positive_class"] for p in doc[part])
        assert f"{name} {len(doc[part])}" in flow and f"{doc['positive_class']}: {n_pos}" in flow


def test_error_gallery_shows_every_wrong_image_false_negatives_first(tiny, report):
    _, _, page = report
    rows = _predictions(tiny.run)
    wrong = {r["path"] for r in rows if r["label"] != r["prediction"]}
    cases = [(a["data-kind"], a["data-path"]) for t, a in page.tags if t == "div" and "data-kind" in a]
    kinds = [k for k, _ in cases]
    assert {p for k, p in cases if k.startswith("false")} == wrong  # every wrong image, nothing else
    assert sum(k.startswith("true") for k in kinds) == min(2, len(rows) - len(wrong))  # correct=2
    order = {"false negative": 0, "false positive": 1, "true positive": 2, "true negative": 3}
    assert [order[k] for k in kinds] == sorted(order[k] for k in kinds)  # false negatives first
    pictures = [a for t, a in page.tags if t == "img" and a.get("alt", "").split(":")[0] in order]
    assert len(pictures) == len(cases)


def test_case_selection_order():
    rows = [
        {"path": p, "label": y, "probability": q, "prediction": int(q >= 0.5)}
        for p, y, q in (
            ("fn_mild", 1, 0.4),
            ("fn_bad", 1, 0.05),
            ("fp_mild", 0, 0.6),
            ("fp_bad", 0, 0.97),
            ("tp1", 1, 0.9),
            ("tp2", 1, 0.99),
            ("tn1", 0, 0.2),
            ("tn2", 0, 0.01),
        )
    ]
    cases = select_cases(rows, correct=2)
    assert [c.path for c in cases] == ["fn_bad", "fn_mild", "fp_bad", "fp_mild", "tp2", "tn2"]
    assert [c.kind for c in cases][:4] == ["false negative"] * 2 + ["false positive"] * 2
    assert len(select_cases(rows, correct=0)) == 4


def test_rank_correlation():
    a = np.arange(49.0).reshape(7, 7)
    assert rank_correlation(a, a * 3 + 1) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    assert math.isnan(rank_correlation(a, np.zeros_like(a))) and math.isnan(rank_correlation(a, None))
    with pytest.raises(ValueError, match="differ in shape"):
        rank_correlation(a, np.zeros((3, 3)))


def test_randomised_copy_changes_trained_weights_only():
    torch.manual_seed(0)
    model, _ = build_model("efficientnet_lite0")
    twin = randomised_copy(model, seed=1)
    for (k, v), (_k2, v2) in zip(model.state_dict().items(), twin.state_dict().items()):
        if k.startswith("backbone."):
            assert torch.equal(v, v2), k  # the frozen pretrained backbone is not what training learned
    changed = [k for k, v in model.head.state_dict().items() if not torch.equal(v, twin.head.state_dict()[k])]
    assert any(k.endswith("weight") for k in changed)
    att = dict(model.attention.named_parameters())
    assert any(not torch.equal(att[k], v) for k, v in twin.attention.named_parameters())
    again = randomised_copy(model, seed=1)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in twin.state_dict().items())  # seeded


class _FakeExplainer:
    """Maps that are the image itself (weight-independent) or seeded noise (weight-dependent)."""

    def __init__(self, kind: str, seed: int = 0):
        self.kind, self.rng = kind, np.random.default_rng(seed)

    def explain(self, pixels):
        from types import SimpleNamespace

        m = pixels[::4, ::4] if self.kind == "image" else self.rng.random(pixels[::4, ::4].shape)
        return SimpleNamespace(gradcam_raw=m, attention_raw=m)


def test_sanity_check_tells_a_weight_blind_map_from_a_learned_one():
    rng = np.random.default_rng(0)
    images = [(f"i{k}", rng.random((32, 32))) for k in range(6)]

    def explained(fake):
        return [(n, px, fake.explain(px)) for n, px in images]

    blind = sanity_check(explained(_FakeExplainer("image")), _FakeExplainer("image"))
    assert blind["gradcam"]["median"] == pytest.approx(1.0) and verdict(blind["gradcam"]).startswith("fails")
    learned = sanity_check(explained(_FakeExplainer("noise", 1)), _FakeExplainer("noise", 2))
    assert abs(learned["gradcam"]["median"]) < 0.3 and verdict(learned["gradcam"]).startswith("passes")
    assert [r["path"] for r in learned["images"]] == [n for n, _ in images]
    assert verdict({"n": 0}).startswith("undefined")


def test_sanity_check_in_the_report_covers_every_gallery_image(report):
    """The table's image counts (defined + constant maps) equal the gallery's, and each case shows
    its own rho: the check ran on the images shown, not on a fixed or empty set."""
    import re

    _, html, page = report
    text = page.section("explanations")
    assert "Saliency sanity check" in text and any(v in text for v in ("passes:", "weak:", "fails:", "undefined:"))
    cases = [a for t, a in page.tags if t == "div" and "data-kind" in a]
    row = re.search(r"<tr><td>Grad-CAM</td><td class=\"n\">(\d+)(?: \(\+(\d+) constant\))?</td>", html)
    assert row and int(row.group(1)) + int(row.group(2) or 0) == len(cases) > 0
    assert text.count("sanity rho: Grad-CAM") == len(cases)


def test_reproducibility_names_the_exact_files(tiny, report):
    _, _, page = report
    run = RunDir(tiny.run)
    text = page.section("reproducibility")
    assert run.config.weights_sha256 in text and sha256_file(run.split_file) in text
    assert "kneeosteo train" in text and "--config settings.toml" in text
    assert f"seed = {run.config.settings['seed']}" in text and "torch" in text


def test_checklist_answers_or_flags_every_item(report):
    _, _, page = report
    text = page.section("checklist")
    for it in ITEMS:
        assert it.topic in text
    assert text.count("not available from the data") >= sum(it.section is None for it in ITEMS)


def test_markup_in_names_is_escaped(tmp_path):
    grid = tmp_path / "grid"
    (grid / "cells").mkdir(parents=True)
    evil = "<script>alert(1)</script>"
    (grid / "table1.json").write_text(
        json.dumps({"info": {"reference": evil, "seeds": [0]}, "rows": [{"model": "x", "title": evil, "seeds": 0}]})
    )
    html = write_report(grid, tmp_path / "r.html").read_text()
    assert evil not in html and "&lt;script&gt;" in html


def test_missing_data_folder_is_a_clear_error(tiny, tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        write_report(tiny.run, tmp_path / "r.html", data=tmp_path / "nowhere")


def test_pdf_without_chromium_fails_before_any_work(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("KNEEOSTEO_CHROMIUM", str(tmp_path / "no-such-chromium"))
    with pytest.raises(ChromiumMissingError, match="apt-get install chromium"):
        write_report(tiny.run, tmp_path / "r.html", pdf=tmp_path / "r.pdf", data=tiny.data)
    assert not (tmp_path / "r.html").exists()


def test_pdf_prints_the_same_page(report, tmp_path):
    require(find_chromium() is not None, "Chromium is not installed: apt-get install chromium to print the PDF")
    from kneeosteo.reporting.pdf import print_pdf

    html, _, _ = report
    pdf = print_pdf(html, tmp_path / "report.pdf")
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert 4 <= page_count(pdf) <= 30  # nine sections, each printed from a new page


def test_the_retrain_command_is_shell_quoted(tmp_path):
    """Issue 28 row 13: a data path with a quote or a space, pasted from the report, is one argument."""
    import shlex
    from types import SimpleNamespace

    from kneeosteo.reporting.run_report import reproducibility_section

    (tmp_path / "config.json").write_text("{}")
    data = "/data/o'brien knees; rm -rf ~"
    cfg = SimpleNamespace(settings={"seed": 0}, record={"data": data}, weights_sha256="0" * 64)
    run = SimpleNamespace(
        config=cfg,
        path=tmp_path / "my run",
        split_file=tmp_path / "none.json",
        config_file=tmp_path / "config.json",
        trust_file=tmp_path / "none.json",
    )
    argv = shlex.split(reproducibility_section(run)["command"])
    assert argv[:3] == ["kneeosteo", "train", data] and argv[-2:] == ["--out", "my run"]
