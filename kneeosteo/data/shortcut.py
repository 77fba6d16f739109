"""The shortcut check: how well can the label be guessed from file metadata alone?

If width, height, colour mode or file size predict the label, an image model can score well
without looking at bone at all. This figure is the bar any model on the data must clear.
"""

from __future__ import annotations

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from kneeosteo.data.reader import ImageMeta
from kneeosteo.data.scan import Record
from kneeosteo.utils.intervals import wilson_interval

FEATURES = ("width", "height", "aspect_ratio", "file_size", "bit_depth", "channels", "format", "mode")


def metadata_matrix(records: list[Record] | list[ImageMeta]) -> tuple[np.ndarray, list[str]]:
    """Numeric features plus one-hot format and colour mode, for scan records or bare ``ImageMeta``s."""
    metas = [getattr(r, "meta", r) for r in records]
    formats = sorted({m.format for m in metas})
    modes = sorted({m.mode for m in metas})
    names = ["width", "height", "aspect_ratio", "file_size", "bit_depth", "channels"]
    names += [f"format={f}" for f in formats] + [f"mode={m}" for m in modes]
    rows = []
    for m in metas:
        rows.append(
            [m.width, m.height, m.width / m.height, m.file_size, m.bit_depth, m.channels]
            + [float(m.format == f) for f in formats]
            + [float(m.mode == md) for md in modes]
        )
    return np.asarray(rows, dtype=float), names


def metadata_classifier(seed: int = 0) -> RandomForestClassifier:
    """The audit's metadata-only classifier; the shortcut probes refit the same one on a training partition."""
    return RandomForestClassifier(n_estimators=200, max_depth=4, random_state=seed, n_jobs=1)


def metadata_only_accuracy(
    records: list[Record], groups: list[int], folds: int = 5, repeats: int = 5, seed: int = 0
) -> dict:
    """Cross-validated accuracy/AUC of a small random forest on metadata; folds respect duplicate groups.

    Each repeat gives out-of-fold predictions for every image; the reported accuracy is the mean
    over repeats, with a Wilson 95% interval for that proportion over n = images.
    """
    y = np.array([r.target for r in records])
    if len(set(y)) < 2 or min(np.bincount(y)) < folds:
        return {"accuracy": None, "reason": "too few images per class for cross-validation"}
    x, names = metadata_matrix(records)
    accs, aucs = [], []
    importances = np.zeros(len(names))
    k = int(y.max()) + 1
    for rep in range(repeats):
        prob = np.zeros((len(y), k))
        cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + rep)
        for tr, te in cv.split(x, y, groups):
            clf = metadata_classifier(seed + rep)
            clf.fit(x[tr], y[tr])
            prob[np.ix_(te, clf.classes_)] = clf.predict_proba(x[te])
            importances += clf.feature_importances_
        # two classes: P(positive) >= 0.5, as before; more: the most probable class, one-vs-rest macro AUC
        pred = (prob[:, 1] >= 0.5).astype(int) if k == 2 else prob.argmax(axis=1)
        accs.append((pred == y).mean())
        aucs.append(roc_auc_score(y, prob[:, 1]) if k == 2 else roc_auc_score(y, prob, multi_class="ovr"))
    lo, hi = wilson_interval(int(round(np.mean(accs) * len(y))), len(y))
    order = np.argsort(-importances)
    return {
        "classifier": f"RandomForest(200 trees, depth 4), {folds}-fold StratifiedGroupKFold x {repeats}",
        "features": list(FEATURES),
        "n": int(len(y)),
        "accuracy": float(np.mean(accs)),
        "accuracy_std": float(np.std(accs)),
        "accuracy_ci95": [float(lo), float(hi)],
        "auc": float(np.mean(aucs)),
        "majority_baseline": float(np.bincount(y).max() / len(y)),
        "top_features": [names[i] for i in order[:5]],
    }


def metadata_weights(
    metas: list[ImageMeta] | list[Record], y, seed: int = 0, folds: int = 5, clip: float = 10.0
) -> np.ndarray:
    """Inverse-propensity weights against the metadata shortcut, one per training image.

    Each image is weighted by 1 / P(its own label | its file metadata), P from the audit's forest
    fitted out of fold (``folds``-fold stratified, on these images only), clipped at ``clip`` and
    scaled to mean 1. Images whose metadata gives their label away count little, those whose
    metadata points the wrong way count a lot, so a model trained with them gains less from reading
    the source. Fewer than ``folds`` images in a class: all weights 1 (nothing to fit on).
    """
    y = np.asarray(y, dtype=int)
    counts = np.bincount(y, minlength=2)
    if len(y) == 0 or counts.min() < folds:
        return np.ones(len(y))
    x, _ = metadata_matrix(metas)
    prob = np.zeros(len(y))
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        prob[te] = metadata_classifier(seed).fit(x[tr], y[tr]).predict_proba(x[te])[:, 1]
    own = np.where(y == 1, prob, 1 - prob)
    w = np.minimum(1.0 / np.maximum(own, 1e-6), clip)
    return w / w.mean()
