"""The baseline an image model has to beat: the patient's own covariates.

Three comparators sit beside every image model scored on films with a reference manifest
(:mod:`kneeosteo.data.reference`) that carries covariates:

- **OST** (osteoporosis self-assessment tool, Koh et al. 2001): ``0.2 * (weight_kg - age)``,
  a published score with nothing fitted. Lower OST means higher risk, so its risk score is
  ``-OST``; it is not a probability, so it gets an AUC and sensitivity/specificity at the
  published cut-off (OST < -1: moderate or high risk), no calibration or decision curve.
- **clinical logistic**: a logistic regression on the covariates the user names (standardised;
  ``sex`` female 1, male 0). Fitted on training rows only; where the training films carry no
  covariates (KOP's 275 non-reference films) it is *cross-fitted* on the scored films: each
  film's probability comes from a model fitted on the other patients' folds (patient-level
  ``StratifiedGroupKFold``), so no film is scored by a model that saw it.
- **fused**: the same cross-fitted logistic regression on ``[logit(image probability),
  covariates]``: the image model's evidence plus the covariates.

Cross-fitting costs something: the clinical and fused rows are internal (cross-validated)
results on the scored source, fitted on about (k-1)/k of its patients, while the image model
never saw that source: the comparison favours the fitted rows, which is why the OST row
(nothing fitted) is there. Incremental value is the paired DeLong AUC difference
(:func:`kneeosteo.evaluation.stats.delong_test`) with its 95% interval; each probability row
also gets its Brier score, calibration slope/intercept and net benefit
(:mod:`kneeosteo.trust.decision_curve`).

A missing or non-numeric covariate is a one-line :class:`~kneeosteo.errors.DataError` naming the
row (:func:`kneeosteo.data.reference.covariate_matrix`), never a zero or a mean; a film linked to
two patients with different covariates is left out of the comparison, and said so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.special import logit
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from kneeosteo.data.reference import Reference, covariate_matrix
from kneeosteo.errors import ConfigError, DataError
from kneeosteo.evaluation.stats import delong_auc_ci, delong_test
from kneeosteo.models.fused import FusedModel
from kneeosteo.trust.calibration_metrics import brier_score, calibration_slope_intercept
from kneeosteo.trust.decision_curve import decision_curve
from kneeosteo.utils.intervals import wilson_interval

__all__ = [
    "OST_CUTOFF",
    "OST_COLUMNS",
    "ClinicalSet",
    "by_path",
    "clinical_comparison",
    "clinical_set",
    "cross_fitted_logistic",
    "fit_fused",
    "fit_logistic",
    "format_comparison",
    "ost_index",
    "over_seeds",
    "parse_covariates",
    "patient_folds",
    "render_over_seeds",
]

OST_COLUMNS = ("weight_kg", "age")
OST_CUTOFF = -1.0  # OST < -1: moderate or high risk (Koh et al. 2001)
DCA_THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.05, 0.55, 0.05))
_EPS = 1e-6


def parse_covariates(text: str | list[str] | None) -> list[str]:
    """``"age,sex,weight_kg"`` -> ``["age", "sex", "weight_kg"]`` (ConfigError when empty or doubled)."""
    items = text if isinstance(text, list) else str(text or "").split(",")
    names = [n.strip() for n in items if n.strip()]
    if not names:
        raise ConfigError("--covariates: name at least one manifest column, such as age,sex,weight_kg")
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise ConfigError(f"--covariates: {', '.join(doubled)} named twice")
    return names


def ost_index(age, weight_kg) -> np.ndarray:
    """The OST index 0.2 * (weight in kg - age in years); lower is higher risk."""
    return 0.2 * (np.asarray(weight_kg, dtype=np.float64) - np.asarray(age, dtype=np.float64))


@dataclass
class ClinicalSet:
    """Films with a single truth and one set of covariates, in a fixed order."""

    paths: list[str]
    y: np.ndarray  # 0/1 under the definition
    x: np.ndarray  # (n, len(names)) covariates
    names: list[str]
    groups: np.ndarray  # patient unit per film (films sharing a patient id share a unit)
    ost: np.ndarray | None  # OST index, when age and weight_kg are in the reference
    left_out: list[dict] = field(default_factory=list)  # {"path", "reason"}


def clinical_set(reference: Reference, paths: list[str], definition: str, names: list[str]) -> ClinicalSet:
    """The scored films ``paths`` that the comparison can use (module docstring)."""
    files, left_out = [], []
    need = list(dict.fromkeys([*names, *(c for c in OST_COLUMNS if c in reference.columns)]))
    for p in paths:
        f = reference.files.get(p)
        if f is None:
            left_out.append({"path": p, "reason": "not in the reference manifest"})
        elif not f.single_truth:
            left_out.append({"path": p, "reason": "no single truth"})
        elif f.covariates(need) is None:
            left_out.append(
                {
                    "path": p,
                    "reason": f"rows {', '.join(str(r.row) for r in f.rows)} give different "
                    "covariates (two patients): no single value",
                }
            )
        else:
            files.append(f)
    if not files:
        raise DataError(f"{reference.file}: none of the {len(paths)} scored films has a single truth and covariates")
    x = covariate_matrix(files, names, str(reference.file))
    ost = None
    if all(c in reference.columns for c in OST_COLUMNS):
        aw = covariate_matrix(files, ["age", "weight_kg"], str(reference.file))
        ost = ost_index(aw[:, 0], aw[:, 1])
    # patient units: films linked by a shared patient id (union-find over ids)
    parent = list(range(len(files)))

    def find(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    first: dict[str, int] = {}
    for i, f in enumerate(files):
        for r in f.rows:
            if r.patient:
                j = first.setdefault(r.patient, i)
                parent[find(i)] = find(j)
    roots = [find(i) for i in range(len(files))]
    relabel = {r: k for k, r in enumerate(dict.fromkeys(roots))}
    y = np.array([int(f.positive(definition)) for f in files])
    return ClinicalSet([f.path for f in files], y, x, list(names), np.array([relabel[r] for r in roots]), ost, left_out)


def patient_folds(y: np.ndarray, groups: np.ndarray, k: int = 5, seed: int = 0) -> np.ndarray:
    """Fold index per film: stratified, and every patient unit in one fold."""
    y = np.asarray(y)
    k = min(k, int(min(np.sum(y == 0), np.sum(y == 1))), len(set(groups.tolist())))
    if k < 2:
        raise DataError(
            f"cross-fitting needs both classes in at least 2 patients each "
            f"({int(np.sum(y == 1))} positive, {int(np.sum(y == 0))} negative)"
        )
    folds = np.empty(len(y), dtype=np.int64)
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (_, test) in enumerate(cv.split(np.zeros(len(y)), y, groups)):
        folds[test] = f
    return folds


def fit_logistic(x: np.ndarray, y: np.ndarray):
    """Standardised covariates -> L2 logistic regression (sklearn's default C=1)."""
    y = np.asarray(y)
    if len(set(y.tolist())) < 2:
        raise DataError("a logistic regression needs both classes among its training rows")
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, y)


