"""Metrics and paired tests checked against values computed by hand (not by the code under test)."""

from __future__ import annotations

import json
import math
from math import comb

import numpy as np
import pytest
from scipy.stats import norm
from scipy.stats import t as student_t
from sklearn.metrics import roc_auc_score

from kneeosteo.evaluation import metrics as metrics_module
from kneeosteo.evaluation.metrics import (
    METRICS,
    Metric,
    binary_metrics,
    confusion_counts,
    format_table,
    metric_names,
    metrics_with_ci,
)
from kneeosteo.evaluation.stats import delong_auc_ci, delong_test, mcnemar_exact, mean_std_ci, rank_auc_rows

Z975 = 1.959964


def paper_set() -> tuple[np.ndarray, np.ndarray]:
    """72 cases giving the paper's confusion matrix TP 34, FP 4, FN 7, TN 27 at threshold 0.5."""
    y = np.array([1] * 34 + [1] * 7 + [0] * 4 + [0] * 27)
    p = np.concatenate(
        [
            np.linspace(0.55, 0.99, 34),  # TP
            np.linspace(0.05, 0.45, 7),  # FN
            np.linspace(0.6, 0.9, 4),  # FP
            np.linspace(0.01, 0.49, 27),  # TN
        ]
    )
    return y, p


def wilson_closed_form(k: int, n: int, z: float = Z975) -> tuple[float, float]:
    ph = k / n
    centre = (ph + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n))
    return centre - half, centre + half


# ------------------------------------------------------------------------------- point metrics


def test_paper_confusion_matrix_reproduces_table_one():
    y, p = paper_set()
    m = binary_metrics(y, p)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (34, 4, 7, 27)
    assert m["n"] == 72 and m["threshold"] == 0.5
    expected = {  # the paper's Table I "Ours" row
        "sensitivity": 0.8293,
        "specificity": 0.8710,
        "precision": 0.8947,
        "fpr": 0.1290,
        "accuracy": 0.8472,
        "f1": 0.8608,
    }
    for k, v in expected.items():
        assert round(m[k], 4) == v, k
    assert m["sensitivity"] == 34 / 41 and m["specificity"] == 27 / 31
    assert m["precision"] == 34 / 38 and m["fpr"] == 4 / 31
    assert m["accuracy"] == 61 / 72 and m["f1"] == 68 / 79
    assert m["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-15)


def test_confusion_counts_and_threshold_is_inclusive():
    assert confusion_counts([1, 1, 0, 0, 1], [1, 0, 1, 0, 1]) == {"tp": 2, "fp": 1, "fn": 1, "tn": 1}
    m = binary_metrics([1, 0], [0.5, 0.49])
    assert (m["tp"], m["tn"]) == (1, 1)


def test_loss_is_clipped_mean_bce():
    y = np.array([1, 0, 1, 0])
    p = np.array([0.9, 0.2, 0.0, 1.0])  # the last two are confident misses -> clipped at 1e-7
    expected = -(math.log(0.9) + math.log(0.8) + 2 * math.log(1e-7)) / 4
    assert binary_metrics(y, p)["loss"] == pytest.approx(expected, rel=1e-9)


def test_zero_denominators_give_nan_not_zero():
    m = binary_metrics([0, 0, 0], [0.1, 0.2, 0.3])  # no positives, nothing predicted positive
    for k in ("sensitivity", "precision", "auc"):
        assert math.isnan(m[k]), k
    assert m["specificity"] == 1.0 and m["fpr"] == 0.0 and m["accuracy"] == 1.0
    assert math.isnan(binary_metrics([1, 1], [0.9, 0.8])["specificity"])
    ci = metrics_with_ci([0, 0, 0], [0.1, 0.2, 0.3], n_boot=50)
    assert math.isnan(ci["sensitivity"]["ci_low"]) and math.isnan(ci["auc"]["value"])
    assert math.isnan(ci["f1"]["value"]) and math.isnan(ci["f1"]["ci_high"])


def test_invalid_input_is_rejected():
    with pytest.raises(ValueError):
        binary_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError):
        binary_metrics([0, 1], [0.1, 1.2])
    with pytest.raises(ValueError):
        binary_metrics([0, 1], [0.1])
    with pytest.raises(ValueError):
        binary_metrics([], [])


