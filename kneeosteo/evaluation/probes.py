"""Shortcut probes: does a trained model read bone, or the source of the film?

On KOP the label can be guessed from file metadata alone (the audit's forest: 0.73), so accuracy
alone cannot tell a model that reads bone from one that reads the film. Three probes, each a
function on plain arrays plus one call (:func:`shortcut_probes`) that runs them for a run:

- :func:`shortcut_adversarial` — accuracy on the test images where the metadata-only classifier
  (the audit's, refitted on the training partition only) is *wrong*. The shortcut scores 0 there
  by construction and chance is 0.5: a model that reads bone keeps its accuracy, one that reads
  the film collapses.
- :func:`occlusion_aucs` — the model's AUC with (a) the bone hidden, only the film's border region
  shown, and (b) only the bone shown (the region from :func:`kneeosteo.data.bone.bone_mask`). A
  model that still ranks films with the bone hidden reads the source.
- :func:`source_probe` — how well the model's fused features (what its head reads) predict the
  file's source attributes (format, colour mode, aspect-ratio tercile), cross-validated on the
  training images. Balanced accuracy well above chance means the features carry the source.
- :func:`within_source_auc` — the model's AUC counting only positive/negative pairs of test films
  from the *same* source stratum (format x colour mode x aspect-ratio tercile). Those three
  attributes cannot rank such a pair, so this is what the model reads beyond them (not proof of
  bone: a scanner within one stratum would do too). A pure source reader scores 0.5.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from kneeosteo.data.bone import OCCLUSIONS, bone_mask, occlude
from kneeosteo.data.preprocess import Preprocess
from kneeosteo.data.reader import ImageMeta, ImageReadError, read_image
from kneeosteo.data.scan import file_meta
from kneeosteo.data.shortcut import metadata_classifier, metadata_matrix
from kneeosteo.evaluation.stats import delong_auc_ci
from kneeosteo.utils.intervals import percentile_interval, wilson_interval

__all__ = [
    "SOURCE_ATTRIBUTES",
    "format_probes",
    "occlusion_aucs",
    "shortcut_adversarial",
    "shortcut_probes",
    "source_attributes",
    "source_probe",
    "within_source_auc",
]

log = logging.getLogger(__name__)

SOURCE_ATTRIBUTES = ("format", "mode", "aspect_tercile")


def shortcut_adversarial(
    train_meta: list[ImageMeta], y_train, test_meta: list[ImageMeta], y_test, predicted, seed: int = 0
) -> dict:
    """Accuracy of ``predicted`` (0/1 per test image) on the test images the metadata classifier,
    fitted on the training images only, gets wrong; with n, a Wilson interval and that classifier's
    own test accuracy."""
    y_train, y_test, predicted = (np.asarray(a, dtype=int) for a in (y_train, y_test, predicted))
    if len(set(y_train.tolist())) < 2:
        return {"skipped": "the training partition holds one class only"}
    x, _ = metadata_matrix(list(train_meta) + list(test_meta))  # one vocabulary of formats/modes
    wrong = _metadata_wrong(x, y_train, y_test, seed)
    n, k = int(wrong.sum()), int((predicted[wrong] == y_test[wrong]).sum())
    out = {"n": n, "n_test": int(len(y_test)), "metadata_accuracy": float(1 - wrong.mean())}
    if n == 0:
        return {**out, "skipped": "the metadata classifier is right on every test image"}
    return {**out, "correct": k, "accuracy": k / n, "ci95": list(wilson_interval(k, n))}


# The metadata forest depends only on the split (metadata, labels, seed), not on the model: every
# model of a `reproduce` seed shares it. Its answer is kept per process (a grid's cells run one
# after another in one process, or in reused Ray workers), keyed by a digest of its inputs.
_WRONG_MEMO: OrderedDict[str, np.ndarray] = OrderedDict()
_WRONG_MEMO_SIZE = 64


def _metadata_wrong(x: np.ndarray, y_train: np.ndarray, y_test: np.ndarray, seed: int) -> np.ndarray:
    """Which test images the metadata classifier (fitted on the first ``len(y_train)`` rows of ``x``) gets wrong."""
    h = hashlib.sha256()
    for part in (
        np.ascontiguousarray(x, dtype=np.float64),
        y_train.astype(np.int64),
        y_test.astype(np.int64),
        np.array([seed, len(y_train)], dtype=np.int64),
    ):
        h.update(part.tobytes())
        h.update(b"|")
    key = h.hexdigest()
    if key not in _WRONG_MEMO:
        clf = metadata_classifier(seed).fit(x[: len(y_train)], y_train)
        _WRONG_MEMO[key] = clf.predict(x[len(y_train) :]) != y_test
        while len(_WRONG_MEMO) > _WRONG_MEMO_SIZE:
            _WRONG_MEMO.popitem(last=False)
    _WRONG_MEMO.move_to_end(key)
    return _WRONG_MEMO[key].copy()


def _auc_entry(y: np.ndarray, prob: np.ndarray) -> dict:
    if len(set(y.tolist())) < 2:
        return {"skipped": "the test images hold one class only", "n": int(len(y))}
    d = delong_auc_ci(y, prob)
    return {"auc": d["auc"], "ci95": [d["ci_low"], d["ci_high"]], "n": int(len(y))}


@torch.no_grad()
def _predict_pixels(model, prep: Preprocess, images: list[np.ndarray], device: str, batch_size: int) -> np.ndarray:
    """P(positive) for in-memory canonical greyscale images, the backbone run on each (nothing cached:
    occluded views are made for the probe and thrown away)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.stack([prep(p) for p in images[start : start + batch_size]]).to(device)
        x = x.contiguous(memory_format=torch.channels_last)
        out.append(torch.sigmoid(model(images=x).float()).double().cpu())
    return torch.cat(out).numpy()


