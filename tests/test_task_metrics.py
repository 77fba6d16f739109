"""The multiclass and regression tasks' pure functions: WHO bands, K-class metrics and paired
tests, regression agreement metrics, their figures, and the K-class / regression trust pieces.

Known answers are worked out by hand in the comments; sklearn, scipy and statsmodels are the
reference where the module delegates to them or vectorises what they compute.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.metrics import cohen_kappa_score, confusion_matrix, precision_score, recall_score, roc_auc_score
from statsmodels.stats.proportion import proportion_confint

from kneeosteo.data.who import WHO_BANDS, WHO_CLASSES, WHO_CUTOFFS, severity_order, who_band, who_band_index
from kneeosteo.errors import ConfigError, DataError
from kneeosteo.evaluation import figures
from kneeosteo.evaluation.multiclass import (
    _confusion_rows,
    _quadratic_kappa_rows,
    format_multiclass_table,
    label_metrics_with_ci,
    multiclass_metrics_with_ci,
    paired_multiclass_tests,
)
from kneeosteo.evaluation.regression import bland_altman_limits, format_regression_table, regression_metrics_with_ci
from kneeosteo.trust import (
    ConformalClassifier,
    ConformalInterval,
    TemperatureScaler,
    empirical_interval_coverage,
    empirical_set_coverage,
)

C3 = ["normal", "osteopenia", "osteoporosis"]
N_BOOT = 300  # enough for the interval checks below, keeps the file fast


def _json(obj) -> dict:
    """A trust state through JSON (its plain values) and fresh copies (its arrays), as a run stores it."""
    arrays = {k: np.array(v) for k, v in obj.items() if isinstance(v, np.ndarray)}
    return {**json.loads(json.dumps({k: v for k, v in obj.items() if k not in arrays}, allow_nan=True)), **arrays}


def _onehotish(pred: list[int], k: int = 3, top: float = 0.8) -> np.ndarray:
    """Probabilities with ``top`` on the predicted class and the rest shared equally."""
    p = np.full((len(pred), k), (1 - top) / (k - 1))
    p[np.arange(len(pred)), pred] = top
    return p


# ------------------------------------------------------------------------------ WHO bands


def test_who_bands_boundaries_land_in_the_right_band():
    t = [0.5, -1.0, -1.0000001, -2.4999, -2.5, -2.5000001, -4.0]
    assert who_band_index(t).tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert who_band(-1.0) == "normal" and who_band(-2.5) == "osteoporosis" and who_band(-1.7) == "osteopenia"
    assert who_band_index(-2.5).shape == () and who_band_index(np.zeros((2, 3))).shape == (2, 3)


def test_who_table_is_the_one_source():
    assert WHO_CLASSES == ("normal", "osteopenia", "osteoporosis")
    assert WHO_CUTOFFS == (-1.0, -2.5)
    assert len(WHO_BANDS) == 3


@pytest.mark.parametrize("bad", [math.nan, [0.0, math.nan], [-math.inf]])
def test_who_band_rejects_nan_and_inf(bad):
    with pytest.raises(ValueError, match="finite"):
        who_band_index(bad)


def test_who_band_takes_one_value():
    with pytest.raises(ValueError):
        who_band([-1.0, -2.0])


def test_severity_order():
    assert severity_order(["osteoporosis", "zeta", "normal", "alpha", "osteopenia"]) == [
        "normal",
        "osteopenia",
        "osteoporosis",
        "alpha",
        "zeta",
    ]
    assert severity_order({"osteoporosis", "normal"}) == ["normal", "osteoporosis"]
    assert severity_order(["Osteoporosis", "Normal", "Normal"]) == ["Normal", "Osteoporosis"]
    assert severity_order(["b", "a"]) == ["a", "b"]


# ------------------------------------------------------------------------------ multiclass metrics

# y    = 0 0 0 0 | 1 1 1 | 2 2 2
# pred = 0 0 0 1 | 1 1 2 | 2 0 2   -> confusion [[3,1,0],[0,2,1],[1,0,2]]
Y_HAND = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
PRED_HAND = [0, 0, 0, 1, 1, 1, 2, 2, 0, 2]


@pytest.fixture(scope="module")
def hand():
    return multiclass_metrics_with_ci(Y_HAND, _onehotish(PRED_HAND), C3, n_boot=N_BOOT)


def test_hand_confusion_and_per_class_values(hand):
    assert hand["confusion"] == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
    pc = hand["per_class"]
    assert [pc[c]["support"] for c in C3] == [4, 3, 3]
    # sensitivity = diagonal / row sums; precision = diagonal / column sums (4, 3, 3)
    assert [pc[c]["sensitivity"]["value"] for c in C3] == pytest.approx([3 / 4, 2 / 3, 2 / 3])
    assert [pc[c]["precision"]["value"] for c in C3] == pytest.approx([3 / 4, 2 / 3, 2 / 3])
    # class 0: tp 3, fn 1, fp 1 -> tn 5, specificity 5/6; classes 1, 2: tp 2, fn 1, fp 1 -> tn 6
    assert [pc[c]["specificity"]["value"] for c in C3] == pytest.approx([5 / 6, 6 / 7, 6 / 7])
    # F1 = 2 tp / (2 tp + fp + fn)
    assert [pc[c]["f1"]["value"] for c in C3] == pytest.approx([6 / 8, 4 / 6, 4 / 6])
    assert hand["accuracy"]["value"] == pytest.approx(0.7)
    assert hand["n"] == 10 and hand["classes"] == C3 and hand["task"] == "multiclass"


def test_hand_wilson_intervals(hand):
    lo, hi = proportion_confint(3, 4, alpha=0.05, method="wilson")
    s = hand["per_class"]["normal"]["sensitivity"]
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((lo, hi))
    lo, hi = proportion_confint(5, 6, alpha=0.05, method="wilson")
    s = hand["per_class"]["normal"]["specificity"]
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((lo, hi))
    lo, hi = proportion_confint(7, 10, alpha=0.05, method="wilson")
    assert (hand["accuracy"]["ci_low"], hand["accuracy"]["ci_high"]) == pytest.approx((lo, hi))


def test_hand_weighted_kappa(hand):
    # weights (i - j)^2 / 4. Observed: cells (0,1), (1,2) weigh 1/4, (2,0) weighs 1 -> 1.5.
    # Expected r_i c_j / n with margins (4, 3, 3): (12 + 12 + 9 + 9) / 4 + (12 + 12) = 34.5, / 10
    assert hand["cohen_kappa_weighted"]["value"] == pytest.approx(1 - 1.5 / 3.45)
    assert hand["cohen_kappa_weighted"]["value"] == pytest.approx(
        cohen_kappa_score(Y_HAND, PRED_HAND, weights="quadratic")
    )


def test_macro_is_the_mean_of_per_class(hand):
    for name in ("sensitivity", "specificity", "precision", "f1", "auc"):
        per = [hand["per_class"][c][name]["value"] for c in C3]
        assert hand["macro"][name]["value"] == pytest.approx(np.mean(per)), name


def test_loss_is_mean_cross_entropy(hand):
    # the true class gets 0.8 on 7 cases and 0.1 on 3
    assert hand["loss"] == pytest.approx(-(7 * math.log(0.8) + 3 * math.log(0.1)) / 10)


def test_auc_matches_sklearn_one_vs_rest():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 120)
    p = softmax(rng.normal(size=(120, 4)) + 1.2 * np.eye(4)[y], axis=1)
    m = multiclass_metrics_with_ci(y, p, list("abcd"), n_boot=N_BOOT)
    pred = p.argmax(axis=1)
    recall = recall_score(y, pred, average=None)
    prec = precision_score(y, pred, average=None)
    for c, name in enumerate("abcd"):
        assert m["per_class"][name]["sensitivity"]["value"] == pytest.approx(recall[c])
        assert m["per_class"][name]["precision"]["value"] == pytest.approx(prec[c])
        spec = recall_score(y != c, pred != c)  # specificity = recall of "not c"
        assert m["per_class"][name]["specificity"]["value"] == pytest.approx(spec)
        assert m["per_class"][name]["auc"]["value"] == pytest.approx(roc_auc_score(y == c, p[:, c]))
        assert m["per_class"][name]["auc"]["method"] == "delong"
    assert m["macro"]["auc"]["value"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    for name in ("sensitivity", "f1", "auc"):
        entry = m["macro"][name]
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"], name
    assert m["cohen_kappa_weighted"]["ci_low"] < m["cohen_kappa_weighted"]["ci_high"]


def test_perfect_predictions():
    y = [0, 1, 2, 0, 1, 2, 2]
    m = multiclass_metrics_with_ci(y, _onehotish(y, top=1.0), C3, n_boot=N_BOOT)
    assert m["accuracy"]["value"] == 1.0
    assert m["cohen_kappa_weighted"]["value"] == pytest.approx(1.0)
    assert m["macro"]["f1"]["value"] == 1.0 and m["macro"]["auc"]["value"] == 1.0
    assert m["loss"] < 1e-6
    assert m["confusion"] == [[2, 0, 0], [0, 2, 0], [0, 0, 3]]


def test_a_class_absent_from_y_is_nan_not_zero():
    y = [0, 0, 1, 1, 0, 1]
    pred = [0, 1, 1, 1, 0, 2]  # class 2 is predicted once but never true
    m = multiclass_metrics_with_ci(y, _onehotish(pred), C3, n_boot=N_BOOT)
    absent = m["per_class"]["osteoporosis"]
    assert absent["support"] == 0
    assert math.isnan(absent["sensitivity"]["value"]) and math.isnan(absent["auc"]["value"])
    assert math.isnan(absent["sensitivity"]["ci_low"])
    assert absent["precision"]["value"] == 0.0  # predicted once, wrong
    assert absent["f1"]["value"] == 0.0  # 2 tp / (2 tp + fp + fn) = 0 / 1, as sklearn says
    # macro sensitivity: the mean over the two classes that are present (2/3 each), not counting
    # the absent class as 0 (which would give 4/9)
    assert m["macro"]["sensitivity"]["value"] == pytest.approx(2 / 3)
    assert "NaN" in json.dumps(m)  # nan survives serialisation as NaN


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 60)
    p = softmax(rng.normal(size=(60, 3)), axis=1)
    a = multiclass_metrics_with_ci(y, p, C3, n_boot=200, seed=5)
    b = multiclass_metrics_with_ci(y, p, C3, n_boot=200, seed=5)
    c = multiclass_metrics_with_ci(y, p, C3, n_boot=200, seed=6)
    assert a == b
    assert a["macro"]["f1"]["ci_low"] != c["macro"]["f1"]["ci_low"]


def test_bootstrap_engine_matches_sklearn():
    """The replicates use vectorised confusion matrices and kappas; both must be sklearn's."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, size=(20, 30))
    pred = np.where(rng.random((20, 30)) < 0.6, y, rng.integers(0, 4, size=(20, 30)))
    cms = _confusion_rows(y, pred, 4)
    kappas = _quadratic_kappa_rows(cms)
    for i in range(20):
        assert (cms[i] == confusion_matrix(y[i], pred[i], labels=range(4))).all()
        assert kappas[i] == pytest.approx(cohen_kappa_score(y[i], pred[i], labels=range(4), weights="quadratic"))


