"""Which levers make a frozen-feature model read bone rather than the film's source? (issue 13)

Protocol (see research/LEVERS.md): the de-duplicated KOP images (label-conflict copies and
redundant exact duplicates removed by kneeosteo.data.split.deduplicate), 5 x repeated
stratified GROUP 5-fold CV (groups = kneeosteo.data.duplicates.leakage_groups, exact + near
duplicates), every image tested once per repeat. Classifier: standardised logistic regression on
frozen pooled EfficientNet-Lite features, C chosen by an inner stratified group 5-fold CV on the
training folds only (log-loss). Nothing is tuned on test folds.

Per lever: accuracy (Wilson CI), AUC (stratified bootstrap CI), shortcut-adversarial accuracy
(on images where the audit's metadata random forest, fitted on the same training folds, is
wrong), occlusion probes (a) bone hidden / (b) only bone shown, AUC of the same fitted model.

Usage (from the repository root, PYTHONPATH=. and KNEEOSTEO_CACHE set):
    python research/levers.py prepare            # decode, bone masks, example PNGs
    python research/levers.py features CONFIG... # frozen features (cached npz)
    python research/levers.py evaluate [LEVER...]# OOF metrics -> docs/results/research/
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import warnings

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent
DATA = Path(os.environ.get("KNEEOSTEO_DATA") or ROOT.parent.parent / "shared" / "datasets" / "kop")
CACHE = Path(os.environ.get("KNEEOSTEO_CACHE") or Path.home() / ".cache" / "kneeosteo-levers")
RESULTS = Path(os.environ.get("LEVERS_RESULTS", ROOT.parent / "docs" / "results" / "research"))
MAX_SIDE = 1024  # decoded radiographs are cached at most this long (uint8)
MASK_SIDE = 512  # bone masks are computed at this scale
REPEATS, FOLDS, INNER = 5, 5, 5
CS = np.logspace(-4, 0, 9)
warnings.filterwarnings("ignore", category=FutureWarning)


# ------------------------------------------------------------------------------------------
# data: de-duplicated records, leakage groups, cached pixels


def load_records():
    from kneeosteo.data.duplicates import deduplicate, leakage_groups
    from kneeosteo.data.scan import scan_dataset

    scan = scan_dataset(DATA)
    kept, excluded = deduplicate(scan.records)
    kept = sorted(kept, key=lambda r: r.path)
    g = leakage_groups(kept)
    groups = np.array([g[r.path] for r in kept])
    y = np.array([r.target for r in kept])
    return kept, y, groups, excluded


def _pix_path(cid: str) -> Path:
    return CACHE / "pixels" / f"{cid}.png"


def load_pixels(rec) -> np.ndarray:
    """uint8 greyscale, longest side <= MAX_SIDE (INTER_AREA), cached as PNG by content id."""
    p = _pix_path(rec.content_id)
    if p.is_file():
        return cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    from kneeosteo.data.reader import read_image, to_uint8

    img = to_uint8(read_image(DATA / rec.path).pixels)
    h, w = img.shape
    s = MAX_SIDE / max(h, w)
    if s < 1:
        img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    p.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(p), img)
    return img


# ------------------------------------------------------------------------------------------
# bone region without labels


# bone_mask and occlude now live in the package (kneeosteo.data.bone, ported from this script
# unchanged but for names and float input): the probes in `evaluate`/`reproduce` use them.
from kneeosteo.data.bone import bone_mask  # noqa: E402
from kneeosteo.data.bone import occlude as _occlude  # noqa: E402


def _mask_path(cid: str) -> Path:
    return CACHE / "masks" / f"{cid}.png"


def load_mask(rec, img) -> np.ndarray:
    p = _mask_path(rec.content_id)
    if p.is_file():
        return cv2.imread(str(p), cv2.IMREAD_UNCHANGED) > 0
    m = bone_mask(img)
    p.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(p), m.astype(np.uint8) * 255)
    return m


def occlude(img: np.ndarray, mask: np.ndarray, kind: str) -> np.ndarray:
    """'orig' (unchanged) or the package's hide_bone / only_bone view."""
    return img.copy() if kind == "orig" else _occlude(img, mask, kind)


def bbox(mask: np.ndarray, pad: float = 0.05) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    if ys.size == 0:
        return 0, h, 0, w
    py, px = int(pad * h), int(pad * w)
    return max(0, ys.min() - py), min(h, ys.max() + 1 + py), max(0, xs.min() - px), min(w, xs.max() + 1 + px)