def occlusion_aucs(
    model, prep: Preprocess, images: list[np.ndarray], y, device: str = "cpu", batch_size: int = 16
) -> dict:
    """AUC with the bone hidden (``hide_bone``, probe a) and with only the bone shown (``only_bone``,
    probe b), each with a DeLong interval; plus the share of each film the bone mask covers."""
    y = np.asarray(y, dtype=int)
    masks = [bone_mask(p) for p in images]
    out: dict = {}
    for kind in OCCLUSIONS:
        views = [occlude(p, m, kind) for p, m in zip(images, masks)]
        out[kind] = _auc_entry(y, _predict_pixels(model, prep, views, device, batch_size))
    share = np.array([m.mean() for m in masks])
    out["mask_fraction"] = {"median": float(np.median(share)), "min": float(share.min()), "max": float(share.max())}
    return out


def source_attributes(metas: list[ImageMeta]) -> dict[str, list[str]]:
    """Per image: its file format, colour mode, and aspect-ratio tercile (cut points from these images)."""
    aspect = np.array([m.width / m.height for m in metas])
    cuts = np.quantile(aspect, [1 / 3, 2 / 3])
    tercile = np.digitize(aspect, cuts, right=True)
    return {
        "format": [m.format for m in metas],
        "mode": [m.mode for m in metas],
        "aspect_tercile": [("low", "mid", "high")[t] for t in tercile],
    }


def _stratum_comparisons(y: np.ndarray, score: np.ndarray, strata: np.ndarray) -> list[np.ndarray]:
    """For each stratum holding both classes, C[i, j] = 1, 0.5 or 0 as its i-th positive ranks
    above, ties or ranks below its j-th negative."""
    out = []
    for g in np.unique(strata):
        m = strata == g
        pos, neg = score[m & (y == 1)], score[m & (y == 0)]
        if len(pos) and len(neg):
            d = pos[:, None] - neg[None, :]
            out.append((d > 0) + 0.5 * (d == 0))
    return out


def within_source_auc(
    y, prob, metas: list[ImageMeta], reference: list[ImageMeta] = (), boot: int = 1000, seed: int = 0
) -> dict:
    """AUC over the positive/negative pairs of test images from the same source stratum (format x
    colour mode x aspect-ratio tercile; the tercile cut points from ``metas`` + ``reference``, e.g.
    the training images: no labels are used), pooled over strata; a 95% interval from a bootstrap
    of the images within each stratum and class (a resample's right pairs are a @ C @ b, with a
    and b how often it drew each positive and each negative)."""
    y, prob = np.asarray(y, dtype=int), np.asarray(prob, dtype=np.float64)
    attrs = source_attributes(list(metas) + list(reference))
    strata = np.array(["/".join(v) for v in zip(*(attrs[a][: len(metas)] for a in SOURCE_ATTRIBUTES))])
    comps = _stratum_comparisons(y, prob, strata)
    pairs = sum(c.size for c in comps)
    out = {
        "n": int(len(y)),
        "pairs": int(pairs),
        "strata": int(len(set(strata.tolist()))),
        "strata_with_both_classes": len(comps),
    }
    if not pairs:
        return {**out, "skipped": "no source stratum holds test images of both classes"}
    rng = np.random.default_rng(seed)
    right = np.zeros(boot)
    for c in comps:
        a = rng.multinomial(c.shape[0], np.full(c.shape[0], 1 / c.shape[0]), size=boot)
        b = rng.multinomial(c.shape[1], np.full(c.shape[1], 1 / c.shape[1]), size=boot)
        right += np.einsum("ri,ij,rj->r", a, c, b)
    lo, hi = percentile_interval(right / pairs, 0.05)
    return {**out, "auc": float(sum(c.sum() for c in comps) / pairs), "ci95": [lo, hi]}