# ------------------------------------------------------------------------------- intervals


def test_wilson_interval_matches_closed_form():
    y, p = paper_set()
    r = metrics_with_ci(y, p, n_boot=100)
    lo, hi = wilson_closed_form(61, 72)
    assert r["accuracy"]["method"] == "wilson"
    assert r["accuracy"]["value"] == 61 / 72
    assert r["accuracy"]["ci_low"] == pytest.approx(lo, abs=1e-6)
    assert r["accuracy"]["ci_high"] == pytest.approx(hi, abs=1e-6)
    lo, hi = wilson_closed_form(34, 41)
    assert (r["sensitivity"]["ci_low"], r["sensitivity"]["ci_high"]) == pytest.approx((lo, hi), abs=1e-6)


def test_ci_output_structure_and_json():
    y, p = paper_set()
    r = metrics_with_ci(y, p, n_boot=200)
    assert r["counts"] == {"tp": 34, "fp": 4, "fn": 7, "tn": 27}
    assert (r["n"], r["n_positive"], r["n_negative"]) == (72, 41, 31)
    for k in metric_names():
        assert set(r[k]) == {"value", "ci_low", "ci_high", "method"}
        assert r[k]["ci_low"] <= r[k]["value"] <= r[k]["ci_high"], k
    assert {r[k]["method"] for k in ("f1", "auc", "loss")} == {"bootstrap"}
    assert json.loads(json.dumps(r, allow_nan=False)) == r  # plain python types only


def test_bootstrap_reproducible_contains_estimate_and_shrinks_with_n():
    y, p = paper_set()
    a = metrics_with_ci(y, p, seed=3)
    b = metrics_with_ci(y, p, seed=3)
    c = metrics_with_ci(y, p, seed=4)
    assert a == b
    assert a["f1"] != c["f1"]
    for k in ("f1", "auc", "loss"):
        assert a[k]["ci_low"] <= a[k]["value"] <= a[k]["ci_high"], k
    y4, p4 = np.tile(y, 4), np.tile(p, 4)  # same estimates, four times the data
    big = metrics_with_ci(y4, p4, seed=3)
    for k in ("f1", "auc", "loss"):
        assert big[k]["value"] == pytest.approx(a[k]["value"], abs=1e-12)
        assert big[k]["ci_high"] - big[k]["ci_low"] < a[k]["ci_high"] - a[k]["ci_low"], k


def test_bootstrap_interval_is_a_hand_rolled_percentile_bootstrap_at_its_level():
    """One interval against the textbook: the same seeded generator draws the positives' and then
    the negatives' indices (a stratified bootstrap), each replicate is scored (AUC as pairs ranked right, F1
    from its counts), and the interval is the replicates' alpha/2 and 1 - alpha/2 percentiles.
    A 90% interval labelled 95% (or any other level) differs from it."""
    y, p = paper_set()
    n_boot, seed = 300, 11
    pos, neg = p[y == 1], p[y == 0]
    rng = np.random.default_rng(seed)
    ip, ineg = rng.integers(0, pos.size, (n_boot, pos.size)), rng.integers(0, neg.size, (n_boot, neg.size))
    reps = {"auc": [], "f1": []}
    for i, j in zip(ip, ineg):  # AUC as the share of positive-negative pairs ranked right, ties half
        a, b = pos[i][:, None], neg[j][None, :]
        reps["auc"].append(float(np.mean((a > b) + 0.5 * (a == b))))
        tp, fp = int((pos[i] >= 0.5).sum()), int((neg[j] >= 0.5).sum())
        reps["f1"].append(2 * tp / (2 * tp + fp + (pos.size - tp)))
    for alpha in (0.05, 0.1):
        got = metrics_with_ci(y, p, n_boot=n_boot, seed=seed, alpha=alpha)
        for name, r in reps.items():
            lo, hi = np.percentile(r, [100 * alpha / 2, 100 * (1 - alpha / 2)])
            assert (got[name]["ci_low"], got[name]["ci_high"]) == pytest.approx((lo, hi), abs=1e-12), (alpha, name)
            assert np.mean((np.asarray(r) >= lo) & (np.asarray(r) <= hi)) >= 1 - alpha - 0.01, (alpha, name)


