"""kneeosteo.trust on synthetic data with known answers: calibration, operating point,
conformal sets, decision curves, the domain check and the combined prediction (issue 15)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.covariance import LedoitWolf

from kneeosteo.errors import ConfigError, DataError
from kneeosteo.trust import (
    ConformalClassifier,
    DomainCheck,
    PlattScaler,
    TemperatureScaler,
    abstention_rate,
    brier_score,
    calibration_slope_intercept,
    calibrator_from_state,
    choose_threshold,
    decision_curve,
    empirical_coverage,
    expected_calibration_error,
    expected_calibration_error_interval,
    parse_operating_point,
    pixel_problems,
    reliability_diagram,
    sigmoid,
    trusted_prediction,
)


def _binary(n, seed, scale=1.5):
    """True logits z, outcomes y ~ Bernoulli(sigmoid(z)): sigmoid(z) is perfectly calibrated."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, scale, n)
    return z, (rng.random(n) < sigmoid(z)).astype(int)


# -- calibration --------------------------------------------------------------------------------


def _json_round_trip(state: dict) -> dict:
    """An estimator's state through JSON (its plain values) and fresh copies (its arrays), as the
    run folder stores it."""
    arrays = {k: np.array(v) for k, v in state.items() if isinstance(v, np.ndarray)}
    plain = json.loads(json.dumps({k: v for k, v in state.items() if k not in arrays}))
    return {**plain, **arrays}


def test_temperature_scaling_recovers_a_known_temperature():
    z, y = _binary(20000, 0)
    cal = TemperatureScaler()
    t = cal.fit(2.5 * z, y).temperature_  # a model 2.5x overconfident
    assert abs(t - 2.5) / 2.5 < 0.05
    assert np.allclose(cal.transform(2.5 * z), sigmoid(z), atol=0.02)
    back = calibrator_from_state(json.loads(json.dumps(cal.get_state())))
    assert isinstance(back, TemperatureScaler) and back.temperature_ == cal.temperature_


def test_platt_scaling_undoes_scale_and_shift():
    z, y = _binary(20000, 1)
    cal = PlattScaler()
    cal.fit(0.5 * z + 1.0, y)  # sigmoid(a * (0.5 z + 1) + b) = sigmoid(z) at a=2, b=-2
    a, b = cal.a_, cal.b_
    assert a == pytest.approx(2.0, rel=0.08) and b == pytest.approx(-2.0, abs=0.15)
    back = calibrator_from_state(cal.get_state())
    assert np.array_equal(back.transform(z), cal.transform(z))


def test_calibration_needs_both_classes():
    with pytest.raises(DataError, match="both classes"):
        TemperatureScaler().fit([0.1, 2.0, -1.0], [1, 1, 1])


def test_ece_is_near_zero_when_calibrated_and_large_when_overconfident():
    z, y = _binary(20000, 2)
    assert expected_calibration_error(sigmoid(z), y) < 0.02
    assert expected_calibration_error(sigmoid(4 * z), y) > 0.08


def test_ece_bootstrap_interval_brackets_the_estimate_and_shrinks_with_n():
    z, y = _binary(4000, 3)
    p = sigmoid(3 * z)
    ece, lo, hi = expected_calibration_error_interval(p, y, n_boot=200)
    assert lo <= ece <= hi and hi - lo < 0.06
    _, lo_s, hi_s = expected_calibration_error_interval(p[:400], y[:400], n_boot=200)
    assert hi_s - lo_s > hi - lo


def test_reliability_diagram_agrees_with_sklearn_and_ece():
    z, y = _binary(3000, 4)
    p = sigmoid(2 * z)
    rd = reliability_diagram(p, y, n_bins=10)
    assert rd.counts.sum() == p.size and rd.centres[0] == pytest.approx(0.05)
    true, pred = calibration_curve(y, p, n_bins=10, strategy="uniform")
    full = rd.counts > 0
    assert np.allclose(rd.observed[full], true) and np.allclose(rd.mean_predicted[full], pred)
    ece = np.nansum(rd.counts / p.size * np.abs(rd.observed - rd.mean_predicted))
    assert ece == pytest.approx(expected_calibration_error(p, y, n_bins=10))
    json.dumps(rd.to_dict())