def source_probe(features: np.ndarray, metas: list[ImageMeta], folds: int = 5, seed: int = 0) -> dict:
    """Cross-validated balanced accuracy of a logistic regression predicting each source attribute
    from ``features``; chance is 1 / classes. Classes with fewer than ``folds`` images are left out;
    an attribute with fewer than two classes left is reported as skipped."""
    features = np.asarray(features, dtype=np.float64)
    out: dict = {}
    for name, values in source_attributes(metas).items():
        values = np.asarray(values)
        classes, counts = np.unique(values, return_counts=True)
        kept = classes[counts >= folds]
        entry: dict = {"classes": {str(c): int(n) for c, n in zip(classes, counts)}}
        if len(kept) < 2:
            out[name] = {**entry, "skipped": f"fewer than two classes with {folds} or more training images"}
            continue
        rows = np.isin(values, kept)
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
        pred = cross_val_predict(clf, features[rows], values[rows], cv=cv)
        out[name] = {
            **entry,
            "balanced_accuracy": float(balanced_accuracy_score(values[rows], pred)),
            "chance": 1 / len(kept),
            "n": int(rows.sum()),
        }
    return out


def _metas(root: Path, paths: list[str]) -> list[ImageMeta]:
    return [file_meta(root / p) for p in paths]


@torch.no_grad()
def _fused(model, prep: Preprocess, part, device: str) -> np.ndarray:
    model.eval()
    return torch.cat(
        [model.fused_features(images=x, features=f).float().cpu() for x, f in part.batches(prep, device)]
    ).numpy()


def shortcut_probes(
    model,
    prep: Preprocess,
    root: str | Path,
    test_paths: list[str],
    y_test,
    prob,
    threshold: float,
    train=None,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """All four probes for one scored test set. ``train`` is the prepared training partition
    (originals; ``None`` when the data scored has no training partition, e.g. an external set:
    then only the occlusion and within-source probes run)."""
    root = Path(root)
    y_test, prob = np.asarray(y_test, dtype=int), np.asarray(prob, dtype=np.float64)
    images, keep = [], []
    for i, rel in enumerate(test_paths):
        try:
            images.append(read_image(root / rel).pixels)
            keep.append(i)
        except (ImageReadError, OSError) as exc:  # it was readable a moment ago; say so, go on
            log.warning("%s: %s; left out of the occlusion probes", root / rel, exc)
    out: dict = {"occlusion": occlusion_aucs(model, prep, images, y_test[keep], device)}
    has_train = train is not None and len(train) > 0
    train_meta = _metas(root, train.paths) if has_train else []
    kept_meta = _metas(root, [test_paths[i] for i in keep])
    out["within_source"] = within_source_auc(y_test[keep], prob[keep], kept_meta, train_meta, seed=seed)
    if not has_train:
        skipped = {"skipped": "no training partition (scored on a data set without a split)"}
        return {**out, "shortcut_adversarial": skipped, "source": skipped}
    test_meta = kept_meta if len(keep) == len(test_paths) else _metas(root, test_paths)
    y_train = train.targets.numpy().astype(int)
    out["shortcut_adversarial"] = shortcut_adversarial(
        train_meta, y_train, test_meta, y_test, (prob >= threshold).astype(int), seed
    )
    out["source"] = source_probe(_fused(model, prep, train, device), train_meta, seed=seed)
    return out


def _value(entry: dict, key: str) -> str:
    if "skipped" in entry:
        return "n/a"
    lo, hi = entry["ci95"]
    return f"{entry[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def format_probes(p: dict) -> str:
    """The probes, a line each, for the console."""
    adv, occ = p["shortcut_adversarial"], p["occlusion"]
    lines = [
        f"shortcut-adversarial accuracy {_value(adv, 'accuracy')}"
        + (f" (n = {adv['n']} of {adv['n_test']})" if "n" in adv else f" ({adv['skipped']})"),
        f"AUC with the bone hidden {_value(occ['hide_bone'], 'auc')}, bone only {_value(occ['only_bone'], 'auc')}",
    ]
    within = p.get("within_source")
    if within:
        lines.append(
            f"AUC within one source (same-stratum pairs) {_value(within, 'auc')}"
            + (
                f" ({within['pairs']} pairs in {within['strata_with_both_classes']} strata)"
                if "skipped" not in within
                else f" ({within['skipped']})"
            )
        )
    src = p["source"]
    if "skipped" in src:
        lines.append(f"source probe: {src['skipped']}")
    else:
        parts = [
            f"{k} {v['balanced_accuracy']:.2f} (chance {v['chance']:.2f})" for k, v in src.items() if "skipped" not in v
        ]
        lines.append("source probe, balanced accuracy: " + (", ".join(parts) or "n/a (one source only)"))
    return "\n".join(lines)