def test_label_metrics_without_probabilities():
    m = label_metrics_with_ci(Y_HAND, PRED_HAND, C3, n_boot=N_BOOT)
    assert "loss" not in m and "auc" not in m["per_class"]["normal"] and "auc" not in m["macro"]
    assert m["confusion"] == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
    assert m["per_class"]["normal"]["sensitivity"]["value"] == 0.75
    table = format_multiclass_table(m)
    assert "macro" in table and "accuracy" in table


def test_format_multiclass_table(hand):
    table = format_multiclass_table(hand)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["class", "n", "sensitivity"]
    assert any(line.startswith("normal") and "0.750 [" in line for line in lines)
    assert any(line.startswith("macro") for line in lines)
    assert any(line.startswith("accuracy: 0.700 [") for line in lines)
    assert any(line.startswith("weighted kappa") for line in lines)


@pytest.mark.parametrize(
    "y, probs, classes, words",
    [
        ([0, 1, 2], _onehotish([0, 1]), C3, "shape"),  # too few rows
        ([0, 1], _onehotish([0, 1]), ["a", "b"], "shape"),  # 3 columns for 2 classes
        ([0, 3], _onehotish([0, 1]), C3, r"\[0, 3\)"),  # label out of range
        ([0, -1], _onehotish([0, 1]), C3, r"\[0, 3\)"),
        ([0.5, 1], _onehotish([0, 1]), C3, "integer"),
        ([0, 1], np.full((2, 3), 0.5), C3, "sum to 1"),
        ([0, 1], np.array([[0.5, 0.5, np.nan], [1, 0, 0]]), C3, "NaN"),
        ([0, 1], np.array([[1.5, -0.5, 0], [1, 0, 0]]), C3, r"\[0, 1\]"),
        ([], np.empty((0, 3)), C3, "empty"),
        ([0, 1], _onehotish([0, 1]), ["a", "a", "b"], "distinct"),
        ([0, 0], np.ones((2, 1)), ["a"], "at least 2"),
    ],
)
def test_multiclass_input_validation(y, probs, classes, words):
    with pytest.raises(ValueError, match=words):
        multiclass_metrics_with_ci(y, probs, classes, n_boot=10)