def test_vectorised_rank_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    pos = rng.integers(0, 10, size=(20, 15)) / 10  # coarse scores -> many ties
    neg = rng.integers(0, 8, size=(20, 11)) / 10
    fast = rank_auc_rows(pos, neg)
    for i in range(20):
        ref = roc_auc_score(np.r_[np.ones(15), np.zeros(11)], np.r_[pos[i], neg[i]])
        assert fast[i] == pytest.approx(ref, abs=1e-12)


def test_format_table():
    y, p = paper_set()
    rows = {"ours": metrics_with_ci(y, p, n_boot=100), "paper": {"sensitivity": 0.8293}}
    text = format_table(rows)
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[0].split("|")[1:-1][0].strip() == "model"
    assert [c.strip() for c in lines[0].split("|")[2:-1]] == list(metric_names())
    acc = rows["ours"]["accuracy"]
    assert f"0.8472 [{acc['ci_low']:.4f}, {acc['ci_high']:.4f}]" in lines[2]
    assert "0.8293" in lines[3] and "| -" in lines[3]


# ------------------------------------------------------------------------------- the table


def test_table_order_and_paper_columns():
    # the paper's Table I order, then AUC; the paper reports all but AUC
    assert metric_names() == ("sensitivity", "specificity", "precision", "fpr", "accuracy", "f1", "loss", "auc")
    assert metric_names(paper=False) == ("auc",)
    assert [METRICS[k].title for k in metric_names()][3::2] == ["FPR", "F1", "AUC"]  # the results tables' header


@pytest.mark.parametrize("name", list(METRICS))
def test_every_table_metric_is_computed_with_its_interval(name):
    y, p = paper_set()
    metric = METRICS[name]
    r = metrics_with_ci(y, p, n_boot=100)
    assert r[name]["method"] == metric.interval
    assert r[name]["value"] == binary_metrics(y, p)[name]
    assert r[name]["ci_low"] <= r[name]["value"] <= r[name]["ci_high"]
    if metric.unit:
        assert 0.0 <= r[name]["ci_low"] and r[name]["ci_high"] <= 1.0
    if metric.counts is not None:  # vectorised over replicates == scalar on the same counts
        pos, neg = p[y == 1][None, :], p[y == 0][None, :]
        assert metric.replicates(pos, neg, 0.5)[0] == pytest.approx(r[name]["value"], abs=1e-15)
    assert name in format_table({"m": r}).splitlines()[0]


def test_table_rejects_inconsistent_entries():
    with pytest.raises(ValueError):
        Metric("x", "x", "wilson", scores=lambda y, p: 0.0)  # Wilson needs counts
    with pytest.raises(ValueError):
        Metric("x", "x", "bootstrap")  # neither counts nor scores
    with pytest.raises(ValueError):
        metrics_module.register_metric(Metric("auc", "AUC", "bootstrap", scores=lambda y, p: 0.0))


def npv(tp, fp, fn, tn):
    return tn, tn + fn


def brier(y, p):
    return float(np.mean((p - y) ** 2))


@pytest.fixture
def extra_metrics(monkeypatch):
    """Two metrics registered for one test only: a count one (Wilson) and a score one
    (bootstrap, no vectorised form, so each replicate calls it)."""
    monkeypatch.setitem(METRICS, "npv", Metric("npv", "NPV", "wilson", counts=npv))
    monkeypatch.setitem(METRICS, "brier", Metric("brier", "Brier score", "bootstrap", scores=brier))
    return METRICS