def cmd_prepare(args) -> None:
    recs, y, groups, excluded = load_records()
    t = time.time()
    areas = []
    for r in recs:
        img = load_pixels(r)
        m = load_mask(r, img)
        areas.append(m.mean())
    areas = np.array(areas)
    print(
        f"{len(recs)} images (excluded {len(excluded)}), {len(set(groups))} leakage groups, "
        f"decode+mask {time.time() - t:.0f}s; mask area fraction median {np.median(areas):.2f} "
        f"[{areas.min():.2f}-{areas.max():.2f}]"
    )
    # example sheet: original | mask outline | probe (a) | probe (b), a spread of files
    ex = ROOT / "masks"
    ex.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    picks = sorted(rng.choice(len(recs), size=12, replace=False).tolist())
    # plus the smallest and largest masks (where the method is most likely to fail)
    picks = sorted(set(picks + [int(areas.argmin()), int(areas.argmax())]))
    for i in picks:
        r = recs[i]
        img = load_pixels(r)
        m = load_mask(r, img)
        s = 256 / img.shape[0]
        size = (max(1, round(img.shape[1] * s)), 256)
        over = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        cnts, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(over, cnts, -1, (0, 0, 255), max(2, img.shape[0] // 150))
        y0, y1, x0, x1 = bbox(m)
        cv2.rectangle(over, (x0, y0), (x1 - 1, y1 - 1), (0, 255, 0), max(2, img.shape[0] // 150))
        tiles = [cv2.resize(over, size, interpolation=cv2.INTER_AREA)]
        for kind in ("hide_bone", "only_bone"):
            tiles.append(
                cv2.cvtColor(cv2.resize(occlude(img, m, kind), size, interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2BGR)
            )
        name = Path(r.path).stem
        cv2.imwrite(str(ex / f"{name}.png"), np.hstack(tiles))
    (ex / "README.md").write_text(
        "Bone-region masks found without labels (research/levers.py `bone_mask`): each PNG shows "
        "the radiograph with the mask outline (red) and the crop box (green), then occlusion "
        "probe (a) (bone hidden, filled with the median of the rest) and probe (b) (only the "
        "bone region shown). 12 files drawn at random (seed 0) plus the smallest and the largest "
        "mask.\n\n"
        + "\n".join(
            f"- {Path(recs[i].path).stem}.png: {recs[i].path}, mask area {areas[i]:.2f} of the image" for i in picks
        )
        + "\n"
    )


# ------------------------------------------------------------------------------------------
# feature configurations


CONFIGS = {
    # name: backbone, geometry (stretch|letterbox), size, crop to bone box, intensity (none|pct|clahe)
    "l0-stretch224": ("efficientnet_lite0", "stretch", 224, False, "none"),
    "l0-lb224": ("efficientnet_lite0", "letterbox", 224, False, "none"),
    "l0-lb384": ("efficientnet_lite0", "letterbox", 384, False, "none"),
    "l0-lb512": ("efficientnet_lite0", "letterbox", 512, False, "none"),
    "l0-crop384": ("efficientnet_lite0", "letterbox", 384, True, "none"),
    "l0-crop384-pct": ("efficientnet_lite0", "letterbox", 384, True, "pct"),
    "l0-crop384-clahe": ("efficientnet_lite0", "letterbox", 384, True, "clahe"),
    "l0-lb384-pct": ("efficientnet_lite0", "letterbox", 384, False, "pct"),
    "l0-lb384-clahe": ("efficientnet_lite0", "letterbox", 384, False, "clahe"),
    "l0-crop224": ("efficientnet_lite0", "letterbox", 224, True, "none"),
    "l0-crop512": ("efficientnet_lite0", "letterbox", 512, True, "none"),
    "l1-crop384": ("efficientnet_lite1", "letterbox", 384, True, "none"),
    "l2-crop384": ("efficientnet_lite2", "letterbox", 384, True, "none"),
    "l1-lb384": ("efficientnet_lite1", "letterbox", 384, False, "none"),
    "l2-lb384": ("efficientnet_lite2", "letterbox", 384, False, "none"),
}
VIEWS = ("orig", "hide_bone", "only_bone", "flip", "flip_hide_bone", "flip_only_bone")


def intensity(img: np.ndarray, kind: str, mask: np.ndarray | None = None) -> np.ndarray:
    if kind == "none":
        return img
    if kind == "pct":  # per-image 1-99 percentile window, computed inside the bone region
        ref = img[mask] if mask is not None and mask.any() else img
        lo, hi = np.percentile(ref, [1, 99])
        return np.clip((img.astype(np.float32) - lo) / max(hi - lo, 1.0) * 255, 0, 255).astype(np.uint8)
    if kind == "clahe":
        return cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(img)
    raise ValueError(kind)


def make_input(img: np.ndarray, mask: np.ndarray, cfg, view: str) -> np.ndarray:
    """uint8 image -> float32 (S, S) in [0, 1], the picture the backbone sees (before mean/std)."""
    _, geom, size, crop, inten = cfg
    flip = view.startswith("flip")
    kind = view.replace("flip_", "") if view != "flip" else "orig"
    x = intensity(img, inten, mask)  # intensity from the full (unoccluded) image
    x = occlude(x, mask, kind)
    if crop:
        y0, y1, x0, x1 = bbox(mask)
        x = x[y0:y1, x0:x1]
    if flip:
        x = x[:, ::-1]
    h, w = x.shape
    if geom == "stretch":
        return cv2.resize(x, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    small = cv2.resize(np.ascontiguousarray(x), (nw, nh), interpolation=interp).astype(np.float32) / 255
    out = np.zeros((size, size), np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = small
    return out


def feature_path(name: str) -> Path:
    return CACHE / "features" / f"{name}.npz"


def compute_features(name: str, views=("orig", "hide_bone", "only_bone"), batch: int = 8) -> None:
    import torch

    from kneeosteo.models import build_backbone, get_backbone_spec

    torch.set_num_threads(1)
    cfg = CONFIGS[name]
    recs, *_ = load_records()
    out = feature_path(name)
    have = dict(np.load(out)) if out.is_file() else {}
    todo = [v for v in views if v not in have]
    if not todo:
        print(f"{name}: cached ({', '.join(k for k in have if k in VIEWS)})")
        return
    model, info = build_backbone(cfg[0], allow_download=False)
    spec = get_backbone_spec(cfg[0])
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    pix = [load_pixels(r) for r in recs]
    masks = [load_mask(r, p) for r, p in zip(recs, pix)]
    for v in todo:
        t = time.time()
        feats = []
        for i in range(0, len(recs), batch):
            x = np.stack([make_input(pix[j], masks[j], cfg, v) for j in range(i, min(i + batch, len(recs)))])
            xt = (torch.from_numpy(x)[:, None].expand(-1, 3, -1, -1) - mean) / std
            with torch.inference_mode():
                feats.append(model(xt).numpy().astype(np.float32))
        have[v] = np.concatenate(feats)
        have[f"seconds_{v}"] = np.array(time.time() - t)
        have["paths"] = np.array([r.path for r in recs])
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp.npz")
        np.savez(tmp, **have)
        os.replace(tmp, out)
        print(f"{name} {v}: {have[v].shape} in {have[f'seconds_{v}']:.0f}s", flush=True)


def cmd_features(args) -> None:
    views = tuple(args.views.split(","))
    for name in args.configs:
        compute_features(name, views)


# ------------------------------------------------------------------------------------------
# levers and their out-of-fold evaluation

# name: (configs, combine, tta, what it tests). combine: single | concat (features side by side)
# | mean (average of per-config probabilities) | select (per outer fold, the config with the best
# inner-CV log-loss; an honest "pick the best setting" row).
LEVERS = {
    "paper-stretch224": (["l0-stretch224"], "single", False, "Lite0, the paper's 224-px stretch"),
    "letterbox224": (["l0-lb224"], "single", False, "Lite0, letterbox 224 (no aspect cue)"),
    "letterbox384": (["l0-lb384"], "single", False, "Lite0, letterbox 384"),
    "letterbox512": (["l0-lb512"], "single", False, "Lite0, letterbox 512"),
    "crop224": (["l0-crop224"], "single", False, "Lite0, crop to bone box, letterbox 224"),
    "crop384": (["l0-crop384"], "single", False, "Lite0, crop to bone box, letterbox 384"),
    "crop512": (["l0-crop512"], "single", False, "Lite0, crop to bone box, letterbox 512"),
    "crop384-pct": (["l0-crop384-pct"], "single", False, "crop384 + per-image 1-99 percentile window (bone region)"),
    "crop384-clahe": (["l0-crop384-clahe"], "single", False, "crop384 + CLAHE (clip 2, 8x8)"),
    "lb384-pct": (["l0-lb384-pct"], "single", False, "letterbox384 + percentile window"),
    "lb384-clahe": (["l0-lb384-clahe"], "single", False, "letterbox384 + CLAHE"),
    "lite1-crop384": (["l1-crop384"], "single", False, "Lite1, crop384"),
    "lite2-crop384": (["l2-crop384"], "single", False, "Lite2, crop384"),
    "lite1-lb384": (["l1-lb384"], "single", False, "Lite1, letterbox384"),
    "lite2-lb384": (["l2-lb384"], "single", False, "Lite2, letterbox384"),
    "crop384-tta": (["l0-crop384"], "single", True, "crop384 + horizontal-flip TTA"),
    "lite012-crop384-concat": (
        ["l0-crop384", "l1-crop384", "l2-crop384"],
        "concat",
        False,
        "Lite0+1+2 crop384 features concatenated",
    ),
    "lite012-crop384-mean": (
        ["l0-crop384", "l1-crop384", "l2-crop384"],
        "mean",
        False,
        "Lite0/1/2 crop384, mean of probabilities",
    ),
    "lite012-crop384-mean-tta": (
        ["l0-crop384", "l1-crop384", "l2-crop384"],
        "mean",
        True,
        "Lite0/1/2 crop384 ensemble + flip TTA",
    ),
    "crop-res-mean": (["l0-crop384", "l0-crop512"], "mean", False, "Lite0 crop384 + crop512, mean"),
    "letterbox384-ipw": (
        ["l0-lb384"],
        "single",
        False,
        "letterbox384, trained with inverse-propensity weights against the metadata shortcut",
    ),
    "crop384-ipw": (["l0-crop384"], "single", False, "crop384 + inverse-propensity weights"),
    "crop384-pct-ipw": (
        ["l0-crop384-pct"],
        "single",
        False,
        "crop384 + percentile window + inverse-propensity weights",
    ),
    "crop384-clahe-ipw": (["l0-crop384-clahe"], "single", False, "crop384 + CLAHE + inverse-propensity weights"),
    "lite012-crop384-mean-ipw": (
        ["l0-crop384", "l1-crop384", "l2-crop384"],
        "mean",
        False,
        "Lite0/1/2 crop384 ensemble + inverse-propensity weights",
    ),
    "paper-stretch224-ipw": (["l0-stretch224"], "single", False, "paper input + inverse-propensity weights"),
    "letterbox384-resid": (
        ["l0-lb384"],
        "single",
        False,
        "letterbox384, features residualised on binned metadata (training fold)",
    ),
    "crop384-resid": (["l0-crop384"], "single", False, "crop384, features residualised on binned metadata"),
    "lite012-crop384-mean-resid": (
        ["l0-crop384", "l1-crop384", "l2-crop384"],
        "mean",
        False,
        "Lite0/1/2 crop384 ensemble, residualised features",
    ),
    "select-inner": (None, "select", False, "per fold, the single config with the best inner-CV log-loss"),
}
REFERENCE = "paper-stretch224"
META_X = None  # metadata matrix of the records (set by cmd_evaluate)
META_BASIS = None


def outer_splits(y, groups, repeats):
    from sklearn.model_selection import StratifiedGroupKFold

    return [
        list(StratifiedGroupKFold(FOLDS, shuffle=True, random_state=rep).split(np.zeros(len(y)), y, groups))
        for rep in range(repeats)
    ]


def ipw_weights(xm, y, groups, seed):
    """Inverse-propensity weights against the shortcut, from training images only: the audit's
    metadata forest predicts each training image's label out of fold (inner group 5-fold); an
    image gets weight 1 / P(its own label | metadata), clipped at 10, normalised to mean 1. Images
    the metadata gets wrong thus count more, so the probe must learn what the metadata cannot."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import StratifiedGroupKFold

    p = np.zeros(len(y))
    for a, b in StratifiedGroupKFold(INNER, shuffle=True, random_state=2000 + seed).split(xm, y, groups):
        rf = RandomForestClassifier(n_estimators=200, max_depth=4, random_state=seed, n_jobs=1).fit(xm[a], y[a])
        p[b] = rf.predict_proba(xm[b])[:, 1]
    p_own = np.where(y == 1, p, 1 - p)
    w = 1 / np.clip(p_own, 0.1, 1)
    return w / w.mean()


def metadata_basis(xm):
    """Metadata as a design matrix for linear deconfounding: the one-hot format/mode columns plus
    every numeric column (width, height, aspect, file size, bit depth, channels) one-hot binned
    into quintiles, so that non-linear dependence on, e.g., the aspect ratio is removed too."""
    cols = []
    for j in range(xm.shape[1]):
        v = xm[:, j]
        if set(np.unique(v)) <= {0.0, 1.0}:
            cols.append(v[:, None])
        else:
            edges = np.unique(np.quantile(v, [0.2, 0.4, 0.6, 0.8]))
            b = np.digitize(v, edges)
            cols.append(np.eye(len(edges) + 1)[b])
    return np.hstack(cols)


def fit_lr(x, y, groups, seed, sample_weight=None):
    """Standardise + L2 logistic regression; C by inner stratified group CV (log-loss)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.preprocessing import StandardScaler

    inner = list(StratifiedGroupKFold(INNER, shuffle=True, random_state=1000 + seed).split(x, y, groups))
    sc = StandardScaler().fit(x)
    clf = LogisticRegressionCV(Cs=CS, cv=inner, scoring="neg_log_loss", max_iter=5000, n_jobs=1)
    clf.fit(sc.transform(x), y, sample_weight=sample_weight)
    score = float(clf.scores_[1].mean(axis=0).max())
    return (lambda z: clf.predict_proba(sc.transform(z))[:, 1]), score, float(clf.C_[0])


def metadata_wrong(recs, y, groups, splits):
    """Per repeat: bool[n], True where the audit's metadata forest (fitted on the training folds) is wrong."""
    from sklearn.ensemble import RandomForestClassifier

    from kneeosteo.data.shortcut import metadata_matrix

    x, _ = metadata_matrix(recs)
    out, accs = [], []
    for rep, folds in enumerate(splits):
        prob = np.zeros(len(y))
        for tr, te in folds:
            rf = RandomForestClassifier(n_estimators=200, max_depth=4, random_state=rep, n_jobs=1).fit(x[tr], y[tr])
            prob[te] = rf.predict_proba(x[te])[:, 1]
        wrong = (prob >= 0.5) != y
        out.append(wrong)
        accs.append(1 - wrong.mean())
    return np.array(out), accs


def _feats(name):
    return np.load(feature_path(name))


def run_lever(name, y, groups, splits):
    configs, combine, tta, _ = LEVERS[name]
    if combine == "select":
        configs = [c for c in CONFIGS if feature_path(c).is_file()]
    F = {c: _feats(c) for c in configs}
    views = ["orig", "hide_bone", "only_bone"]
    if tta:
        views += ["flip", "flip_hide_bone", "flip_only_bone"]
    R = len(splits)
    P = {v: np.zeros((R, len(y))) for v in ("orig", "hide_bone", "only_bone")}
    chosen, cs = [], []
    t = time.time()

    resid = name.endswith("-resid")

    def data(cs_, view):
        return np.hstack([F[c][view] for c in cs_])

    for rep, folds in enumerate(splits):
        for tr, te in folds:
            units = [configs] if combine == "concat" else [[c] for c in configs]
            fits = []
            sw = ipw_weights(META_X[tr], y[tr], groups[tr], rep) if name.endswith("-ipw") else None
            for u in units:
                xtr = data(u, "orig")[tr]
                if resid:
                    from sklearn.linear_model import Ridge

                    rr = Ridge(alpha=1.0).fit(META_BASIS[tr], xtr)
                    xtr = xtr - rr.predict(META_BASIS[tr])
                    base_pred, score, C = fit_lr(xtr, y[tr], groups[tr], rep, sw)
                    pred = (lambda bp, r_: lambda z, i: bp(z - r_.predict(META_BASIS[i])))(base_pred, rr)
                else:
                    base_pred, score, C = fit_lr(xtr, y[tr], groups[tr], rep, sw)
                    pred = (lambda bp: lambda z, i: bp(z))(base_pred)
                fits.append((u, pred, score, C))
            if combine == "select":
                best = max(fits, key=lambda f: f[2])
                fits = [best]
                chosen.append(best[0][0])
            cs.extend(f[3] for f in fits)
            for v in ("orig", "hide_bone", "only_bone"):
                ps = []
                for u, pred, _, _ in fits:
                    p = pred(data(u, v)[te], te)
                    if tta:
                        fv = "flip" if v == "orig" else f"flip_{v}"
                        p = (p + pred(data(u, fv)[te], te)) / 2
                    ps.append(p)
                P[v][rep, te] = np.mean(ps, axis=0)
    fit_s = time.time() - t
    feat_s = sum(float(F[c][f"seconds_{v}"]) for c in configs for v in (("orig", "flip") if tta else ("orig",)))
    return {
        "P": P,
        "fit_seconds": fit_s,
        "feature_seconds_orig": feat_s,
        "chosen": chosen,
        "Cs": cs,
        "configs": configs,
    }


def _auc_rows(p, y, idx_pos, idx_neg):
    from kneeosteo.evaluation.stats import rank_auc_rows as _rank_auc_rows

    return _rank_auc_rows(p[..., idx_pos], p[..., idx_neg])


def boot_auc(P, y, n_boot=1000, seed=0, ref=None):
    """Mean-over-repeats AUC with a stratified bootstrap (images resampled, same indices for every
    repeat; paired with ``ref`` when given, for the difference)."""
    from kneeosteo.evaluation.stats import rank_auc_rows as _rank_auc_rows

    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    point = float(np.mean([_rank_auc_rows(P[r][None, pos], P[r][None, neg])[0] for r in range(len(P))]))
    bs, diffs = np.zeros(n_boot), np.zeros(n_boot)
    for b in range(n_boot):
        ip, ineg = rng.choice(pos, pos.size), rng.choice(neg, neg.size)
        a = _rank_auc_rows(P[:, ip], P[:, ineg]).mean()
        bs[b] = a
        if ref is not None:
            diffs[b] = a - _rank_auc_rows(ref[:, ip], ref[:, ineg]).mean()
    out = {"value": point, "ci": [float(np.quantile(bs, 0.025)), float(np.quantile(bs, 0.975))]}
    if ref is not None:
        d0 = point - float(np.mean([_rank_auc_rows(ref[r][None, pos], ref[r][None, neg])[0] for r in range(len(ref))]))
        out["diff_vs_ref"] = {"value": d0, "ci": [float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))]}
    return out


def summarise(res, y, wrong, ref_P=None):
    from kneeosteo.utils.intervals import wilson_interval

    P = res["P"]
    R, n = P["orig"].shape
    correct = (P["orig"] >= 0.5) == y
    acc = float(correct.mean())
    lo, hi = wilson_interval(int(round(acc * n)), n)
    adv_n = wrong.sum(axis=1)
    adv_acc = float(correct[wrong].mean())
    m = float(adv_n.mean())
    alo, ahi = wilson_interval(int(round(adv_acc * m)), int(round(m)))
    out = {
        "accuracy": {"value": acc, "ci": [float(lo), float(hi)], "per_repeat": correct.mean(axis=1).tolist()},
        "auc": boot_auc(P["orig"], y, ref=ref_P),
        "adversarial_accuracy": {"value": adv_acc, "ci": [float(alo), float(ahi)], "n_per_repeat": adv_n.tolist()},
        "occlusion_a_auc": boot_auc(P["hide_bone"], y, n_boot=500),
        "occlusion_b_auc": boot_auc(P["only_bone"], y, n_boot=500),
        "occlusion_a_accuracy": float(((P["hide_bone"] >= 0.5) == y).mean()),
        "occlusion_b_accuracy": float(((P["only_bone"] >= 0.5) == y).mean()),
        "fit_seconds": res["fit_seconds"],
        "feature_seconds": res["feature_seconds_orig"],
        "C_median": float(np.median(res["Cs"])),
        "configs": res["configs"],
    }
    if res["chosen"]:
        from collections import Counter

        out["chosen"] = dict(Counter(res["chosen"]))
    return out


def _ci(d, nd=3):
    return f"{d['value']:.{nd}f} [{d['ci'][0]:.{nd}f}, {d['ci'][1]:.{nd}f}]"


def write_table(summary, meta):
    rows = [
        "| lever | accuracy [95% CI] | AUC [95% CI] | ΔAUC vs paper-stretch224 [95% CI] | "
        "shortcut-adv. acc [95% CI] (n/repeat) | occl. (a) AUC bone hidden | occl. (b) AUC bone only | "
        "features s (orig view) | fit s (25 folds) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        d = s["auc"].get("diff_vs_ref")
        dtxt = (
            "ref" if name == REFERENCE else (f"{d['value']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" if d else "-")
        )
        a = s["adversarial_accuracy"]
        rows.append(
            f"| {name} | {_ci(s['accuracy'])} | {_ci(s['auc'])} | {dtxt} | {_ci(a)} ({np.mean(a['n_per_repeat']):.0f}) | "
            f"{_ci(s['occlusion_a_auc'])} | {_ci(s['occlusion_b_auc'])} | {s['feature_seconds']:.0f} | {s['fit_seconds']:.0f} |"
        )
    txt = (
        "\n".join(rows)
        + "\n\n"
        + (
            f"n = {meta['n']} images, {meta['repeats']} x {FOLDS}-fold stratified group CV; metadata-only forest "
            f"(same folds) accuracy per repeat {', '.join(f'{a:.3f}' for a in meta['metadata_accuracy'])}.\n"
        )
    )
    (RESULTS / "levers.md").write_text(txt)
    return txt


def cmd_evaluate(args) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "oof").mkdir(exist_ok=True)
    global META_X
    from kneeosteo.data.shortcut import metadata_matrix

    recs, y, groups, _ = load_records()
    META_X = metadata_matrix(recs)[0]
    global META_BASIS
    META_BASIS = metadata_basis(META_X)
    splits = outer_splits(y, groups, args.repeats)
    wrong, meta_acc = metadata_wrong(recs, y, groups, splits)
    js = RESULTS / "levers.json"
    summary = json.loads(js.read_text())["levers"] if js.is_file() else {}
    names = args.levers or [n for n in LEVERS]
    meta = {
        "n": int(len(y)),
        "repeats": args.repeats,
        "metadata_accuracy": meta_acc,
        "metadata_wrong_per_repeat": wrong.sum(axis=1).tolist(),
        "folds": FOLDS,
        "inner_folds": INNER,
        "Cs": CS.tolist(),
    }
    ref_P = None
    for name in [REFERENCE] + [n for n in names if n != REFERENCE]:
        configs, combine, *_ = LEVERS[name]
        if configs and not all(feature_path(c).is_file() for c in configs):
            print(f"{name}: features missing, skipped", flush=True)
            continue
        oof = RESULTS / "oof" / f"{name}.npz"
        if oof.is_file() and name not in args.levers:
            d = np.load(oof)
            res = {"P": {v: d[v] for v in ("orig", "hide_bone", "only_bone")}}
            if name == REFERENCE:
                ref_P = res["P"]["orig"]
            continue
        res = run_lever(name, y, groups, splits)
        np.savez(oof, paths=np.array([r.path for r in recs]), y=y, **res["P"])
        if name == REFERENCE:
            ref_P = res["P"]["orig"]
        summary[name] = summarise(res, y, wrong, None if name == REFERENCE else ref_P)
        summary[name]["description"] = LEVERS[name][3]
        summary[name]["load_after"] = os.getloadavg()[0]
        s = summary[name]
        print(
            f"{name}: acc {_ci(s['accuracy'])} auc {_ci(s['auc'])} adv {_ci(s['adversarial_accuracy'])} "
            f"occA {s['occlusion_a_auc']['value']:.3f} occB {s['occlusion_b_auc']['value']:.3f} "
            f"fit {s['fit_seconds']:.0f}s",
            flush=True,
        )
        order = {n: i for i, n in enumerate(LEVERS)}
        summary = dict(sorted(summary.items(), key=lambda kv: order.get(kv[0], 99)))
        js.write_text(json.dumps({"meta": meta, "levers": summary}, indent=1))
        write_table(summary, meta)
    print(write_table(summary, meta) if summary else "nothing evaluated")


# ------------------------------------------------------------------------------------------
# the real hybrid model on one outer fold of repeat 0 (same test images as the probes)


def cmd_hybrid_prep(args) -> None:
    """Write a kneeosteo split for repeat 0, fold K (val: 10% of the training groups, stratified)
    and the fold's test images occluded for probes (a) and (b) as class-folder data sets."""
    from sklearn.model_selection import StratifiedGroupKFold

    recs, y, groups, excluded = load_records()
    tr, te = outer_splits(y, groups, 1)[0][args.fold]
    a, b = next(StratifiedGroupKFold(10, shuffle=True, random_state=0).split(tr, y[tr], groups[tr]))
    doc = {
        "format": "kneeosteo-split/1",
        "data": str(DATA),
        "seed": 0,
        "protocol": "levers-r0",
        "classes": ["normal", "osteoporosis"],
        "positive_class": "osteoporosis",
        "train": sorted(recs[i].path for i in tr[a]),
        "val": sorted(recs[i].path for i in tr[b]),
        "test": sorted(recs[i].path for i in te),
        "excluded": excluded,
    }
    out = CACHE / "hybrid" / f"split_r0f{args.fold}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    for kind in ("hide_bone", "only_bone"):
        root = CACHE / "hybrid" / f"occ_r0f{args.fold}" / kind
        for i in te:
            img = load_pixels(recs[i])
            dst = root / (Path(recs[i].path).with_suffix(".png"))
            dst.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(dst), occlude(img, load_mask(recs[i], img), kind))
    print(f"{out}: train {len(a)}, val {len(b)}, test {len(te)}; occluded test sets under {root.parent}")


def cmd_hybrid_compare(args) -> None:
    """Hybrid run (and its evaluations on the occluded sets) vs the probes on the same test images."""
    import csv

    from kneeosteo.evaluation.stats import rank_auc_rows as _rank_auc_rows

    recs, y, groups, _ = load_records()
    splits = outer_splits(y, groups, 1)
    wrong, _ = metadata_wrong(recs, y, groups, splits)
    tr, te = splits[0][args.fold]
    idx = {r.path: i for i, r in enumerate(recs)}

    def read(pth, stem_only=False):
        p = np.full(len(y), np.nan)
        with open(pth) as fh:
            for row in csv.DictReader(fh):
                key = row["path"]
                if stem_only:  # occluded copies are PNGs named after the original file
                    key = next(k for k in idx if Path(k).with_suffix(".png").as_posix() == key)
                p[idx[key]] = float(row["probability"])
        return p

    def auc(p):
        pos, neg = te[y[te] == 1], te[y[te] == 0]
        return float(_rank_auc_rows(p[None, pos], p[None, neg])[0])

    rows = {}
    run = Path(args.run)
    ph = read(run / "predictions.csv")
    occ = {k: read(run / "evaluations" / k / "predictions.csv", True) for k in ("hide_bone", "only_bone")}
    rows[f"hybrid ({run.name})"] = (ph, occ["hide_bone"], occ["only_bone"])
    for lever in args.levers:
        d = np.load(RESULTS / "oof" / f"{lever}.npz")
        rows[f"probe {lever}"] = (d["orig"][0], d["hide_bone"][0], d["only_bone"][0])
    w = wrong[0][te]
    lines = [
        f"repeat 0, fold {args.fold}: {len(te)} test images, metadata forest wrong on {int(w.sum())}",
        "| model | accuracy | AUC | shortcut-adv. acc (n) | occl. (a) AUC | occl. (b) AUC |",
        "|---|---|---|---|---|---|",
    ]
    for name, (p, pa, pb) in rows.items():
        c = (p[te] >= 0.5) == y[te]
        lines.append(
            f"| {name} | {c.mean():.3f} | {auc(p):.3f} | {c[w].mean():.3f} ({int(w.sum())}) | {auc(pa):.3f} | {auc(pb):.3f} |"
        )
    txt = "\n".join(lines) + "\n"
    (RESULTS / f"hybrid_r0f{args.fold}_{run.name}.md").write_text(txt)
    print(txt)


# ------------------------------------------------------------------------------------------
# command line


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare").set_defaults(fn=cmd_prepare)
    f = sub.add_parser("features")
    f.add_argument("configs", nargs="+", choices=sorted(CONFIGS))
    f.add_argument("--views", default="orig,hide_bone,only_bone")
    f.set_defaults(fn=cmd_features)
    h = sub.add_parser("hybrid-prep")
    h.add_argument("fold", type=int)
    h.set_defaults(fn=cmd_hybrid_prep)
    h = sub.add_parser("hybrid-compare")
    h.add_argument("run")
    h.add_argument("fold", type=int)
    h.add_argument("levers", nargs="*")
    h.set_defaults(fn=cmd_hybrid_compare)
    if "cmd_evaluate" in globals():
        e = sub.add_parser("evaluate")
        e.add_argument("levers", nargs="*")
        e.add_argument("--repeats", type=int, default=REPEATS)
        e.set_defaults(fn=globals()["cmd_evaluate"])
    args = ap.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