def test_label_metrics_validation():
    with pytest.raises(ValueError, match="items"):
        label_metrics_with_ci([0, 1, 2], [0, 1], C3)
    with pytest.raises(ValueError, match="n_boot"):
        label_metrics_with_ci([0, 1, 2], [0, 1, 2], C3, n_boot=0)


# ------------------------------------------------------------------------------ paired tests


def test_stuart_maxwell_on_identical_predictions_does_not_crash():
    y = [0, 1, 2, 1, 0, 2]
    pred = [0, 1, 1, 1, 2, 2]
    out = paired_multiclass_tests(y, pred, pred, C3)
    assert out["stuart_maxwell"]["p_value"] == 1.0 and "note" in out["stuart_maxwell"]
    assert out["mcnemar_correct"]["pvalue"] == 1.0
    assert all(v["pvalue"] == 1.0 for v in out["per_class"].values())
    _json(out)


def test_stuart_maxwell_detects_different_marginals():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 60)
    a = y.copy()
    b = np.where(rng.random(60) < 0.7, 2, y)  # B calls most cases osteoporosis
    sm = paired_multiclass_tests(y, a, b, C3)["stuart_maxwell"]
    assert sm["p_value"] < 0.05 and sm["df"] == 2 and sm["statistic"] > 0


def test_stuart_maxwell_two_classes_is_mcnemar_chi_square():
    # 10 cases a=0, b=1 and 2 cases a=1, b=0: (b - c)^2 / (b + c) = 64 / 12
    a = [0] * 10 + [1] * 2 + [0] * 5 + [1] * 5
    b = [1] * 10 + [0] * 2 + [0] * 5 + [1] * 5
    sm = paired_multiclass_tests([0] * 22, a, b, ["x", "y"])["stuart_maxwell"]
    assert sm["statistic"] == pytest.approx(64 / 12) and sm["df"] == 1