def test_a_registered_metric_flows_everywhere(extra_metrics):
    y, p = paper_set()
    m = binary_metrics(y, p)
    assert m["npv"] == 27 / 34 and m["brier"] == pytest.approx(brier(y, p), abs=1e-15)
    r = metrics_with_ci(y, p, n_boot=200)
    assert r["npv"]["method"] == "wilson"
    assert (r["npv"]["ci_low"], r["npv"]["ci_high"]) == pytest.approx(wilson_closed_form(27, 34), abs=1e-6)
    assert r["brier"]["method"] == "bootstrap"
    assert r["brier"]["ci_low"] < r["brier"]["value"] < r["brier"]["ci_high"]
    assert json.loads(json.dumps(r, allow_nan=False)) == r  # what metrics.json holds
    header = [c.strip() for c in format_table({"m": r}).splitlines()[0].split("|")[2:-1]]
    assert header[-2:] == ["npv", "brier"]  # the evaluate printout
    # the metrics already there keep their values and intervals bit for bit
    del METRICS["npv"], METRICS["brier"]
    assert metrics_with_ci(y, p, n_boot=200) == {k: v for k, v in r.items() if k not in ("npv", "brier")}


# ------------------------------------------------------------------------------- McNemar


def test_mcnemar_exact_known_table():
    # 5 both right, b = 1 (A right, B wrong), c = 9 (A wrong, B right), 3 both wrong
    a = np.array([1] * 5 + [1] * 1 + [0] * 9 + [0] * 3, dtype=bool)
    b = np.array([1] * 5 + [0] * 1 + [1] * 9 + [0] * 3, dtype=bool)
    r = mcnemar_exact(a, b)
    assert (r["b"], r["c"]) == (1, 9)
    expected = 2 * (comb(10, 0) + comb(10, 1)) / 2**10
    assert expected == 22 / 1024 == 0.021484375
    assert r["pvalue"] == pytest.approx(expected, abs=1e-12)
    assert mcnemar_exact(b, a)["pvalue"] == pytest.approx(expected, abs=1e-12)


def test_mcnemar_no_discordance_or_balanced():
    a = np.array([1, 1, 0, 1, 0])
    assert mcnemar_exact(a, a)["pvalue"] == 1.0
    assert mcnemar_exact([1, 0, 1, 0], [0, 1, 0, 1])["pvalue"] == 1.0  # b = c = 2


# ------------------------------------------------------------------------------- DeLong


def delong_slow(y, probs):
    """Explicit O(n^2) structural components of DeLong, DeLong & Clarke-Pearson (1988)."""
    y = np.asarray(y)
    v10, v01, aucs = [], [], []
    for p in probs:
        x, yy = np.asarray(p)[y == 1], np.asarray(p)[y == 0]
        psi = (x[:, None] > yy[None, :]) + 0.5 * (x[:, None] == yy[None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))  # per positive
        v01.append(psi.mean(axis=0))  # per negative
    m, n = len(v10[0]), len(v01[0])
    s10, s01 = np.cov(np.array(v10)), np.cov(np.array(v01))
    s = s10 / m + s01 / n
    diff = aucs[0] - aucs[1]
    se = math.sqrt(s[0, 0] + s[1, 1] - 2 * s[0, 1])
    z = diff / se
    return aucs, diff, se, z, 2 * norm.sf(abs(z))


Y8 = [0, 0, 0, 0, 1, 1, 1, 1]
A8 = [0.1, 0.4, 0.35, 0.8, 0.7, 0.9, 0.6, 0.95]
B8 = [0.2, 0.3, 0.5, 0.1, 0.6, 0.4, 0.8, 0.7]