def cross_fitted_logistic(x: np.ndarray, y: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Out-of-fold P(positive) of :func:`fit_logistic`: each film scored by the model fitted on
    the other folds."""
    out = np.empty(len(y), dtype=np.float64)
    for f in np.unique(folds):
        test = folds == f
        out[test] = fit_logistic(x[~test], y[~test]).predict_proba(x[test])[:, 1]
    return out


def fit_fused(
    cs: ClinicalSet,
    raw_image_probability: np.ndarray,
    weights_sha256: str,
    definition: str,
    fitted_on: dict,
    estimate: dict,
) -> FusedModel:
    """The fused model fitted on every film of ``cs`` (the same logistic regression the comparison
    cross-fits), as the plain numbers :class:`~kneeosteo.models.fused.FusedModel` stores.
    ``estimate``: what to quote for it (the cross-fitted AUC: these films are its training rows)."""
    z = logit(np.clip(np.asarray(raw_image_probability, dtype=np.float64), _EPS, 1 - _EPS))[:, None]
    pipe = fit_logistic(np.hstack([z, cs.x]), cs.y)
    scaler, lr = pipe[0], pipe[-1]
    return FusedModel(
        tuple(cs.names),
        tuple(map(float, scaler.mean_)),
        tuple(map(float, scaler.scale_)),
        tuple(map(float, lr.coef_[0])),
        float(lr.intercept_[0]),
        weights_sha256,
        definition,
        0.5,
        {**fitted_on, "films": int(len(cs.y)), "positives": int(cs.y.sum())},
        estimate,
    )


def _at(y: np.ndarray, called: np.ndarray) -> dict:
    y, called = np.asarray(y).astype(bool), np.asarray(called).astype(bool)
    tp, fn = int(np.sum(called & y)), int(np.sum(~called & y))
    tn, fp = int(np.sum(~called & ~y)), int(np.sum(called & ~y))
    sens = tp / (tp + fn) if tp + fn else math.nan
    spec = tn / (tn + fp) if tn + fp else math.nan
    return {
        "sensitivity": sens,
        "sensitivity_ci": list(wilson_interval(tp, tp + fn)),
        "specificity": spec,
        "specificity_ci": list(wilson_interval(tn, tn + fp)),
        "counts": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
    }


def _row(
    name: str, y: np.ndarray, score: np.ndarray, called: np.ndarray, rule: str, probability: bool, fitted: str
) -> dict:
    row = {
        "model": name,
        "n": int(len(y)),
        "positives": int(np.sum(y)),
        "auc": delong_auc_ci(y, score),
        "rule": rule,
        "fitted": fitted,
        **_at(y, called),
    }
    if probability:
        p = np.clip(score, _EPS, 1 - _EPS)
        fit = calibration_slope_intercept(p, y)
        dca = decision_curve(p, y, DCA_THRESHOLDS)
        row.update(
            brier=brier_score(p, y),
            calibration=fit.to_dict(),
            decision_curve={
                "thresholds": list(DCA_THRESHOLDS),
                "net_benefit": dca.model.tolist(),
                "treat_all": dca.treat_all.tolist(),
            },
        )
    return row


def clinical_comparison(
    cs: ClinicalSet, image: dict[str, tuple[np.ndarray, float]], folds: int = 5, seed: int = 0
) -> dict:
    """Image model(s), clinical logistic, OST and fused model(s) on the films of ``cs``.

    ``image``: name -> (P(positive) per film of ``cs.paths``, the run's threshold). Returns
    ``{"n", "rows": [...], "incremental": [...], "fitting": ...}``."""
    y = cs.y
    fold = patient_folds(y, cs.groups, folds, seed)
    rows, scores = [], {}
    for name, (p, threshold) in image.items():
        p = np.asarray(p, dtype=np.float64)
        rows.append(
            _row(
                name,
                y,
                p,
                p >= threshold,
                f"P >= {threshold:g} (the run's threshold)",
                True,
                "image model: nothing fitted on these films",
            )
        )
        scores[name] = p
    clinical = cross_fitted_logistic(cs.x, y, fold)
    rows.append(
        _row(
            "clinical logistic",
            y,
            clinical,
            clinical >= 0.5,
            "P >= 0.5",
            True,
            f"cross-fitted on these films ({len(set(fold.tolist()))} patient-level folds)",
        )
    )
    scores["clinical logistic"] = clinical
    if cs.ost is not None:
        rows.append(
            _row(
                "OST index",
                y,
                -cs.ost,
                cs.ost < OST_CUTOFF,
                f"OST < {OST_CUTOFF:g} (Koh 2001)",
                False,
                "nothing fitted",
            )
        )
        scores["OST index"] = -cs.ost
    incremental = []
    for name, (p, _) in image.items():
        z = logit(np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS))[:, None]
        fused = cross_fitted_logistic(np.hstack([z, cs.x]), y, fold)
        fname = f"fused ({name} + covariates)"
        rows.append(
            _row(
                fname,
                y,
                fused,
                fused >= 0.5,
                "P >= 0.5",
                True,
                f"cross-fitted on these films ({len(set(fold.tolist()))} patient-level folds)",
            )
        )
        scores[fname] = fused
        for a, b, question in [
            (fname, "clinical logistic", "does the image add to the covariates?"),
            (fname, name, "do the covariates add to the image?"),
            (name, "clinical logistic", "image model against the clinical logistic"),
            *([(name, "OST index", "image model against OST")] if cs.ost is not None else []),
        ]:
            incremental.append({"a": a, "b": b, "question": question, **delong_test(y, scores[a], scores[b])})
    return {
        "n": int(len(y)),
        "positives": int(np.sum(y)),
        "covariates": cs.names,
        "left_out": cs.left_out,
        "folds": int(len(set(fold.tolist()))),
        "seed": seed,
        "rows": rows,
        "incremental": incremental,
        "cost": "clinical and fused rows are cross-fitted on the scored films (internal validation on this "
        "source); the image rows never saw it; OST has nothing fitted",
    }


def format_comparison(c: dict) -> list[str]:
    """Plain-text lines of :func:`clinical_comparison`'s result."""
    out = [
        f"clinical comparison on {c['n']} films ({c['positives']} positive), covariates {', '.join(c['covariates'])}"
        + (f"; {len(c['left_out'])} left out" if c["left_out"] else "")
    ]
    for r in c["rows"]:
        a = r["auc"]
        out.append(
            f"  {r['model']}: AUC {a['auc']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}], sensitivity "
            f"{r['sensitivity']:.3f}, specificity {r['specificity']:.3f} at {r['rule']}"
        )
    for d in c["incremental"]:
        out.append(
            f"  {d['a']} - {d['b']}: dAUC {d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}], "
            f"p {d['pvalue']:.3g}"
        )
    out.append(f"  ({c['cost']})")
    return out


def by_path(predictions: dict[str, float], paths: list[str]) -> np.ndarray:
    """Probabilities in the order of ``paths``; a film without one is an error naming it."""
    missing = [p for p in paths if p not in predictions]
    if missing:
        raise DataError(f"no image prediction for {len(missing)} film(s), such as {missing[0]}")
    return np.array([predictions[p] for p in paths], dtype=np.float64)


def over_seeds(
    cs: ClinicalSet, predictions: dict[tuple[str, int], dict[str, float]], thresholds: dict[str, float], folds: int = 5
) -> dict:
    """The comparison for every (model, seed) of a ``reproduce`` grid on one held-out test set:
    ``predictions[(model, seed)]`` maps path -> P(positive). The clinical logistic and OST do not
    depend on the seed (one fit, ``seed`` 0 folds); each seed's fused model uses that seed's image
    probabilities. Returns per model the seeds' image AUC, fused AUC and dAUC (fused - clinical,
    image - clinical) with their DeLong intervals."""
    per: dict[str, list[dict]] = {}
    for (model, seed), probs in sorted(predictions.items()):
        c = clinical_comparison(cs, {model: (by_path(probs, cs.paths), thresholds.get(model, 0.5))}, folds=folds)
        rows = {r["model"]: r for r in c["rows"]}
        inc = {(d["a"], d["b"]): d for d in c["incremental"]}
        fused = f"fused ({model} + covariates)"
        per.setdefault(model, []).append(
            {
                "seed": seed,
                "image_auc": rows[model]["auc"],
                "fused_auc": rows[fused]["auc"],
                "fused_minus_clinical": inc[(fused, "clinical logistic")],
                "image_minus_clinical": inc[(model, "clinical logistic")],
                **({"image_minus_ost": inc[(model, "OST index")]} if (model, "OST index") in inc else {}),
            }
        )
        fixed = {k: rows[k] for k in ("clinical logistic", "OST index") if k in rows}
    return {
        "n": int(len(cs.y)),
        "positives": int(cs.y.sum()),
        "covariates": cs.names,
        "left_out": cs.left_out,
        "fixed": fixed,
        "models": per,
        "cost": "clinical and fused rows are cross-fitted on the held-out films (patient-level folds); "
        "the image models never saw them; OST has nothing fitted",
    }


def seed_figures(seeds: list[dict], margin: float = 0.0) -> dict:
    """One image model's seeds of :func:`over_seeds` summed up: the image and fused AUCs' mean, sd
    (ddof 1; 0 for one seed) and range, the mean fused - clinical and image - clinical differences,
    and how many seeds' fused - clinical lower bound lies above ``margin``."""
    img = [s["image_auc"]["auc"] for s in seeds]
    fus = [s["fused_auc"]["auc"] for s in seeds]
    fc = [s["fused_minus_clinical"] for s in seeds]
    return {
        "seeds": len(seeds),
        "image": (float(np.mean(img)), float(np.std(img, ddof=1)) if len(img) > 1 else 0.0, min(img), max(img)),
        "fused": (float(np.mean(fus)), min(fus), max(fus)),
        "fused_minus_clinical": float(np.mean([d["diff"] for d in fc])),
        "above_margin": sum(1 for d in fc if d["ci_low"] > margin),
        "image_minus_clinical": float(np.mean([s["image_minus_clinical"]["diff"] for s in seeds])),
    }


def render_over_seeds(doc: dict) -> str:
    """Markdown of :func:`over_seeds`: the fixed baselines, then per model the seeds' mean."""
    lines = [
        f"# Clinical baselines on the held-out films ({doc['n']} films, {doc['positives']} positive; "
        f"covariates {', '.join(doc['covariates'])}; {len(doc['left_out'])} left out)",
        "",
        "| model | AUC [95% CI] | sensitivity | specificity | rule |",
        "|---|---|---|---|---|",
    ]
    for name, r in doc["fixed"].items():
        a = r["auc"]
        lines.append(
            f"| {name} | {a['auc']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}] | {r['sensitivity']:.3f} | "
            f"{r['specificity']:.3f} | {r['rule']} |"
        )
    lines += [
        "",
        "| image model | seeds | image AUC (mean, range) | fused AUC (mean, range) | fused - clinical dAUC "
        "(mean; seeds with CI above 0) | image - clinical dAUC (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for model, seeds in doc["models"].items():
        f = seed_figures(seeds)
        (im, _, ilo, ihi), (fm, flo, fhi) = f["image"], f["fused"]
        lines.append(
            f"| {model} | {f['seeds']} | {im:.3f} ({ilo:.3f}-{ihi:.3f}) | {fm:.3f} ({flo:.3f}-{fhi:.3f}) | "
            f"{f['fused_minus_clinical']:+.3f}; {f['above_margin']} of {f['seeds']} | {f['image_minus_clinical']:+.3f} |"
        )
    lines += ["", f"({doc['cost']}; paired DeLong intervals per seed in clinical.json.)"]
    return "\n".join(lines) + "\n"