def test_stuart_maxwell_leaves_out_a_class_without_discordance():
    # class 0 is agreed on every time; the singular covariance this causes must not give nan
    a = [0, 0, 1, 1, 1, 2, 2, 1, 2]
    b = [0, 0, 1, 2, 2, 2, 1, 2, 2]
    sm = paired_multiclass_tests([0] * 9, a, b, C3)["stuart_maxwell"]
    assert math.isfinite(sm["p_value"]) and sm["df"] == 1 and "note" in sm


def test_paired_mcnemar_counts():
    y = [0, 1, 2, 0, 1, 2]
    a = [0, 1, 2, 0, 1, 0]  # wrong on the last case only
    b = [1, 1, 2, 2, 0, 2]  # wrong on cases 0, 3, 4
    out = paired_multiclass_tests(y, a, b, C3)
    assert (out["mcnemar_correct"]["b"], out["mcnemar_correct"]["c"]) == (3, 1)
    # class 0 one-vs-rest: A errs on case 5 (calls it 0); B on cases 0 and 3 (misses 0) and 4 (calls it 0)
    assert (out["per_class"]["normal"]["b"], out["per_class"]["normal"]["c"]) == (3, 1)
    # class 2: A errs on case 5 (misses 2), B on case 3 (calls a 0 a 2)
    assert (out["per_class"]["osteoporosis"]["b"], out["per_class"]["osteoporosis"]["c"]) == (1, 1)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_multiclass_tests(y, a, b[:-1], C3)


# ------------------------------------------------------------------------------ regression