def test_brier_score_of_perfect_and_coin_predictions():
    y = np.array([0, 1, 1, 0])
    assert brier_score(y.astype(float), y) == 0.0
    assert brier_score(np.full(4, 0.5), y) == pytest.approx(0.25)


def test_calibration_slope_and_intercept():
    z, y = _binary(20000, 5)
    fit = calibration_slope_intercept(sigmoid(z), y)
    assert fit.slope == pytest.approx(1.0, abs=0.06) and fit.intercept == pytest.approx(0.0, abs=0.06)
    over = calibration_slope_intercept(sigmoid(3 * z), y)
    assert over.slope == pytest.approx(1 / 3, abs=0.04)
    high = calibration_slope_intercept(sigmoid(z + 1.0), y)  # predicts too high everywhere
    assert high.intercept == pytest.approx(-1.0, abs=0.1) and high.slope == pytest.approx(1.0, abs=0.06)


# -- operating point ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,kind,value",
    [
        ("youden", "youden", None),
        (" Youden ", "youden", None),
        ("sensitivity=0.9", "sensitivity", 0.9),
        ("specificity = 0.85", "specificity", 0.85),
        ("0.5", "fixed", 0.5),
        ("sensitivity=1", "sensitivity", 1.0),
    ],
)
def test_operating_point_parses(text, kind, value):
    op = parse_operating_point(text)
    assert (op.kind, op.value) == (kind, value)
    assert parse_operating_point(str(op)) == op


@pytest.mark.parametrize(
    "text",
    [
        "",
        "yuoden",
        "sensitivity",
        "sensitivity=",
        "sensitivity=1.5",
        "specificity=0",
        "recall=0.9",
        "1.5",
        "0",
        "1",
        "nan",
        "inf",
        "-0.2",
        "0.5x",
    ],
)
def test_a_bad_operating_point_is_a_config_error_naming_the_forms(text):
    with pytest.raises(ConfigError, match="youden, sensitivity=X, specificity=X"):
        parse_operating_point(text)


def _sens_spec(p, y, t):
    pos = p >= t
    return pos[y == 1].mean(), (~pos)[y == 0].mean()


def test_operating_points_meet_their_targets_and_youden_is_the_brute_force_best():
    z, y = _binary(600, 6, scale=1.0)
    p = sigmoid(z)
    cands = np.unique(p)
    t = choose_threshold(p, y, "sensitivity=0.9")
    sens, spec = _sens_spec(p, y, t)
    assert sens >= 0.9  # and no threshold keeping that sensitivity has a better specificity:
    assert spec == max(_sens_spec(p, y, c)[1] for c in cands if _sens_spec(p, y, c)[0] >= 0.9)
    t = choose_threshold(p, y, "specificity=0.9")
    sens, spec = _sens_spec(p, y, t)
    assert spec >= 0.9
    assert sens == max(_sens_spec(p, y, c)[0] for c in cands if _sens_spec(p, y, c)[1] >= 0.9)
    best = max(sum(_sens_spec(p, y, c)) - 1 for c in cands)
    assert sum(_sens_spec(p, y, choose_threshold(p, y, "youden"))) - 1 == pytest.approx(best, abs=1e-12)
    assert choose_threshold(p, y, "0.5") == 0.5
    assert math.isfinite(choose_threshold(p, y, "specificity=1"))


# -- conformal ----------------------------------------------------------------------------------