def test_delong_reference_example():
    # By hand: AUC_a = 14/16, AUC_b = 15/16; placement differences (a - b) are
    # V10: [-1/4, 1/4, -1/4, 0] (sample var 44/768), V01: [0, 0, 1/4, -1/2] (sample var 76/768),
    # so Var(diff) = 44/768/4 + 76/768/4 = 5/128 and z = -(1/16) / sqrt(5/128) = -1/sqrt(10).
    aucs, diff, se, z, p = delong_slow(Y8, [A8, B8])
    assert aucs == [0.875, 0.9375]
    assert se == pytest.approx(math.sqrt(5 / 128), abs=1e-15)
    assert z == pytest.approx(-1 / math.sqrt(10), abs=1e-15)
    assert p == pytest.approx(0.7518296340458492, abs=1e-12)
    r = delong_test(Y8, A8, B8)
    assert (r["auc_a"], r["auc_b"], r["diff"]) == (0.875, 0.9375, -0.0625)
    assert r["se"] == pytest.approx(se, abs=1e-10)
    assert r["z"] == pytest.approx(z, abs=1e-10)
    assert r["pvalue"] == pytest.approx(p, abs=1e-10)
    half = Z975 * se
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((diff - half, diff + half), abs=1e-6)


def test_delong_matches_slow_formula_and_sklearn_on_random_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    pa = np.clip(y * 0.3 + rng.normal(0.4, 0.2, 60), 0, 1).round(1)  # rounding -> ties
    pb = np.clip(y * 0.2 + rng.normal(0.4, 0.25, 60), 0, 1).round(2)
    aucs, diff, se, z, p = delong_slow(y, [pa, pb])
    r = delong_test(y, pa, pb)
    assert r["auc_a"] == pytest.approx(roc_auc_score(y, pa), abs=1e-12)
    assert r["auc_b"] == pytest.approx(roc_auc_score(y, pb), abs=1e-12)
    assert r["se"] == pytest.approx(se, abs=1e-10)
    assert r["z"] == pytest.approx(z, abs=1e-10)
    assert r["pvalue"] == pytest.approx(p, abs=1e-10)


def test_delong_identical_predictions():
    y, p = paper_set()
    r = delong_test(y, p, p)
    assert r["diff"] == 0.0 and r["se"] == 0.0 and r["z"] == 0.0 and r["pvalue"] == 1.0


def test_delong_auc_ci():
    r = delong_auc_ci(Y8, A8)
    # slow single-model variance: V10 = [3/4, 1, 3/4, 1], V01 = [1, 1, 1, 1/2]
    var = np.var([0.75, 1, 0.75, 1], ddof=1) / 4 + np.var([1, 1, 1, 0.5], ddof=1) / 4
    assert r["auc"] == 0.875
    assert r["se"] == pytest.approx(math.sqrt(var), abs=1e-12)
    assert r["ci_low"] == pytest.approx(0.875 - Z975 * math.sqrt(var), abs=1e-6)
    assert r["ci_high"] == 1.0  # clipped
    with pytest.raises(ValueError):
        delong_auc_ci([0, 1, 1], [0.1, 0.5, 0.7])  # one negative: variance undefined


# ------------------------------------------------------------------------------- seeds


def test_mean_std_ci_t_interval():
    r = mean_std_ci([0.8, 0.85, 0.9])
    # mean 0.85, deviations -0.05/0/0.05 -> s^2 = 0.005/2, s = 0.05; t(0.975, 2) = 4.302653
    assert r["n"] == 3
    assert r["mean"] == pytest.approx(0.85, abs=1e-12)
    assert r["std"] == pytest.approx(0.05, abs=1e-12)
    half = 4.302653 * 0.05 / math.sqrt(3)
    assert student_t.ppf(0.975, 2) == pytest.approx(4.302653, abs=1e-6)
    assert r["ci_low"] == pytest.approx(0.85 - half, abs=1e-6)
    assert r["ci_high"] == pytest.approx(0.85 + half, abs=1e-6)


def test_mean_std_ci_single_value():
    r = mean_std_ci([0.8])
    assert r["mean"] == 0.8 and r["n"] == 1
    assert math.isnan(r["std"]) and math.isnan(r["ci_low"]) and math.isnan(r["ci_high"])