def test_constant_offset():
    t = np.linspace(-4, 1, 40)
    m = regression_metrics_with_ci(t, t + 0.5, n_boot=N_BOOT)
    assert m["bias"]["value"] == pytest.approx(0.5)
    assert m["mae"]["value"] == pytest.approx(0.5) and m["rmse"]["value"] == pytest.approx(0.5)
    assert m["mae"]["ci_low"] == pytest.approx(0.5) and m["mae"]["ci_high"] == pytest.approx(0.5)
    assert m["pearson_r"]["value"] == pytest.approx(1.0) and m["spearman_r"]["value"] == pytest.approx(1.0)
    assert m["limits_of_agreement"]["lower"]["value"] == pytest.approx(0.5)
    assert m["limits_of_agreement"]["upper"]["value"] == pytest.approx(0.5)


def test_perfect_regression():
    t = np.linspace(-4, 1, 30)
    m = regression_metrics_with_ci(t, t, n_boot=N_BOOT)
    assert m["mae"]["value"] == 0.0 and m["rmse"]["value"] == 0.0 and m["bias"]["value"] == 0.0
    who = m["who_classification"]
    assert who["accuracy"]["value"] == 1.0 and who["cohen_kappa_weighted"]["value"] == pytest.approx(1.0)
    assert m["binary_osteoporosis"]["sensitivity"]["value"] == 1.0


def test_bland_altman_hand_example():
    # differences 1, 2, 3, 4: mean 2.5, sd sqrt(5/3); limits 2.5 -+ 1.96 sd;
    # Bland & Altman 1999: SE(limit) = sqrt(3 sd^2 / n) = sqrt(1.25), t(0.975, 3) = 3.182446
    ba = bland_altman_limits([0, 0, 0, 0], [1, 2, 3, 4])
    sd = math.sqrt(5 / 3)
    assert ba["sd"] == pytest.approx(sd)
    assert ba["bias"]["value"] == pytest.approx(2.5)
    assert ba["lower"]["value"] == pytest.approx(2.5 - 1.96 * sd)
    assert ba["upper"]["value"] == pytest.approx(2.5 + 1.96 * sd)
    half = 3.182446305 * math.sqrt(1.25)
    assert ba["upper"]["ci_high"] - ba["upper"]["value"] == pytest.approx(half, rel=1e-6)
    assert ba["lower"]["value"] - ba["lower"]["ci_low"] == pytest.approx(half, rel=1e-6)
    # bias: Student-t interval 2.5 -+ t * sd / sqrt(4)
    assert ba["bias"]["ci_high"] == pytest.approx(2.5 + 3.182446305 * sd / 2, rel=1e-6)


def test_regression_on_noisy_data():
    rng = np.random.default_rng(5)
    t = rng.normal(-1.5, 1.2, 200)
    p = t + rng.normal(0.2, 0.5, 200)
    m = regression_metrics_with_ci(t, p, n_boot=N_BOOT)
    for key in ("mae", "rmse", "bias", "pearson_r", "spearman_r"):
        assert m[key]["ci_low"] <= m[key]["value"] <= m[key]["ci_high"], key
    assert 0 < m["pearson_r"]["p_value"] < 1e-10
    assert m["bias"]["ci_low"] < 0.2 < m["bias"]["ci_high"]
    # the binary osteoporosis call is the WHO table's osteoporosis-vs-rest
    who, binary = m["who_classification"], m["binary_osteoporosis"]
    for name in ("sensitivity", "specificity"):
        assert binary[name]["value"] == pytest.approx(who["per_class"]["osteoporosis"][name]["value"])
    true_pos = t <= -2.5
    pred_pos = p <= -2.5
    assert binary["counts"]["tp"] == int(np.sum(true_pos & pred_pos))
    assert binary["accuracy"]["value"] == pytest.approx(np.mean(true_pos == pred_pos))
    assert who["confusion"] == confusion_matrix(who_band_index(t), who_band_index(p), labels=[0, 1, 2]).tolist()
    text = format_regression_table(m)
    assert "MAE" in text and "osteopenia" in text and "T <= -2.5" in text
    _json(m)


def test_bmd_target_has_no_who_keys():
    rng = np.random.default_rng(6)
    t = rng.normal(0.9, 0.15, 50)
    m = regression_metrics_with_ci(t, t + rng.normal(0, 0.05, 50), target="bmd", n_boot=N_BOOT)
    assert m["target"] == "bmd"
    assert "who_classification" not in m and "binary_osteoporosis" not in m
    assert "WHO" not in format_regression_table(m)
    _json(m)


def test_constant_prediction_gives_nan_correlation():
    m = regression_metrics_with_ci([-1.0, -2.0, -3.0], [-2.0, -2.0, -2.0], n_boot=50)
    assert math.isnan(m["pearson_r"]["value"]) and math.isnan(m["spearman_r"]["p_value"])
    _json(m)