@pytest.mark.parametrize("class_conditional", [False, True])
def test_conformal_coverage_on_fresh_scores_is_the_target(class_conditional):
    cover, abstain = [], []
    for seed in range(12):
        z, y = _binary(2300, 100 + seed, scale=1.2)
        p = sigmoid(z)
        cc = ConformalClassifier(0.9, class_conditional=class_conditional).fit(p[:300], y[:300])
        sets = cc.predict(p[300:])
        cover.append(empirical_coverage(sets, y[300:]))
        abstain.append(abstention_rate(sets))
        if class_conditional:  # coverage within each class
            m = cc.predict_mask(p[300:])
            assert m[y[300:] == 1, 1].mean() > 0.83 and m[y[300:] == 0, 0].mean() > 0.83
    assert abs(np.mean(cover) - 0.9) < 0.025
    assert 0.05 < np.mean(abstain) < 0.9  # some, not all, images are uncertain


def test_conformal_sets_are_crepes_sets_and_round_trip():
    z, y = _binary(500, 7)
    p = sigmoid(z)
    for cond in (False, True):
        cc = ConformalClassifier(0.85, class_conditional=cond).fit(p[:200], y[:200])
        test = np.concatenate([p[200:], cc.calibration_scores_, 1 - cc.calibration_scores_])  # ties included
        assert np.array_equal(cc.predict_mask(test), cc.p_values(test) >= 1 - 0.85)
        back = ConformalClassifier.from_state(_json_round_trip(cc.get_state()))
        assert back.predict(test) == cc.predict(test)
    assert set(cc.predict(p)) <= {("normal",), ("osteoporosis",), ("normal", "osteoporosis"), ()}


def test_conformal_with_too_few_calibration_images_keeps_both_classes():
    cc = ConformalClassifier(0.95).fit([0.2, 0.8, 0.7], [0, 1, 1])  # 1/(n+1) = 0.25 >= 0.05
    assert np.isinf(cc.quantiles_).all() and cc.predict([0.01, 0.99]) == [("normal", "osteoporosis")] * 2
    with pytest.raises(ConfigError, match="coverage"):
        ConformalClassifier(1.0).fit([0.2, 0.8, 0.7], [0, 1, 1])


# -- decision curve -----------------------------------------------------------------------------


def test_decision_curve_lines():
    z, y = _binary(1000, 8)
    p = sigmoid(z)
    dc = decision_curve(p, y)
    prev = y.mean()
    pt = dc.thresholds
    assert np.allclose(dc.treat_all, prev - (1 - prev) * pt / (1 - pt)) and np.all(dc.treat_none == 0)
    i = int(np.flatnonzero(np.isclose(pt, 0.3))[0])  # brute force at one threshold
    tp, fp = np.sum((p >= 0.3) & (y == 1)), np.sum((p >= 0.3) & (y == 0))
    assert dc.model[i] == pytest.approx(tp / y.size - fp / y.size * 0.3 / 0.7)
    assert np.all(dc.model[(pt > 0.2) & (pt < 0.8)] > np.maximum(dc.treat_all, 0)[(pt > 0.2) & (pt < 0.8)])
    with pytest.raises(ConfigError):
        decision_curve(p, y, thresholds=[0.0, 0.5])


# -- domain check -------------------------------------------------------------------------------


def _in_domain(n, d, seed):
    basis = np.random.default_rng(42).normal(size=(d, d)) / np.sqrt(d)  # fixed correlation
    scales = np.linspace(0.1, 10.0, d)  # very unequal feature scales
    return (np.random.default_rng(seed).normal(size=(n, d)) @ basis) * scales + 3.0


@pytest.mark.parametrize("method", ["mahalanobis", "knn"])
def test_domain_check_accepts_in_domain_and_rejects_shifted_and_noise(method):
    d = 40
    dc = DomainCheck(method, acceptance=0.95).fit(_in_domain(300, d, 1))  # out-of-fold threshold
    fresh = dc.distance(_in_domain(3000, d, 2))
    assert 0.91 <= np.mean(fresh <= dc.threshold_) <= 0.99
    x = _in_domain(500, d, 3)
    shifted = x + 3.0 * x.std(axis=0)  # every feature moved by three of its standard deviations
    noise = np.random.default_rng(4).normal(0.0, 5.0, (500, d))
    assert np.mean(dc.distance(shifted) > dc.threshold_) >= 0.99
    assert np.mean(dc.distance(noise) > dc.threshold_) >= 0.99
    back = DomainCheck.from_state(_json_round_trip(dc.get_state()))
    probe = np.concatenate([x[:50], shifted[:50], noise[:50]])
    assert np.array_equal(back.distance(probe), dc.distance(probe)) and back.threshold_ == dc.threshold_
    assert all(isinstance(v, np.ndarray) for v in dc.arrays_.values())


