"""The trust estimators keep scikit-learn's conventions (issue 29), each checked on every one of them:
``__init__`` only stores its parameters (a bad one raises at ``fit``), ``fit`` returns ``self`` and
sets fitted attributes whose names end in ``_``, ``get_state``/``from_state`` is one round trip that
answers new data identically, and :func:`sklearn.base.clone` copies the parameters. Two classes and K
are one class: the data decide."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import softmax

from kneeosteo.errors import ConfigError, DataError
from kneeosteo.trust import (
    TRUST_PIECES,
    ConformalClassifier,
    ConformalInterval,
    DomainCheck,
    OperatingThreshold,
    OrientationCheck,
    PlattScaler,
    ShiftReference,
    TemperatureScaler,
    TrustEstimator,
    sigmoid,
)

RNG = np.random.default_rng(29)
Z = RNG.normal(0.0, 2.0, 300)
Y = (RNG.random(300) < sigmoid(Z)).astype(int)
ZK = RNG.normal(0.0, 2.0, (300, 3))
YK = np.array([RNG.choice(3, p=row) for row in softmax(ZK, axis=1)])
FEATS = RNG.normal(size=(120, 6))
NEW_Z, NEW_ZK, NEW_FEATS = RNG.normal(0.0, 2.0, 50), RNG.normal(0.0, 2.0, (50, 3)), RNG.normal(size=(50, 6)) * 1.5


MIRRORED = FEATS + np.r_[1.5, np.zeros(5)] + RNG.normal(0.0, 0.3, FEATS.shape)  # films turned: dim 0 moves
SHIFT_BATCH = (RNG.gamma(20, 5, 30) * 1.2, sigmoid(NEW_Z[:30]))


def _answers(est, case: str):
    """What a fitted estimator says about new data (what must survive a state round trip)."""
    k = "(K)" in case
    if isinstance(est, (TemperatureScaler, PlattScaler)):
        return est.transform(NEW_ZK if k else NEW_Z)
    if isinstance(est, ConformalClassifier):
        return est.predict_mask(softmax(NEW_ZK, axis=1) if k else sigmoid(NEW_Z))
    if isinstance(est, ConformalInterval):
        return np.stack(est.predict(NEW_Z))
    if isinstance(est, DomainCheck):
        return est.distance(NEW_FEATS)
    if isinstance(est, OperatingThreshold):
        return est.predict(sigmoid(NEW_Z))
    if isinstance(est, OrientationCheck):
        return est.score(NEW_FEATS)
    return json.dumps(est.predict(*SHIFT_BATCH).to_dict(), sort_keys=True)


# name -> (factory, fit arguments, a bad parameter that fit must refuse (None: no parameters))
CASES = {
    "temperature (binary)": (TemperatureScaler, (Z, Y), {"temperature": -1.0}),
    "temperature (K)": (TemperatureScaler, (ZK, YK), {"temperature": float("nan")}),
    "platt": (PlattScaler, (Z, Y), None),
    "conformal (binary)": (ConformalClassifier, (sigmoid(Z), Y), {"coverage": 1.5}),
    "conformal (binary, Mondrian)": (
        lambda **kw: ConformalClassifier(class_conditional=True, **kw),
        (sigmoid(Z), Y),
        {"class_names": ("a", "a")},
    ),
    "conformal (K)": (ConformalClassifier, (softmax(ZK, axis=1), YK), {"coverage": 0.0}),
    "interval": (ConformalInterval, (Z + RNG.normal(size=300), Z), {"coverage": 1.0}),
    "domain": (DomainCheck, (FEATS,), {"method": "cosine"}),
    "domain (kNN)": (lambda **kw: DomainCheck(method="knn", **kw), (FEATS,), {"acceptance": 2.0}),
    "operating point": (OperatingThreshold, (sigmoid(Z), Y), {"operating_point": "sideways"}),
    "orientation": (OrientationCheck, (FEATS, MIRRORED), {"max_false_refusals": 0.7}),
    "shift": (ShiftReference, (RNG.gamma(20, 5, 200), sigmoid(Z), {"domain_source": "test"}), None),
}


def _json_round_trip(state: dict) -> dict:
    """A state as the run folder keeps it: plain values through JSON, arrays copied."""
    arrays = {k: np.array(v) for k, v in state.items() if isinstance(v, np.ndarray)}
    return {**json.loads(json.dumps({k: v for k, v in state.items() if k not in arrays})), **arrays}


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][2] is not None])
def test_init_stores_parameters_and_a_bad_one_raises_at_fit(case):
    make, args, bad = CASES[case]
    est = make(**bad)  # no error here: __init__ validates nothing
    assert all(getattr(est, k) is v or getattr(est, k) == v for k, v in bad.items())
    with pytest.raises(ConfigError):
        est.fit(*args)
    assert not est.is_fitted()


@pytest.mark.parametrize("case", list(CASES))
def test_fit_returns_self_and_sets_only_trailing_underscore_attributes(case):
    make, args, _ = CASES[case]
    est = make()
    before = set(vars(est))
    assert not any(k.endswith("_") for k in before) and not est.is_fitted()
    assert set(est.get_params()) == before  # __init__ stored its parameters, and nothing else
    assert est.fit(*args) is est
    added = {k for k in set(vars(est)) - before if not k.startswith("_")}
    assert added and all(k.endswith("_") for k in added), added
    assert est.get_params() == make().get_params()  # fit changed no parameter


@pytest.mark.parametrize("case", [c for c in CASES if c != "shift"])
def test_an_unfitted_estimator_refuses_to_answer(case):
    est = CASES[case][0]()
    with pytest.raises(DataError, match="fit first"):
        est.get_state()


@pytest.mark.parametrize("case", list(CASES))
def test_the_state_round_trip_answers_new_data_identically(case):
    make, args, _ = CASES[case]
    est = make().fit(*args)
    state = est.get_state()
    back = type(est).from_state(_json_round_trip(state))
    a, b = _answers(est, case), _answers(back, case)
    assert (a == b) if isinstance(a, str) else np.array_equal(a, b)
    again = back.get_state()
    assert set(again) == set(state)
    for k, v in state.items():
        assert np.array_equal(again[k], v) if isinstance(v, np.ndarray) else again[k] == v, k


@pytest.mark.parametrize("case", list(CASES))
def test_sklearn_clone_copies_the_parameters_unfitted(case):
    from sklearn.base import clone

    make, args, bad = CASES[case]
    est = make().fit(*args)
    twin = clone(est)
    assert type(twin) is type(est) and twin.get_params() == est.get_params() and not twin.is_fitted()
    if bad is not None:
        assert twin.set_params(**bad) is twin and make().get_params() != twin.get_params()


def test_every_trust_piece_is_a_trust_estimator_with_one_state_round_trip():
    for name, (_attribute, estimator, _reader) in TRUST_PIECES.items():
        assert issubclass(estimator, TrustEstimator), name
        for old in ("to_dict", "from_dict", "to_state"):  # the second save/load pair is gone
            assert not hasattr(estimator, old), (name, old)


def test_two_classes_and_k_classes_are_one_class():
    """K = 2 as an (n, 2) matrix gives the binary sets; a binary logit z is the K = 2 logits [0, z]."""
    p = sigmoid(Z)
    binary = ConformalClassifier(0.8).fit(p, Y)
    two = ConformalClassifier(0.8).fit(np.stack([1 - p, p], axis=1), Y)
    q = sigmoid(NEW_Z)
    assert np.array_equal(binary.quantiles_, two.quantiles_)
    assert np.array_equal(binary.predict_mask(q), two.predict_mask(np.stack([1 - q, q], axis=1)))
    t_binary = TemperatureScaler().fit(2 * Z, Y).temperature_
    t_two = TemperatureScaler().fit(np.stack([np.zeros_like(Z), 2 * Z], axis=1), Y).temperature_
    assert t_binary == pytest.approx(t_two, rel=1e-4)


# -- one trust file for every task (trust.json, format kneeosteo-trust/2) ----------------------------


def _storage_round_trip(bundle):
    from kneeosteo.trust import TrustBundle

    tensors, meta = bundle.to_storage()
    return TrustBundle.from_storage({k: np.array(v) for k, v in tensors.items()}, json.loads(json.dumps(meta)))


def test_one_trust_file_holds_a_multiclass_and_a_regression_runs_trust():
    from kneeosteo.trust import TrustBundle

    classes = ("normal", "osteopenia", "osteoporosis")
    cal = TemperatureScaler().fit(ZK, YK)
    sets = ConformalClassifier(0.9, class_names=classes).fit(cal.transform(ZK), YK)
    dom = DomainCheck().fit(FEATS)
    mc = TrustBundle(cal, None, None, sets, dom, classes, {"calibration_images": 300})
    back = _storage_round_trip(mc)
    assert back.threshold is None and back.interval is None and back.fitted == mc.fitted
    assert np.array_equal(back.calibrator.transform(NEW_ZK), cal.transform(NEW_ZK))
    p = cal.transform(NEW_ZK)
    assert back.conformal.predict(p) == sets.predict(p) and back.conformal.class_names_ == classes
    assert np.array_equal(back.domain.distance(NEW_FEATS), dom.distance(NEW_FEATS))
    ci = ConformalInterval(0.8).fit(Z + RNG.normal(size=300), Z)
    reg = _storage_round_trip(TrustBundle(None, None, None, None, None, (), {}, interval=ci))
    assert reg.calibrator is None and reg.conformal is None and reg.domain is None
    assert np.array_equal(np.stack(reg.interval.predict(NEW_Z)), np.stack(ci.predict(NEW_Z)))