@pytest.mark.parametrize(
    "t, p, kw, words",
    [
        ([1, 2, 3], [1, 2], {}, "3 items"),
        ([1, 2], [1, 2], {}, "at least 3"),
        ([1, 2, np.nan], [1, 2, 3], {}, "NaN"),
        ([1, 2, 3], [1, 2, np.inf], {}, "inf"),
        ([[1, 2], [3, 4]], [1, 2, 3, 4], {}, "shape"),
        ([1, 2, 3], [1, 2, 3], {"target": "tscore"}, "target"),
        ([1, 2, 3], [1, 2, 3], {"alpha": 1.5}, "alpha"),
    ],
)
def test_regression_input_validation(t, p, kw, words):
    with pytest.raises(ValueError, match=words):
        regression_metrics_with_ci(t, p, n_boot=10, **kw)


# ------------------------------------------------------------------------------ figures


def _is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_write_png_files(tmp_path):
    rng = np.random.default_rng(7)
    t = rng.normal(-1.5, 1.2, 60)
    p = t + rng.normal(0, 0.5, 60)
    figures.confusion_k([[5, 1, 0], [2, 6, 1], [0, 1, 4]], C3, tmp_path / "k.png")
    figures.bland_altman(t, p, tmp_path / "ba.png", "T-score")
    figures.predicted_vs_true(t, p, tmp_path / "pvt.png", "T-score", cutoffs=WHO_CUTOFFS)
    figures.predicted_vs_true(t, p, tmp_path / "pvt_plain.png", "BMD")
    figures.confusion({"tp": 3, "fp": 1, "fn": 2, "tn": 5}, ["normal", "osteoporosis"], tmp_path)
    for name in ("k.png", "ba.png", "pvt.png", "pvt_plain.png", "confusion_matrix.png"):
        assert _is_png(tmp_path / name), name
    with pytest.raises(ValueError, match="3 x 3"):
        figures.confusion_k([[1, 2], [3, 4]], C3, tmp_path / "bad.png")


# ------------------------------------------------------------------------------ trust