def test_domain_threshold_from_in_sample_distances_would_be_too_strict():
    """In high dimension the fitted vectors sit closer than new ones; out-of-fold fixes it."""
    d = 150
    x = _in_domain(120, d, 5)  # fewer images than features, as with real backbone features
    dc = DomainCheck().fit(x)
    fresh = dc.distance(_in_domain(2000, d, 6))
    assert np.mean(fresh <= np.quantile(dc.distance(x), 0.95)) < 0.8  # the bug this design avoids
    assert np.mean(fresh <= dc.threshold_) >= 0.9
    held = DomainCheck().fit(x, heldout_features=_in_domain(300, d, 7))
    assert np.mean(fresh <= held.threshold_) >= 0.9


@pytest.mark.parametrize("n,d", [(60, 90), (200, 30)])  # Woodbury form (n <= d) and full precision
def test_mahalanobis_is_the_ledoit_wolf_distance_and_round_trips(n, d):
    x = _in_domain(n, d, 11)
    dc = DomainCheck().fit(x)
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    cov = LedoitWolf(assume_centered=True).fit(z).covariance_
    q = _in_domain(20, d, 12)
    zq = (q - x.mean(axis=0)) / x.std(axis=0)
    expected = np.sqrt(np.einsum("ij,jk,ik->i", zq, np.linalg.inv(cov), zq))
    assert np.allclose(dc.distance(q), expected, rtol=1e-6)
    state = dc.get_state()
    assert ("factor" in state) == (n <= d)
    back = DomainCheck.from_state(_json_round_trip(state))
    assert np.array_equal(back.distance(q), dc.distance(q))


