"""The shortcut probes (issue 13) on generated films where the answer is known.

A "film" here is dark background, a soft-tissue slab and two bright bone shafts. The *border*
(background grey) or the *bone* (its brightness) carries the label; toy models that read only
one of them must show it in the probes: a border reader keeps its AUC with the bone hidden and
loses it with only the bone shown, a bone reader the other way round.
"""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest
from torch import nn

from kneeosteo.data.bone import bone_mask, occlude
from kneeosteo.data.preprocess import Preprocess
from kneeosteo.data.reader import ImageMeta
from kneeosteo.evaluation.probes import (
    format_probes,
    occlusion_aucs,
    shortcut_adversarial,
    source_attributes,
    source_probe,
)

SIZE = 96


def film(border: float, bone: float, seed: int, h: int = SIZE, w: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(pixels in [0, 1], true bone region): background ``border``, tissue 0.45, two shafts ``bone``."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w), border, np.float32)
    img[:, w // 5 : 4 * w // 5] = 0.45
    truth = np.zeros((h, w), bool)
    for x0 in (0.30, 0.56):
        c = int(x0 * w)
        truth[h // 10 : 9 * h // 10, c : c + w // 7] = True
    img[truth] = bone
    img += rng.normal(0, 0.01, img.shape).astype(np.float32)
    return np.clip(img, 0, 1), truth


class CornerReader(nn.Module):
    """Logit = mean of the input's top-left corner: reads the film's border only."""

    def forward(self, images):
        return images[:, 0, :6, :6].mean(dim=(1, 2))


class CentreReader(nn.Module):
    """Logit = mean of the central band where the shafts are: reads the bone."""

    def forward(self, images):
        s = images.shape[-1]
        return images[:, 0, s // 4 : 3 * s // 4, s // 3 : 2 * s // 3].mean(dim=(1, 2))


def test_bone_mask_finds_the_shafts_and_leaves_the_background():
    img, truth = film(0.05, 0.85, 0)
    m = bone_mask(img)
    assert m.shape == img.shape and m.dtype == bool
    assert m[truth].mean() > 0.95  # the bone is inside (dilated mask)
    assert not m[:, :8].any() and not m[:, -8:].any()  # the film's border is not
    assert 0.2 < m.mean() < 0.7
    # the same on uint8 input, and a blank image hides everything rather than guessing
    assert (bone_mask((img * 255).astype(np.uint8)) == m).mean() > 0.98
    assert bone_mask(np.full((40, 50), 0.5, np.float32)).all()


def test_bone_preset_shows_the_network_only_the_bone_letterboxed():
    """preprocess = bone: the film's border and a burnt-in marker become black, the shafts stay,
    the picture is letterboxed where ``content_box`` says (as 'robust')."""
    from kneeosteo.data.preprocess import Preprocess

    img, truth = film(border=0.3, bone=0.9, seed=0, h=SIZE, w=SIZE // 2 * 2)
    img = np.pad(img, ((0, 0), (SIZE // 4, SIZE // 4)), constant_values=0.3)  # wider film: letterbox bars top/bottom
    truth = np.pad(truth, ((0, 0), (SIZE // 4, SIZE // 4)))
    img[2:8, 2:20] = 1.0  # a burnt-in marker in the border
    prep = Preprocess("bone", SIZE)
    geo = prep.geometry(img)[0].numpy()
    top, left, nh, nw = prep.content_box(*img.shape)
    assert (top, left, nh, nw) == Preprocess("robust", SIZE).content_box(*img.shape) and top > 0
    inside = cv2.resize(truth.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST).astype(bool)
    content = geo[top : top + nh, left : left + nw]
    assert content[inside].mean() > 0.8  # the bone is shown
    sx, sy = nw / img.shape[1], nh / img.shape[0]
    marker = content[int(2 * sy) : int(8 * sy) + 1, int(2 * sx) : int(20 * sx) + 1]
    assert content[:, : nw // 8].max() == 0 and marker.max() == 0  # the border and the marker are black
    robust = Preprocess("robust", SIZE).geometry(img)[0].numpy()
    assert robust[top + 1, left + 1] > 0.25  # where 'robust' shows the film's border
    assert geo[:top].max() == 0 and geo[top + nh :].max() == 0  # the letterbox bars


def test_bone_mask_ignores_a_burnt_in_white_bar():
    img, truth = film(0.05, 0.8, 1)
    img[-6:, :] = 1.0  # a white label bar along the bottom edge
    m = bone_mask(img)
    assert not m[-3:, :].any() and m[truth].mean() > 0.95


def test_occlude_hides_or_keeps_exactly_the_mask():
    img, truth = film(0.1, 0.9, 2)
    hidden = occlude(img, truth, "hide_bone")
    assert np.allclose(hidden[truth], np.median(img[~truth])) and np.array_equal(hidden[~truth], img[~truth])
    only = occlude(img, truth, "only_bone")
    assert (only[~truth] == 0).all() and np.array_equal(only[truth], img[truth])
    with pytest.raises(ValueError):
        occlude(img, truth, "blur")


def _films(carrier: str, n: int = 24):
    """Half positive; ``carrier`` says what differs between the classes (the rest varies at random)."""
    rng = np.random.default_rng(7)
    images, y = [], []
    for i in range(n):
        t = i % 2
        border = (0.02 + 0.12 * t) if carrier == "border" else rng.uniform(0.02, 0.14)
        bone = (0.7 + 0.25 * t) if carrier == "bone" else rng.uniform(0.7, 0.95)
        images.append(film(border, bone, i)[0])
        y.append(t)
    return images, np.array(y)


@pytest.mark.parametrize(
    "carrier,model,hidden,only",
    [
        ("border", CornerReader(), "high", "chance"),
        ("bone", CentreReader(), "chance", "high"),
    ],
)
def test_occlusion_probes_tell_a_border_reader_from_a_bone_reader(carrier, model, hidden, only):
    images, y = _films(carrier)
    prep = Preprocess("paper", 64)
    out = occlusion_aucs(model, prep, images, y, batch_size=8)
    for kind, want in (("hide_bone", hidden), ("only_bone", only)):
        auc = out[kind]["auc"]
        assert out[kind]["n"] == len(y) and out[kind]["ci95"][0] <= auc <= out[kind]["ci95"][1]
        if want == "high":
            assert auc > 0.95, (kind, auc)
        else:
            assert 0.2 < auc < 0.8, (kind, auc)
    assert 0.2 < out["mask_fraction"]["median"] < 0.7


def _meta(fmt: str, w: int = 100, h: int = 100, mode: str = "L") -> ImageMeta:
    return ImageMeta(path="x", format=fmt, mode=mode, width=w, height=h, bit_depth=8, file_size=1000, channels=1)


def test_shortcut_adversarial_scores_a_metadata_reader_zero_and_an_oracle_one():
    # training: the format gives the label away; test: 6 of 20 images break the rule
    train = [_meta("JPEG" if i % 2 else "PNG") for i in range(40)]
    y_train = [i % 2 for i in range(40)]
    y_test = np.array([i % 2 for i in range(20)])
    flipped = np.zeros(20, bool)
    flipped[:6] = True
    test = [_meta(("JPEG" if t else "PNG") if not f else ("PNG" if t else "JPEG")) for t, f in zip(y_test, flipped)]
    reads_format = np.array([int(m.format == "JPEG") for m in test])
    r = shortcut_adversarial(train, y_train, test, y_test, reads_format)
    assert r["n"] == 6 and r["correct"] == 0 and r["accuracy"] == 0.0
    assert r["metadata_accuracy"] == pytest.approx(14 / 20)
    assert r["ci95"][0] == 0.0 and 0.3 < r["ci95"][1] < 0.5  # Wilson at 0 of 6
    oracle = shortcut_adversarial(train, y_train, test, y_test, y_test)
    assert oracle["accuracy"] == 1.0 and oracle["correct"] == 6
    assert "skipped" in shortcut_adversarial(train, [1] * 40, test, y_test, y_test)


def test_the_metadata_forest_is_fitted_once_per_split_and_refitted_when_the_split_changes(monkeypatch):
    """Every model of a reproduce seed shares the split, so the forest is fitted once per split;
    other labels, another seed or other test images are another fit, with their own answer."""
    from kneeosteo.evaluation import probes

    fits = []
    real = probes.metadata_classifier
    monkeypatch.setattr(probes, "metadata_classifier", lambda seed=0: fits.append(seed) or real(seed))
    monkeypatch.setattr(probes, "_WRONG_MEMO", type(probes._WRONG_MEMO)())
    train = [_meta("JPEG" if i % 2 else "PNG", w=100 + i) for i in range(40)]
    y_train = [i % 2 for i in range(40)]
    test = [_meta("JPEG" if i % 3 else "PNG") for i in range(20)]
    y_test = np.array([i % 2 for i in range(20)])
    first = shortcut_adversarial(train, y_train, test, y_test, y_test)
    again = shortcut_adversarial(train, y_train, test, y_test, 1 - y_test)  # another model, same split
    assert len(fits) == 1 and again["n"] == first["n"] > 0
    assert (first["correct"], again["correct"]) == (first["n"], 0)
    flipped = shortcut_adversarial(train, y_train, test, 1 - y_test, y_test)  # other test labels
    assert len(fits) == 2 and flipped["n"] == 20 - first["n"]
    shortcut_adversarial(train, y_train, test, y_test, y_test, seed=1)
    shortcut_adversarial(train[:-1], y_train[:-1], test, y_test, y_test)
    assert fits == [0, 0, 1, 0]


def test_the_metadata_forest_never_sees_a_test_label(monkeypatch):
    """The shortcut-adversarial probe's forest is fitted on the training rows and labels only: a spy
    on its fit records exactly those (and no test row), and its answers on the test images (read
    back as the test label wherever it is right, the other one where it is wrong) are the same
    whatever the test labels are, flipped or shuffled."""
    from kneeosteo.data.shortcut import metadata_matrix
    from kneeosteo.evaluation import probes

    fits = []
    real = probes.metadata_classifier

    class Spy:
        def __init__(self, clf):
            self.clf = clf

        def fit(self, x, y):
            fits.append((np.array(x, copy=True), np.array(y, copy=True)))
            self.clf.fit(x, y)
            return self

        def predict(self, x):
            return self.clf.predict(x)

    # the audit's forest with 25 trees instead of 200: what it is fitted on is the question, not its size
    monkeypatch.setattr(probes, "metadata_classifier", lambda seed=0: Spy(real(seed).set_params(n_estimators=25)))
    monkeypatch.setattr(probes, "_WRONG_MEMO", type(probes._WRONG_MEMO)())
    rng = np.random.default_rng(0)
    train = [_meta("JPEG" if i % 2 else "PNG", w=90 + i % 7) for i in range(40)]
    y_train = np.array([i % 2 for i in range(40)])
    test = [_meta("JPEG" if i % 3 else "PNG", w=150 + i, h=90 + i % 5) for i in range(24)]  # rows training lacks
    y_test = rng.integers(0, 2, 24)
    x, _ = metadata_matrix(train + test)
    answers = []
    for yt in (y_test, 1 - y_test, rng.permutation(y_test), np.zeros(24, int)):
        fits.clear()
        r = shortcut_adversarial(train, y_train, test, yt, yt)
        assert len(fits) == 1
        fx, fy = fits[0]
        assert np.array_equal(fx, x[: len(train)]) and np.array_equal(fy, y_train)
        wrong = probes._metadata_wrong(x, y_train, yt, 0)  # memoised: the fit just spied on
        assert len(fits) == 1 and r.get("n", 0) == int(wrong.sum())
        answers.append(np.where(wrong, 1 - yt, yt))
    assert all(np.array_equal(a, answers[0]) for a in answers[1:])


def test_within_source_auc_is_half_for_a_source_reader_and_one_for_a_label_reader():
    """Two sources, each with both classes, the label mostly given away by the source: a model
    that reads only the source ranks every same-source pair as a tie (0.5), whatever its overall
    AUC; one that reads the label ranks them all right (1.0); a model that ranks backwards inside
    each source scores 0 there."""
    from kneeosteo.evaluation.probes import within_source_auc

    metas = [_meta("JPEG" if i < 20 else "PNG", w=100, h=100) for i in range(40)]
    y = np.array([1] * 15 + [0] * 5 + [1] * 5 + [0] * 15)  # JPEG mostly positive, PNG mostly negative
    source_reader = np.array([0.9 if m.format == "JPEG" else 0.1 for m in metas])
    r = within_source_auc(y, source_reader, metas)
    assert r["auc"] == 0.5 and r["pairs"] == 15 * 5 + 5 * 15 and r["strata_with_both_classes"] == 2
    assert r["ci95"] == [0.5, 0.5] and r["n"] == 40
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y, source_reader) == pytest.approx(0.75)  # (225 right + 150 ties / 2) / 400: fooled
    label_reader = y * 0.5 + np.linspace(0, 0.1, 40)
    good = within_source_auc(y, label_reader, metas)
    assert good["auc"] == 1.0 and good["ci95"][0] == 1.0
    backwards = within_source_auc(y, 1 - label_reader, metas)
    assert backwards["auc"] == 0.0
    scores = np.random.default_rng(0).random(40)
    noisy = within_source_auc(y, scores, metas)
    assert noisy["ci95"][0] < noisy["auc"] < noisy["ci95"][1] and noisy["ci95"][0] < 0.5 < noisy["ci95"][1]
    # the interval is a bootstrap of the films within each source and class: drawn here by hand
    rng, stats = np.random.default_rng(1), []
    cells = [np.flatnonzero((y == c) & ((np.arange(40) < 20) == s)) for s in (True, False) for c in (0, 1)]
    for _ in range(2000):
        idx = np.concatenate([rng.choice(c, len(c)) for c in cells])
        yy, pp, src = y[idx], scores[idx], idx < 20
        d = [pp[(src == s) & (yy == 1)][:, None] - pp[(src == s) & (yy == 0)][None, :] for s in (True, False)]
        stats.append(sum(float((x > 0).sum() + 0.5 * (x == 0).sum()) for x in d) / sum(x.size for x in d))
    assert np.quantile(stats, [0.025, 0.975]) == pytest.approx(noisy["ci95"], abs=0.03)
    pure = within_source_auc(np.array([1] * 20 + [0] * 20), source_reader, metas)  # no mixed source
    assert "skipped" in pure and pure["pairs"] == 0


def test_source_probe_finds_a_source_the_features_carry_and_not_one_they_do_not():
    rng = np.random.default_rng(0)
    metas = [_meta("JPEG" if i % 3 else "PNG", w=100 + i, h=100) for i in range(60)]
    carries = np.c_[[float(m.format == "JPEG") for m in metas], rng.normal(size=(60, 5))]
    carries[:, 0] += rng.normal(0, 0.1, 60)
    r = source_probe(carries, metas)
    assert r["format"]["balanced_accuracy"] > 0.95 and r["format"]["chance"] == 0.5
    assert r["format"]["classes"] == {"JPEG": 40, "PNG": 20} and r["format"]["n"] == 60
    noise = source_probe(rng.normal(size=(60, 6)), metas)
    assert noise["format"]["balanced_accuracy"] < 0.75
    assert "skipped" in r["mode"]  # one colour mode only
    assert sorted(set(source_attributes(metas)["aspect_tercile"])) == ["high", "low", "mid"]


def test_a_trained_run_carries_the_probes_in_its_metrics(tiny):
    """The session's tiny run was scored by train_and_score: its metrics.json holds all four
    probes with counts that match its own test set."""
    from kneeosteo.run import RunDir

    run = RunDir(tiny.run)
    m = json.loads(run.metrics_file.read_text())
    p = m["shortcut_probes"]
    n_test = m["counts"]["tp"] + m["counts"]["fp"] + m["counts"]["fn"] + m["counts"]["tn"]
    for kind in ("hide_bone", "only_bone"):
        assert p["occlusion"][kind]["n"] == n_test and 0 <= p["occlusion"][kind]["auc"] <= 1
    adv = p["shortcut_adversarial"]
    assert adv["n_test"] == n_test and 0 <= adv["n"] <= n_test
    assert set(p["source"]) == {"format", "mode", "aspect_tercile"}
    within = p["within_source"]  # the generated films: one format, mode and shape, so one stratum
    n_pos = m["counts"]["tp"] + m["counts"]["fn"]
    assert (within["n"], within["strata"], within["pairs"]) == (n_test, 1, n_pos * (n_test - n_pos))
    with open(run.predictions_file, newline="") as fh:
        rows = list(csv.DictReader(fh))
    from sklearn.metrics import roc_auc_score

    # one stratum: every pair is a same-source pair, so the probe is the ordinary AUC
    assert within["auc"] == pytest.approx(
        roc_auc_score([int(r["label"]) for r in rows], [float(r["probability"]) for r in rows]), abs=1e-6
    )
    text = format_probes(p)
    assert "bone hidden" in text and "AUC within one source" in text
