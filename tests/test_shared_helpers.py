"""The two shared helper modules: intervals (Wilson, the seeded percentile bootstrap) and array
checks (one error type). The metrics' and trust estimators' own tests check the numbers built on
them; these pin the helpers' contracts against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from statsmodels.stats.proportion import proportion_confint

from kneeosteo.errors import ArrayError, DataError, KneeosteoError
from kneeosteo.utils.arrays import (
    as_binary_labels,
    as_class_indices,
    as_matrix,
    as_scores_and_labels,
    as_values,
    check_same_length,
)
from kneeosteo.utils.intervals import bootstrap_replicates, percentile_interval, wilson_interval


def test_wilson_interval_is_statsmodels_and_nan_without_cases():
    assert wilson_interval(7, 20, 0.1) == pytest.approx(proportion_confint(7, 20, alpha=0.1, method="wilson"))
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_bootstrap_draws_each_stratum_in_turn_like_a_hand_written_loop():
    """Replicates equal a hand-drawn stratified bootstrap from the same seed: with chunk=1 the
    per-resample loop (draw stratum 0, then 1, per resample), in one chunk all resamples of stratum
    0 then all of stratum 1; each resample keeps the strata's sizes."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=23)
    strata = [np.flatnonzero(x > 0), np.flatnonzero(x <= 0)]

    def mean(idx):
        return {"mean": x[idx].mean(axis=1), "pos": (x[idx[:, : strata[0].size]] > 0).mean(axis=1)}

    loop_rng, block_rng = np.random.default_rng(11), np.random.default_rng(11)
    loop = [x[np.concatenate([s[loop_rng.integers(0, s.size, s.size)] for s in strata])].mean() for _ in range(50)]
    block = x[np.concatenate([s[block_rng.integers(0, s.size, (50, s.size))] for s in strata], axis=1)].mean(axis=1)
    for chunk, hand in ((1, loop), (None, block), (50, block)):
        out = bootstrap_replicates(mean, strata, 50, 11, chunk=chunk)
        assert np.array_equal(out["mean"], np.array(hand))
        assert np.all(out["pos"] == 1.0)  # the first stratum's columns hold only its own members
    assert not np.array_equal(bootstrap_replicates(mean, strata, 50, 12)["mean"], block)


def test_percentile_interval_ignores_undefined_replicates():
    r = np.r_[np.arange(101.0), [np.nan, np.inf]]
    assert percentile_interval(r, 0.1) == pytest.approx((5.0, 95.0))
    assert all(math.isnan(v) for v in percentile_interval(np.array([np.nan]), 0.05))


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: as_values([1.0, np.nan], "scores"), "NaN"),
        (lambda: as_values(np.zeros((2, 2)), "scores"), "shape"),
        (lambda: as_values([np.inf, np.nan], "lower", allow_inf=True), "1 value"),
        (lambda: as_binary_labels([0, 2], "y"), "0/1"),
        (lambda: as_class_indices([0, 3], 3, "y"), r"\[0, 3\)"),
        (lambda: as_class_indices([0, 1], 3, "y", n=3), "3 class indices"),
        (lambda: as_class_indices([], 3, "y"), "empty"),
        (lambda: as_matrix(np.full((2, 3), 0.5), "probs", softmax=True), "sum to 1"),
        (lambda: as_matrix(np.zeros(3), "logits"), "K >= 2"),
        (lambda: check_same_length(y=[1, 2, 3], p=[1, 2]), "3 items"),
        (lambda: as_scores_and_labels([0.1, 0.2], [1, 1]), "both classes"),
    ],
)
def test_every_array_check_raises_the_one_error_type(call, words):
    with pytest.raises(ArrayError, match=words) as exc:
        call()
    # one type that the metrics' callers (ValueError) and the CLI / trust callers (DataError) both catch
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, DataError)
    assert isinstance(exc.value, KneeosteoError) and "\n" not in str(exc.value)


def test_array_checks_pass_good_input_through():
    assert as_values([[1.0], [2.0]], "x").tolist() == [1.0, 2.0]  # a (n, 1) column
    assert as_values([np.inf, 1.0], "lower", allow_inf=True)[0] == np.inf
    assert as_binary_labels([True, False], "y").tolist() == [1, 0]
    assert as_class_indices([2.0, 0.0], 3, "y").dtype == np.int64
