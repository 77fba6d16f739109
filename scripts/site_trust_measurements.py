"""Issue 33's measurements from cached features of the bundled model (no training).

    python scripts/site_trust_measurements.py ../shared/datasets/kop --cache /tmp/site_trust.npz --out docs/results/site_trust.json

1. Every KOP film (and three shifted copies of the bundled split's 72 test films) is read once and
   run through the bundled model (engine torch, fp32): its raw logit and its frozen backbone
   features are cached (``--cache``).
2. **False alarms**: 20 random splits of all KOP films into 246/27/72 (train/validation/test,
   the paper protocol's sizes, unstratified, duplicates not grouped). Per split: the domain check
   fitted on the split's training films (its out-of-fold distances are the reference), the
   temperature on its validation films (their calibrated probabilities are the reference), and
   the alarm run on its 72 test films. The backbone is frozen (ImageNet), so the features, and
   the domain check, do not depend on which films the head was trained on; the head's logits
   do (the bundled model trained on its own 246), but validation and test films are drawn alike
   in every split, so they are exchangeable, which is what the alarm tests.
3. **Shifted batches** against the bundled model's own split (reference: its training films'
   out-of-fold distances, its 27 validation films' calibrated probabilities): the 72 test films
   as they are, re-framed (the central 60% cropped out and scaled back: a tighter collimation),
   re-scaled (a quarter of the size, then back: a low-resolution scanner), another exposure
   (gamma 0.5, contrast 0.7: a darker, flatter film), and the T-score films (KOP's one known
   source, README "tscores.csv") against a domain check fitted without them.
4. **Site check, then ok on the other half**: the T-score films with the WHO truth (T <= -2.5
   osteoporosis, T > -1 normal; osteopenia and files with several truths left out), halved at
   random (5 seeds): the site check on one half with the bundled model's trust pieces; the
   refitted pieces (temperature, conformal quantile, domain threshold on that half) answer the
   other half; we count the ``ok`` answers and how many are right.
5. **Mondrian coverage**: the 99 films the bundled model never trained on (its validation and
   test parts), halved at random per seed (5 seeds): marginal and Mondrian 90% sets fitted on
   one half, coverage per class on the other.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
from pathlib import Path

import numpy as np
import torch

from kneeosteo.data.reader import read_image
from kneeosteo.experiments.trust_fit import site_check, temperature_fit
from kneeosteo.inference import Predictor
from kneeosteo.run import RunDir
from kneeosteo.trust import ConformalClassifier, DomainCheck
from kneeosteo.trust.shift import ShiftReference, batch_shift
from kneeosteo.utils.atomic import write_json

SHIFTS = ("reframed", "rescaled", "exposure")


def shifted(pixels: np.ndarray, kind: str) -> np.ndarray:
    from PIL import Image

    h, w = pixels.shape
    img = Image.fromarray(np.clip(pixels * 255, 0, 255).astype(np.uint8))
    if kind == "reframed":
        dh, dw = int(h * 0.2), int(w * 0.2)
        img = img.crop((dw, dh, w - dw, h - dh)).resize((w, h), Image.BILINEAR)
    elif kind == "rescaled":
        img = img.resize((max(8, w // 4), max(8, h // 4)), Image.BILINEAR).resize((w, h), Image.BILINEAR)
    elif kind == "exposure":
        g = (np.asarray(img, dtype=np.float64) / 255) ** 0.5
        return np.clip(0.5 + 0.7 * (g - 0.5), 0, 1)
    return np.asarray(img, dtype=np.float64) / 255


def features(data: Path, cache: Path) -> dict:
    if cache.is_file():
        return dict(np.load(cache, allow_pickle=False))
    run = RunDir.open(None)
    pred = Predictor(None, engine="torch")
    split = json.loads(run.split_file.read_text())
    paths = sorted(str(p.relative_to(data)) for p in data.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    jobs = [(p, None) for p in paths] + [(p, k) for k in SHIFTS for p in split["test"]]
    logits, feats = [], []
    prep = pred.info.preprocess
    for i in range(0, len(jobs), 16):
        chunk = jobs[i : i + 16]
        xs = []
        for p, k in chunk:
            px = read_image(data / p).pixels
            xs.append(prep(px if k is None else shifted(px, k)))
        _, z, f = pred.forward(torch.stack(xs))
        logits.append(z)
        feats.append(f)
        print(f"{i + len(chunk)}/{len(jobs)}", flush=True)
    out = {
        "path": np.array([p for p, _ in jobs]),
        "kind": np.array([k or "" for _, k in jobs]),
        "logit": np.concatenate(logits),
        "features": np.concatenate(feats).astype(np.float32),
    }
    np.savez(cache, **out)
    return out


def tscore_truth(data: Path) -> dict[str, int]:
    rows: dict[str, set] = {}
    with (data / "tscores.csv").open() as fh:
        for r in csv.DictReader(fh):
            t = float(r["t_score"])
            rows.setdefault(r["path"], set()).add(1 if t <= -2.5 else (0 if t > -1 else -1))
    return {p: next(iter(v)) for p, v in rows.items() if len(v) == 1 and -1 not in v}


def write_bundled_reference(x: np.ndarray, idx: dict) -> None:
    """Give the bundled model's trust files the alarm's references: the out-of-fold distances of
    its training films (the same fit as its stored check: refused unless the threshold this fit
    gives is the stored one) and its calibration probabilities (from the conformal scores).
    Temperature, threshold, sets and domain arrays are kept as they are."""
    from dataclasses import replace

    run = RunDir.open(None)
    bundle = run.trust
    split = json.loads(run.split_file.read_text())
    check = DomainCheck(acceptance=bundle.domain.acceptance).fit(x[np.array([idx[p] for p in split["train"]])])
    if not np.isclose(check.threshold_, bundle.domain.threshold_, rtol=1e-3):
        raise SystemExit(f"this fit's threshold {check.threshold_} differs from the stored {bundle.domain.threshold_}")
    old = bundle.shift_reference
    ref = ShiftReference().fit(
        check.heldout_scores_,
        old.probabilities_,
        {
            "domain_source": f"out-of-fold distances of the {len(split['train'])} training images "
            f"(fp32 features, as predict computes them; this fit's threshold {check.threshold_:.2f}, the stored "
            f"one {bundle.domain.threshold_:.2f})",
            "probability_source": old.source_["probability_source"],
        },
    )
    run.save_trust(replace(bundle, shift=ref))
    print(
        f"wrote the shift reference into {run.trust_file} (threshold {check.threshold_:.4f} "
        f"vs stored {bundle.domain.threshold_:.4f})"
    )


def no_source_run(a, paths: list[str], truth: dict[str, int], source_paths: set[str]) -> dict:
    """The alarm on the T-score films against a run trained without any of them (its own stored
    references), and the site check on half of the WHO-labelled ones, ``ok`` counted on the other
    half, 5 random halvings."""
    run = RunDir.open(a.nosrc_run)
    trust = run.trust
    pred = Predictor(run.path, engine="torch")
    src = sorted(p for p in source_paths)
    zs, fs = [], []
    for i in range(0, len(src), 16):
        xs = torch.stack([pred.info.preprocess(read_image(a.data / p).pixels) for p in src[i : i + 16]])
        _, z, f = pred.forward(xs)
        zs.append(z)
        fs.append(f)
    z, x = np.concatenate(zs), np.concatenate(fs)
    dist = trust.domain.distance(x)
    s = batch_shift(trust.shift_reference, dist, trust.calibrated(z))
    out = {
        "run": str(run.path),
        "batch_shift": s.to_dict(),
        "accepted_by_domain_check": float((dist <= trust.domain.threshold_).mean()),
        "n": len(src),
    }
    print("no-source run, T-score films:", s.line(), flush=True)
    keep = np.array([p in truth for p in src])
    ys = np.array([truth[p] for p in np.array(src)[keep]])
    zk, xk = z[keep], x[keep]
    rows = []
    for seed in range(5):
        perm = np.random.default_rng(seed).permutation(ys.size)
        h = ys.size // 2
        ai, bi = perm[:h], perm[h:]
        sc = site_check(trust, zk[ai], ys[ai], trust.classes, run.config.threshold)
        cal, note = temperature_fit(zk[ai], ys[ai])
        cc = ConformalClassifier(0.9).fit(cal.transform(zk[ai]), ys[ai])
        dom = copy.deepcopy(trust.domain)
        dom.refit_threshold(xk[ai])
        pb = cal.transform(zk[bi])
        single = cc.predict_mask(pb).sum(axis=1) == 1
        inside = dom.distance(xk[bi]) <= dom.threshold_
        right = (pb >= trust.threshold).astype(int) == ys[bi]
        ok = single & inside & (sc["verdict"] == "signal")
        rows.append(
            {
                "seed": seed,
                "verdict": sc["verdict"],
                "auc": sc["auc"],
                "temperature": note,
                "ok": int(ok.sum()),
                "ok_right": int((ok & right).sum()),
                "ok_without_the_rule": int((single & inside).sum()),
                "ok_right_without_the_rule": int((single & inside & right).sum()),
                "other_half": int(bi.size),
            }
        )
        print("no-source site", rows[-1], flush=True)
    out["site_check"] = {"n": int(ys.size), "positives": int(ys.sum()), "seeds": rows}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", type=Path)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/site_trust.npz"))
    ap.add_argument("--out", type=Path, default=Path("docs/results/site_trust.json"))
    ap.add_argument(
        "--nosrc-run",
        type=Path,
        default=None,
        help="a run trained without the T-score films: the alarm and the site check against it",
    )
    ap.add_argument(
        "--write-bundled-reference",
        action="store_true",
        help="store the alarm's references in the bundled model's trust files, then stop",
    )
    a = ap.parse_args()
    c = features(a.data, a.cache)
    orig = c["kind"] == ""
    paths = list(c["path"][orig])
    z, x = c["logit"][orig], c["features"][orig].astype(np.float64)
    y = np.array([1 if p.startswith("osteoporosis/") else 0 for p in paths])
    idx = {p: i for i, p in enumerate(paths)}
    if a.write_bundled_reference:
        return write_bundled_reference(x, idx)
    run = RunDir.open(None)
    bundle = run.trust
    split = json.loads(run.split_file.read_text())
    results: dict = {"n_films": len(paths)}

    # 2. false alarms over 20 random splits
    rows = []
    for seed in range(20):
        perm = np.random.default_rng(seed).permutation(len(paths))
        tr, va, te = perm[:246], perm[246:273], perm[273:345]
        check = DomainCheck().fit(x[tr])
        cal, _ = temperature_fit(z[va], y[va])
        ref = ShiftReference().fit(check.heldout_scores_, cal.transform(z[va]), {})
        s = batch_shift(ref, check.distance(x[te]), cal.transform(z[te]))
        rows.append(
            {
                "seed": seed,
                "verdict": s.verdict,
                "p_value": s.p_value,
                "p_domain": s.tests["domain_score"]["p_value"],
                "p_probability": s.tests["probability"]["p_value"],
            }
        )
        print("split", rows[-1], flush=True)
    results["false_alarms"] = {"splits": rows, "fired": sum(r["verdict"] == "shift" for r in rows)}

    # 3. shifted batches against the bundled split
    tr = np.array([idx[p] for p in split["train"]])
    te = np.array([idx[p] for p in split["test"]])
    check = DomainCheck().fit(x[tr])
    ref = ShiftReference().fit(check.heldout_scores_, bundle.shift_reference.probabilities_, {})
    batches = {"test films as they are": (x[te], z[te])}
    for k in SHIFTS:
        m = c["kind"] == k
        batches[f"test films {k}"] = (c["features"][m].astype(np.float64), c["logit"][m])
    out = {}
    for name, (bx, bz) in batches.items():
        s = batch_shift(ref, check.distance(bx), bundle.calibrated(bz))
        accepted = float((check.distance(bx) <= check.threshold_).mean())
        out[name] = {**s.to_dict(), "accepted_by_domain_check": accepted}
        print(name, s.line(), f"accepted {accepted:.3f}", flush=True)
    # how often each shifted batch fires when only n of its films are predicted (20 random draws each)
    power = {}
    for name, (bx, bz) in batches.items():
        d_all, p_all = check.distance(bx), bundle.calibrated(bz)
        for n in (20, 40):
            rng = np.random.default_rng(n)
            fired = 0
            for _ in range(20):
                pick = rng.choice(d_all.size, n, replace=False)
                fired += batch_shift(ref, d_all[pick], p_all[pick]).fired
            power[f"{name}, n {n}"] = fired / 20
            print("power", name, n, fired / 20, flush=True)
    results["fired_share_by_batch_size"] = power
    truth = tscore_truth(a.data)
    src = np.array([idx[p] for p in sorted(truth) if p in idx])
    source_paths = {r["path"] for r in csv.DictReader((a.data / "tscores.csv").open())}
    src_any = np.array([idx[p] for p in sorted(source_paths) if p in idx])
    not_src = np.array([i for i in tr if paths[i] not in source_paths])
    check_wo = DomainCheck().fit(x[not_src])
    ref_wo = ShiftReference().fit(check_wo.heldout_scores_, bundle.shift_reference.probabilities_, {})
    s = batch_shift(ref_wo, check_wo.distance(x[src_any]), bundle.calibrated(z[src_any]))
    in_training = int(sum(paths[i] in source_paths for i in tr))
    out["T-score source films (domain fit without them)"] = {
        **s.to_dict(),
        "accepted_by_domain_check": float((check_wo.distance(x[src_any]) <= check_wo.threshold_).mean()),
        "note_head": f"the bundled head trained on {in_training} of these films: the probability comparison is "
        "not against a model trained without them",
    }
    print("T-score source", s.line(), flush=True)
    results["shifted_batches"] = out

    if a.nosrc_run is not None:
        results["no_source_run"] = no_source_run(a, paths, truth, source_paths)

    # 4. site check on half of the T-score films (WHO truth), ok on the other half
    ys = np.array([truth[paths[i]] for i in src])
    site_rows = []
    for seed in range(5):
        perm = np.random.default_rng(seed).permutation(src.size)
        h = src.size // 2
        a_i, b_i = src[perm[:h]], src[perm[h:]]
        ya, yb = ys[perm[:h]], ys[perm[h:]]
        sc = site_check(bundle, z[a_i], ya, bundle.classes, run.config.threshold)
        cal, _ = temperature_fit(z[a_i], ya)
        cc = ConformalClassifier(0.9).fit(cal.transform(z[a_i]), ya)
        dom = copy.deepcopy(check)  # the training films' fit, its threshold refitted on the site half
        dom.refit_threshold(x[a_i])
        pb = cal.transform(z[b_i])
        single = cc.predict_mask(pb).sum(axis=1) == 1
        ok = single & (dom.distance(x[b_i]) <= dom.threshold_)
        if sc["verdict"] != "signal":
            ok[:] = False
        right = (pb >= bundle.threshold).astype(int) == yb
        site_rows.append(
            {
                "seed": seed,
                "n_half": int(h),
                "verdict": sc["verdict"],
                "auc": sc["auc"],
                "ok_if_no_rule": int((single & (dom.distance(x[b_i]) <= dom.threshold_)).sum()),
                "ok_right_if_no_rule": int((single & (dom.distance(x[b_i]) <= dom.threshold_) & right).sum()),
                "ok": int(ok.sum()),
                "ok_right": int((ok & right).sum()),
                "n_other_half": int(b_i.size),
            }
        )
        print("site", site_rows[-1], flush=True)
    results["site_check_tscore_films"] = {"n": int(src.size), "positives": int(ys.sum()), "seeds": site_rows}

    # 5. Mondrian coverage per class on the 99 films the bundled model never trained on
    held = np.array([idx[p] for p in split["val"] + split["test"]])
    cal_t = bundle.calibrator
    mond = []
    for seed in range(5):
        perm = np.random.default_rng(seed).permutation(held.size)
        h = held.size // 2
        ci, ti = held[perm[:h]], held[perm[h:]]
        row = {"seed": seed}
        for name, cond in (("marginal", False), ("mondrian", True)):
            cc = ConformalClassifier(0.9, class_conditional=cond).fit(cal_t.transform(z[ci]), y[ci])
            m = cc.predict_mask(cal_t.transform(z[ti]))
            hit = m[np.arange(ti.size), y[ti]]
            row[name] = {
                "normal": float(hit[y[ti] == 0].mean()),
                "osteoporosis": float(hit[y[ti] == 1].mean()),
                "abstention": float((m.sum(axis=1) != 1).mean()),
            }
        mond.append(row)
        print("mondrian", row, flush=True)
    mean = {
        n: {k: float(np.mean([r[n][k] for r in mond])) for k in ("normal", "osteoporosis", "abstention")}
        for n in ("marginal", "mondrian")
    }
    results["mondrian"] = {"seeds": mond, "mean": mean, "n_films": int(held.size)}
    print("mondrian mean", mean)
    write_json(a.out, results)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