def _tempered(n: int, k: int, temperature: float, seed: int):
    """Logits z and labels drawn from softmax(z / temperature): the true temperature is known."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 3.0, size=(n, k))
    p = softmax(z / temperature, axis=1)
    y = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    return z, np.minimum(y, k - 1)


def test_temperature_scaler_k_recovers_a_known_temperature():
    z, y = _tempered(4000, 3, 2.0, seed=8)
    cal = TemperatureScaler()
    assert cal.fit(z, y).temperature_ == pytest.approx(2.0, rel=0.10)
    probs = cal.transform(z)
    assert probs.shape == (4000, 3) and np.allclose(probs.sum(axis=1), 1.0)
    assert (probs.argmax(axis=1) == z.argmax(axis=1)).all()  # the ranking never changes
    back = TemperatureScaler.from_state(_json(cal.get_state()))
    assert back.temperature_ == cal.temperature_ and np.array_equal(back.transform(z), probs)
    old = TemperatureScaler.from_state({"method": "temperature_k", "temperature": cal.temperature_})  # format 2
    assert np.array_equal(old.transform(z), probs)


def test_temperature_scaler_k_validation():
    with pytest.raises(DataError, match=r"\[0, 3\)"):
        TemperatureScaler().fit(np.zeros((3, 3)), [0, 1, 3])
    with pytest.raises(DataError, match="0/1"):  # one logit per image: the binary case, 0/1 labels
        TemperatureScaler().fit(np.zeros(3), [0, 1, 2])
    with pytest.raises(ConfigError):
        TemperatureScaler(temperature=0.0).fit(np.zeros((3, 3)), [0, 1, 2])


@pytest.mark.parametrize("class_conditional", [False, True])
def test_conformal_sets_k_cover_the_true_class(class_conditional):
    """Coverage is guaranteed on average over calibration sets, so average 10 random splits
    (one split alone varies by about +-0.015 here)."""
    z, y = _tempered(4000, 3, 1.0, seed=9)
    probs = softmax(z, axis=1)
    rng = np.random.default_rng(9)
    cover, per_class, size = [], [], []
    for _ in range(10):
        perm = rng.permutation(4000)
        cal, new = perm[:2000], perm[2000:]
        cs = ConformalClassifier(coverage=0.9, class_conditional=class_conditional).fit(probs[cal], y[cal])
        sets = cs.predict_mask(probs[new])
        assert sets.shape == (2000, 3) and sets.dtype == bool
        cover.append(empirical_set_coverage(sets, y[new]))
        per_class.append([empirical_set_coverage(sets[y[new] == c], y[new][y[new] == c]) for c in range(3)])
        size.append(sets.sum(axis=1).mean())
    assert 0.88 <= np.mean(cover) <= 0.93
    assert np.mean(size) < 2.5  # not covering by putting every class in every set
    if class_conditional:
        assert np.min(np.mean(per_class, axis=0)) >= 0.87
    back = ConformalClassifier.from_state(_json(cs.get_state()))
    assert (back.predict_mask(probs[new]) == sets).all()


def test_conformal_sets_k_too_few_calibration_images_admit_every_class():
    cs = ConformalClassifier(coverage=0.95).fit(_onehotish([0, 1, 2]), [0, 1, 2])
    assert cs.predict_mask(_onehotish([0, 1])).all()
    cs = ConformalClassifier(coverage=0.9, class_conditional=True).fit(
        _onehotish([0] * 30 + [1] * 30), [0] * 30 + [1] * 30
    )
    assert math.isinf(cs.quantiles_[2])  # no calibration image of class 2
    assert cs.predict_mask(_onehotish([0]))[0, 2]
    assert "Infinity" in json.dumps(cs.get_state()["quantiles"].tolist())
    with pytest.raises(DataError, match="classes"):
        cs.predict_mask(np.full((1, 4), 0.25))


def test_conformal_interval_covers_exchangeable_residuals():
    rng = np.random.default_rng(10)
    pred_cal, pred_new = rng.normal(-1.5, 1, 2000), rng.normal(-1.5, 1, 2000)
    true_cal, true_new = pred_cal + rng.normal(0, 1, 2000), pred_new + rng.normal(0, 1, 2000)
    ci = ConformalInterval(coverage=0.9).fit(true_cal, pred_cal)
    assert ci.half_width_ == pytest.approx(1.645, abs=0.12)  # the normal's 95th percentile
    lower, upper = ci.predict(pred_new)
    assert np.allclose(upper - lower, 2 * ci.half_width_)
    assert abs(empirical_interval_coverage(true_new, lower, upper) - 0.9) <= 0.03
    back = ConformalInterval.from_state(_json(ci.get_state()))
    assert back.half_width_ == ci.half_width_ and back.coverage == 0.9


def test_conformal_interval_too_small_is_infinite():
    ci = ConformalInterval(coverage=0.9).fit([1.0, 2.0, 3.0], [1.1, 2.2, 2.7])
    assert math.isinf(ci.half_width_)
    lower, upper = ci.predict([0.0, 1.0])
    assert np.isneginf(lower).all() and np.isposinf(upper).all()
    assert empirical_interval_coverage([5.0, -5.0], lower, upper) == 1.0
    assert math.isinf(ConformalInterval.from_state(json.loads(json.dumps(ci.get_state()))).half_width_)


def test_conformal_interval_validation():
    with pytest.raises(DataError, match="fit first"):
        ConformalInterval().predict([1.0])
    with pytest.raises(DataError, match="predictions"):
        ConformalInterval().fit([1.0, 2.0], [1.0])
    with pytest.raises(ConfigError, match="coverage"):
        ConformalInterval(coverage=1.5).fit([1.0, 2.0], [1.0, 2.0])
    with pytest.raises(DataError, match="NaN"):
        empirical_interval_coverage([1.0], [np.nan], [2.0])


def test_every_returned_dict_is_json(hand):
    rng = np.random.default_rng(11)
    y = rng.integers(0, 3, 30)
    for obj in (
        hand,
        label_metrics_with_ci(y, rng.integers(0, 3, 30), C3, n_boot=50),
        paired_multiclass_tests(y, rng.integers(0, 3, 30), rng.integers(0, 3, 30), C3),
        regression_metrics_with_ci(rng.normal(size=30), rng.normal(size=30), n_boot=50),
        bland_altman_limits([1, 2, 3], [1, 2, 4]),
    ):
        json.dumps(obj, allow_nan=True)
        assert _json(obj).keys() == obj.keys()
