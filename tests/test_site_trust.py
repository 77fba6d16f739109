"""Issue 33, trust at a new site: the batch shift alarm (no labels), the site check (labels), the
temperature's two bounds told apart, Mondrian conformal sets, and a reason for every status."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kneeosteo.inference.predictor import Prediction, PredictionResult
from kneeosteo.run import RunDir
from kneeosteo.trust import ConformalClassifier, TemperatureScaler, TrustBundle, sigmoid
from kneeosteo.trust.shift import ALPHA, MIN_SHIFT_IMAGES, ShiftReference, batch_shift


def _ref(seed=0, n_domain=246, n_prob=27):
    rng = np.random.default_rng(seed)
    return ShiftReference().fit(rng.gamma(20, 5, n_domain), rng.beta(0.6, 0.6, n_prob), {})


# -- the alarm -------------------------------------------------------------------------------


def test_alarm_is_quiet_on_batches_drawn_like_the_reference():
    """40 batches of 40 drawn from the reference's own laws: at ALPHA = 0.01 (Bonferroni over two
    comparisons) at most 2 may fire by chance (P(>2) < 0.01 for a valid test)."""
    rng = np.random.default_rng(1)
    ref = _ref()
    fired = [batch_shift(ref, rng.gamma(20, 5, 40), rng.beta(0.6, 0.6, 40)).fired for _ in range(40)]
    assert sum(fired) <= 2


def test_alarm_fires_on_a_batch_further_away_and_on_crowded_probabilities():
    rng = np.random.default_rng(2)
    ref = _ref()
    away = batch_shift(ref, rng.gamma(20, 5, 40) * 1.4, rng.beta(0.6, 0.6, 40))
    assert away.fired and away.p_value <= ALPHA and away.n == 40
    assert away.tests["domain_score"]["p_value"] < away.tests["probability"]["p_value"]
    crowded = batch_shift(ref, rng.gamma(20, 5, 40), rng.beta(8, 1, 40))  # every film called positive
    assert crowded.fired and "probabilities" in crowded.note
    d = crowded.to_dict()
    assert {"verdict", "statistic", "p_value", "n", "min_n", "alpha"} <= set(d) and json.dumps(d)


def test_a_batch_closer_to_the_training_films_is_no_alarm():
    """The domain comparison is one-sided: smaller distances than held-out ones are no reason to
    doubt an answer (planted: two-sided KS on the domain scores fires here)."""
    rng = np.random.default_rng(3)
    closer = batch_shift(_ref(), rng.gamma(20, 5, 60) * 0.6, rng.beta(0.6, 0.6, 60))
    assert not closer.fired and closer.tests["domain_score"]["p_value"] > 0.5


def test_too_few_images_never_fire_and_no_reference_says_unavailable():
    rng = np.random.default_rng(4)
    n = MIN_SHIFT_IMAGES - 1
    tiny = batch_shift(_ref(), rng.gamma(20, 5, n) * 5, np.ones(n))
    assert tiny.verdict == "too few images" and not tiny.fired and tiny.p_value is None
    assert batch_shift(None, rng.gamma(20, 5, 50), rng.random(50)).verdict == "unavailable"
    half = batch_shift(ShiftReference().fit(None, rng.beta(0.6, 0.6, 27), {}), rng.gamma(20, 5, 50), rng.beta(8, 1, 50))
    assert half.fired and set(half.tests) == {"probability"} and "no reference distances" in half.note


def _bundle(shift=None, site=None, coverage=0.9):
    rng = np.random.default_rng(5)
    z = rng.normal(0, 2, 200)
    y = (rng.random(200) < sigmoid(z)).astype(int)
    cal = TemperatureScaler(1.0).fit(z, y)
    conformal = ConformalClassifier(coverage).fit(cal.transform(z), y)
    return TrustBundle(cal, 0.5, "0.5", conformal, None, ("normal", "osteoporosis"), {}, shift, site), z, y


def test_an_older_run_recovers_its_calibration_probabilities_from_the_conformal_scores():
    bundle, z, y = _bundle()
    ref = bundle.shift_reference
    assert ref.domain_scores_ is None
    np.testing.assert_allclose(ref.probabilities_, sigmoid(z), atol=1e-12)


def test_assess_batch_marks_ok_rows_uncertain_with_the_reason_when_it_fires():
    from kneeosteo.inference.batch import assess_batch

    rng = np.random.default_rng(6)
    bundle, _, _ = _bundle(ShiftReference().fit(rng.gamma(20, 5, 246), rng.beta(0.6, 0.6, 27), {}))

    def rows(scale):
        return PredictionResult(
            [
                Prediction(
                    f"{i}.png",
                    "c",
                    "ok" if i % 2 else "out_of_domain",
                    0.5,
                    0.5,
                    "normal",
                    ("normal",),
                    float(d),
                    150.0,
                    True,
                    0.5,
                    "m",
                    status_reason="x",
                )
                for i, d in enumerate(rng.gamma(20, 5, 40) * scale)
            ]
        )

    quiet = rows(1.0)
    quiet.predictions = [
        p.__class__(**{**p.__dict__, "probability": float(v)})
        for p, v in zip(quiet.predictions, rng.beta(0.6, 0.6, 40))
    ]
    assert not assess_batch(quiet, bundle).fired and all(p.status_reason == "x" for p in quiet.predictions)
    shifted = rows(2.0)
    s = assess_batch(shifted, bundle)
    assert s.fired and shifted.batch_shift["verdict"] == "shift"
    assert {p.status for p in shifted.predictions} == {"uncertain", "out_of_domain"}
    assert all(p.status_reason.startswith("batch shift") for p in shifted.predictions if p.status == "uncertain")


# -- temperature: two bounds, two reasons ----------------------------------------------------


def test_temperature_bounds_say_which_way_they_ran():
    from kneeosteo.experiments.trust_fit import temperature_fit

    y = np.array([0, 1] * 15)
    separable = np.where(y == 1, 4.0, -4.0) + np.linspace(-0.5, 0.5, 30)
    cal, note = temperature_fit(separable, y)
    assert cal.temperature_ == 1.0 and "lower bound" in note and "separate these images perfectly" in note
    reversed_ = -separable
    cal, note = temperature_fit(reversed_, y)
    assert cal.temperature_ == 1.0 and "upper bound" in note and "flat or reversed" in note
    assert "separable" not in note
    rng = np.random.default_rng(7)
    z = rng.normal(0, 1.5, 400)
    yy = (rng.random(400) < sigmoid(z / 2.0)).astype(int)
    cal, note = temperature_fit(z, yy)
    assert note == "fitted on 400 images" and cal.temperature_ == pytest.approx(2.0, rel=0.35)


# -- the site check --------------------------------------------------------------------------


def test_site_check_no_signal_when_the_auc_interval_holds_one_half():
    from kneeosteo.experiments.trust_fit import site_check

    bundle, _, _ = _bundle()
    rng = np.random.default_rng(8)
    y = np.array([0, 1] * 20)
    flat = site_check(bundle, np.repeat(rng.normal(0, 2, 20), 2), y, bundle.classes, 0.5)  # AUC exactly 0.5
    assert flat["verdict"] == "no signal at this site" and "includes 0.5" in flat["reason"]
    lo, hi = flat["auc"]["ci_low"], flat["auc"]["ci_high"]
    assert lo <= 0.5 <= hi
    good = site_check(bundle, np.where(y == 1, 2.0, -2.0) + rng.normal(0, 1, 40), y, bundle.classes, 0.5)
    assert good["verdict"] == "signal" and good["auc"]["ci_low"] > 0.5
    assert set(good["coverage"]) >= {"overall", "normal", "osteoporosis", "target"}
    backwards = site_check(bundle, np.where(y == 1, -3.0, 3.0) + rng.normal(0, 1, 40), y, bundle.classes, 0.5)
    assert backwards["verdict"] == "no signal at this site" and "wrong way round" in backwards["reason"]
    # a bundle carrying that verdict answers uncertain, with the reason, for every in-domain image
    muted, _, _ = _bundle(site=flat)
    for z in (-8.0, 0.0, 8.0):
        t = muted.predict(z)
        assert t.status == "uncertain" and t.status_reason == flat["reason"]
    assert _bundle(site=good)[0].predict(8.0).status == "ok"


def _relabelled_site(data: Path, out: Path, swap: bool) -> Path:
    """tiny's films, labels swapped (the model's signal reversed at this 'site') or kept."""
    for cls in ("normal", "osteoporosis"):
        dest = out / (({"normal": "osteoporosis", "osteoporosis": "normal"}[cls]) if swap else cls)
        dest.mkdir(parents=True, exist_ok=True)
        for f in sorted((data / cls).iterdir()):
            shutil.copy(f, dest / f.name)
    return out


def test_calibrate_on_a_site_without_signal_marks_every_prediction_uncertain(tiny, tmp_path, capsys, one_thread):
    """The tiny model at a 'site' whose labels are the other way round: the site check prints
    its verdict first, the run it writes answers `uncertain` for every in-domain film with the
    reason, in CSV and JSON (planted: ignoring ``site_check`` in TrustBundle.predict fails here)."""
    from kneeosteo.interfaces.cli import main

    site = _relabelled_site(tiny.data, tmp_path / "site", swap=True)
    with pytest.raises(SystemExit) as e:
        main(
            [
                "calibrate",
                str(tiny.run),
                str(site),
                "--out",
                str(tmp_path / "new"),
                "--coverage",
                "0.8",
                "--class-conditional",
                "--domain-acceptance",
                "0.97",
            ]
        )
    assert e.value.code == 0
    out = capsys.readouterr().out.splitlines()
    # the new run's [trust] settings are the ones it was calibrated with; the source run keeps its own
    got = RunDir(tmp_path / "new").config.settings
    assert (got["coverage"], got["domain_acceptance"], got["operating_point"]) == (0.8, 0.97, "0.5")
    assert RunDir(tiny.run).config.settings["domain_acceptance"] == 0.95
    assert out[0].startswith("site check: NO SIGNAL AT THIS SITE")
    new = RunDir(tmp_path / "new")
    assert new.trust.site_check["verdict"] == "no signal at this site"
    assert new.trust.conformal.class_conditional is True
    assert json.loads(new.trust_file.read_text())["pieces"]["conformal"]["class_conditional"] is True
    preds = tmp_path / "p.csv"
    with pytest.raises(SystemExit) as e:
        main(["predict", str(site), "--run", str(new.path), "--out", str(preds)])
    assert e.value.code == 0
    with preds.open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(r["status"] == "uncertain" for r in rows)
    assert all(r["status_reason"].startswith("no signal at this site") for r in rows)
    side = json.loads((tmp_path / "p.batch_shift.json").read_text())["batch_shift"]
    assert side["n"] == len(rows) and side["verdict"] in ("shift", "no shift detected", "too few images")


def test_predict_json_and_api_carry_the_batch_shift_and_the_reasons(tiny, tmp_path, one_thread):
    from fastapi.testclient import TestClient

    from kneeosteo.interfaces.cli import main
    from kneeosteo.interfaces.web import WebSettings, create_app

    out = tmp_path / "p.json"
    with pytest.raises(SystemExit) as e:
        main(["predict", str(tiny.data), "--run", str(tiny.run), "--out", str(out)])
    assert e.value.code == 0
    doc = json.loads(out.read_text())
    n = len(doc["predictions"])
    assert doc["batch_shift"]["n"] == n and "status_reason" in doc["columns"]
    assert doc["batch_shift"]["verdict"] == (
        "too few images" if n < MIN_SHIFT_IMAGES else doc["batch_shift"]["verdict"]
    )
    assert all(p["status_reason"] for p in doc["predictions"])
    client = TestClient(create_app(WebSettings(run=tiny.run, workers=1, queue=1)))
    image = sorted((tiny.data / "normal").iterdir())[0]
    body = client.post("/api/predict", files={"file": (image.name, image.read_bytes(), "image/png")}).json()
    assert body["status_reason"]
    shift = client.get("/api/model").json()["batch_shift"]
    assert shift["n"] == 1 and shift["verdict"] == "too few images" and shift["min_n"] == MIN_SHIFT_IMAGES
    # the session's window: 40 more requests all answered with probability 1 are a shift
    service = client.app.state.service
    with service._recent_lock:
        service._recent.extend([(None, 1.0)] * 40)
        service._seen += 40
    shift = client.get("/api/model").json()["batch_shift"]
    assert shift["n"] == 41 and shift["verdict"] == "shift" and shift["requests_seen"] == 41


# -- Mondrian sets -----------------------------------------------------------------------------


def test_mondrian_sets_cover_each_class_where_marginal_sets_do_not():
    """Class 0 easy, class 1 hard: one quantile for both under-covers the hard class; one per
    class covers each near the target (planted: ignoring class_conditional fails here)."""
    rng = np.random.default_rng(9)

    def draw(n):
        y = rng.integers(0, 2, n)
        p = np.where(y == 0, rng.beta(1, 12, n), rng.beta(3, 2.5, n))
        return p, y

    pc, yc = draw(2000)
    pt, yt = draw(4000)
    for cond, check in ((False, lambda c1: c1 < 0.85), (True, lambda c1: abs(c1 - 0.9) < 0.03)):
        cc = ConformalClassifier(0.9, class_conditional=cond).fit(pc, yc)
        m = cc.predict_mask(pt)
        hit = m[np.arange(yt.size), yt]
        c0, c1 = hit[yt == 0].mean(), hit[yt == 1].mean()
        assert check(c1), (cond, c0, c1)
        if cond:
            assert abs(c0 - 0.9) < 0.03


def test_evaluate_reports_the_batch_shift_and_coverage_per_class(tiny, tmp_path, one_thread):
    from kneeosteo.evaluation.evaluate import evaluate_run
    from kneeosteo.interfaces.cli import trust_summary

    metrics, _ = evaluate_run(tiny.run, tiny.data, out=tmp_path / "ev")
    t = metrics["trust"]
    assert t["batch_shift"]["n"] == t["n"]
    assert t["batch_shift"]["verdict"] == (
        "too few images" if t["n"] < MIN_SHIFT_IMAGES else t["batch_shift"]["verdict"]
    )
    per = t["conformal_coverage_per_class"]
    assert set(per) == {"normal", "osteoporosis"}
    # the overall coverage is the class-weighted mean of the per-class ones
    counts = metrics["counts"]
    n_pos, n_neg = counts["tp"] + counts["fn"], counts["tn"] + counts["fp"]
    assert t["conformal_coverage"] == pytest.approx(
        (per["normal"] * n_neg + per["osteoporosis"] * n_pos) / (n_pos + n_neg)
    )
    lines = "\n".join(trust_summary(t))
    assert "coverage per class" in lines and "batch shift over these" in lines


def test_report_shows_the_batch_shift_and_the_coverage_per_class(tiny_report):
    html = Path(tiny_report).read_text()
    assert "Batch shift alarm on these" in html and "Coverage per class" in html


def test_a_non_finite_shift_reference_is_refused():
    with pytest.raises(ValueError, match="NaN or inf"):
        ShiftReference.from_state({"domain_scores": np.array([1.0, np.nan])})
    with pytest.raises(ValueError, match="empty"):
        ShiftReference.from_state({"probabilities": np.zeros(0)})