def _radiograph_like(h=256, w=224, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    bone = np.exp(-((xx - w / 2) ** 2) / (2 * (w / 6) ** 2))
    return np.clip(0.15 + 0.6 * bone + 0.05 * np.sin(yy / 9.0) + rng.normal(0, 0.03, (h, w)), 0, 1)


def test_pixel_checks():
    assert pixel_problems(_radiograph_like()) == []
    grey_rgb = np.repeat((_radiograph_like() * 255).astype(np.uint8)[..., None], 3, axis=2)
    assert pixel_problems(_radiograph_like(), rgb=grey_rgb) == []
    assert "blank" in pixel_problems(np.zeros((200, 200)))[0]
    assert "uniform" in pixel_problems(np.full((200, 200), 0.6))[0]
    document = np.where(np.random.default_rng(1).random((300, 220)) < 0.1, 0.05, 0.95)
    assert "grey levels" in pixel_problems(document)[0]
    posterised = np.round(_radiograph_like() * 7) / 7  # 8 levels
    assert "grey levels" in pixel_problems(posterised)[0]
    colour = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert any("colour" in r for r in pixel_problems(_radiograph_like(64, 64), rgb=colour))
    assert any("aspect" in r for r in pixel_problems(_radiograph_like(60, 400)))


def test_assess_combines_distance_and_pixels():
    dc = DomainCheck().fit(_in_domain(200, 16, 8))
    f = _in_domain(1, 16, 9)
    ok = dc.assess(f, _radiograph_like())
    assert ok.ok or ok.score > ok.threshold  # in-domain features pass unless unlucky
    blank = dc.assess(f, np.zeros((100, 100)))
    assert not blank.ok and any("blank" in r for r in blank.reasons)
    far = dc.assess(f + 100.0, _radiograph_like())
    assert not far.ok and "features unlike" in far.reasons[0]
    assert dc.score(f + 100.0) == (far.score, False)
    with pytest.raises(DataError, match="features"):
        dc.distance(np.zeros((1, 15)))


# -- one trusted prediction ---------------------------------------------------------------------


def test_trusted_prediction_fields_and_statuses():
    z, y = _binary(2000, 10)
    cal = TemperatureScaler()
    cal.fit(2 * z, y)
    p = cal.transform(2 * z)
    cc = ConformalClassifier(0.9).fit(p, y)
    kw = dict(calibrator=cal, threshold=0.4, conformal=cc, domain_threshold=5.0)
    confident = trusted_prediction(8.0, **kw, domain_score=1.0, in_domain=True)
    assert confident.status == "ok" and confident.label == "osteoporosis"
    assert confident.prediction_set == ("osteoporosis",)
    assert (
        confident.raw_probability == pytest.approx(sigmoid(8.0)) and confident.probability < confident.raw_probability
    )
    torn = trusted_prediction(0.0, **kw, domain_score=1.0, in_domain=True)
    assert torn.status == "uncertain" and torn.prediction_set == ("normal", "osteoporosis")
    assert torn.label == "osteoporosis"  # 0.5 >= 0.4: the label follows the operating threshold
    away = trusted_prediction(8.0, **kw, domain_score=9.0, in_domain=False)
    assert away.status == "out_of_domain" and away.label == "" and away.prediction_set == ()
    d = away.to_dict()
    assert list(d) == [
        "status",
        "probability",
        "raw_probability",
        "label",
        "prediction_set",
        "domain_score",
        "domain_threshold",
        "calibrated",
        "status_reason",
    ]
    # issue 33: every status says why
    assert confident.status_reason == "in domain; one class in the 90% prediction set"
    assert torn.status_reason == "both classes in the 90% prediction set"
    assert d["status_reason"] == "out of domain"  # no reasons given: the generic one
    named = trusted_prediction(8.0, **kw, domain_score=9.0, in_domain=False, domain_reasons=("blank image", "x"))
    assert named.status_reason == "blank image; x"
    mute = trusted_prediction(8.0, **kw, domain_score=1.0, in_domain=True, no_signal="no signal at this site: why")
    assert mute.status == "uncertain" and mute.status_reason == "no signal at this site: why"
    assert mute.label == "osteoporosis" and mute.prediction_set == ("osteoporosis",)
    assert d["calibrated"] is True
    json.dumps(d)


def test_ok_only_when_the_label_is_the_single_member_of_the_set():
    """Issue 28 row 3: a low operating threshold labels osteoporosis where the conformal set is
    {normal}; such an answer is uncertain, never ok."""
    z, y = _binary(2000, 10)
    cal = TemperatureScaler()
    cal.fit(2 * z, y)
    cc = ConformalClassifier(0.9).fit(cal.transform(2 * z), y)
    kw = dict(calibrator=cal, threshold=0.05, conformal=cc, domain_score=1.0, domain_threshold=5.0, in_domain=True)
    answers = [trusted_prediction(float(v), **kw) for v in np.linspace(-8, 8, 161)]
    clash = [t for t in answers if len(t.prediction_set) == 1 and t.prediction_set[0] != t.label]
    assert clash, "the grid should reach a label outside its one-class set"
    assert all(t.status == "uncertain" for t in clash)
    assert all(t.status == "ok" for t in answers if t.prediction_set == (t.label,))


# -- fail closed on a stored state (issue 28 row 9) ---------------------------------------------


def _bundle_state():
    from kneeosteo.trust import TrustBundle

    z, y = _binary(400, 11)
    cal = TemperatureScaler()
    cal.fit(z, y)
    cc = ConformalClassifier(0.9).fit(cal.transform(z), y)
    dc = DomainCheck().fit(_in_domain(120, 8, 3))
    return TrustBundle(cal, 0.5, "0.5", cc, dc, ("normal", "osteoporosis")).to_storage()


@pytest.mark.parametrize(
    "damage",
    ["mean-nan", "scale-inf", "scale-zero", "threshold-huge", "threshold-nan", "temperature-huge", "conformal-nan"],
)
def test_a_non_finite_or_out_of_range_trust_state_is_refused(damage):
    """With the hashes fixed up, such a state made every distance NaN (counted in domain) or let
    anything through; now it is refused (RunDir turns the error into one naming the file)."""
    from kneeosteo.trust import TrustBundle

    tensors, meta = _bundle_state()
    TrustBundle.from_storage(tensors, meta)  # the undamaged state loads
    if damage == "mean-nan":
        tensors["domain.mean"][0] = np.nan
    elif damage == "scale-inf":
        tensors["domain.scale"][1] = np.inf
    elif damage == "scale-zero":
        tensors["domain.scale"][1] = 0.0
    elif damage == "threshold-huge":
        meta["pieces"]["domain"]["threshold"] = 1e308
    elif damage == "threshold-nan":
        meta["pieces"]["domain"]["threshold"] = float("nan")
    elif damage == "temperature-huge":
        meta["pieces"]["calibration"]["temperature"] = 1e300
    else:
        tensors["conformal.calibration_scores"][0] = np.nan
    with pytest.raises((DataError, ConfigError, ValueError)):
        TrustBundle.from_storage(tensors, meta)


def test_a_nan_distance_is_out_of_domain():
    dc = DomainCheck().fit(_in_domain(120, 8, 3))
    x = _in_domain(1, 8, 4)
    assert dc.assess(x).ok
    dc.arrays_["mean"] = np.full(8, np.nan)  # a state that slipped through: fail closed, never "in domain"
    v = dc.assess(x)
    assert not v.ok and "not finite" in v.reasons[0]


# -- the film checks: orientation, composition, noise (issue 28 row 6) -------------------------


def _knee_like(h: int = 400, w: int = 200, seed: int = 0) -> np.ndarray:
    """A dark film with one bright bone column (shaft, joint block, shaft) and faint smooth texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    half = np.where(np.abs(y - 0.5) < 0.08, 0.22, 0.12)  # the joint is wider than the shafts
    bone = np.exp(-(((x - 0.5) / half) ** 8)) * (0.55 + 0.1 * y)
    img = 0.08 + bone + 0.01 * np.sin(12 * y) * np.cos(9 * x) + rng.normal(0, 0.002, (h, w))
    return np.clip(img, 0, 1).astype(np.float32)


def test_film_checks_refuse_strong_noise_and_two_knees_side_by_side():
    from kneeosteo.trust import PixelLimits
    from kneeosteo.trust.domain import bone_columns, noise_level

    film = _knee_like()
    films = PixelLimits(film_checks=True)
    assert pixel_problems(film, limits=films) == [] and bone_columns(film) == 1 and noise_level(film) < 0.03
    noisy = np.clip(film + np.random.default_rng(1).normal(0, 0.2, film.shape), 0, 1)
    assert any("strong noise" in r for r in pixel_problems(noisy, limits=films))
    pair = np.hstack([film, _knee_like(seed=2)])
    assert bone_columns(pair) == 2
    assert any("side by side" in r for r in pixel_problems(pair, limits=films))
    assert pixel_problems(noisy) == pixel_problems(pair) == []  # off without a fitted film domain
    assert DomainCheck().fit(_in_domain(120, 8, 3)).pixel_limits_.film_checks  # a feature check turns them on


def test_a_film_whose_mirror_image_is_closer_is_upside_down():
    dc = DomainCheck().fit(_in_domain(120, 8, 3))
    xs = _in_domain(40, 8, 4)
    d = dc.distance(xs)
    inside = np.flatnonzero(d <= dc.threshold_)
    near, far = xs[inside[np.argmin(d[inside])]][None], xs[inside[np.argmax(d[inside])]][None]
    assert dc.assess(near, mirrored=far).ok  # upright: its mirror image lies further out
    v = dc.assess(far, mirrored=near)  # in domain by distance, but its mirror image is closer
    assert not v.ok and "upside down" in v.reasons[0]
