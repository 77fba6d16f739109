"""What `kneeosteo calibrate RUN SITE` would do for a site with T-score-labelled films (issue 32).

The bundled model's threshold and conformal sets were fitted on KOP's folder labels; on the
held-out T-score films they cover the WHO truth far less often than promised. A site that has
its own T-score films can refit them (`calibrate RUN SITE`). This script measures what that buys,
without fitting anything on a film it then scores: the held-out films are split in two halves by
patient (stratified by truth, seeded), the pieces `calibrate RUN SITE` fits (temperature,
operating threshold, conformal sets; the site check first) are fitted on one half with the
package's own functions and scored on the other, and the halves are swapped. Nothing here
chooses or changes the bundled model; it reads the run's evaluate output only.

    python research/site_recalibration.py --run RUN --predictions RUN/predictions.csv \\
        --reference DATA/tscores.csv --data DATA [--out docs/results/research/SITE_RECALIBRATION.json]

Prints, per half and pooled, the coverage of the WHO truth and the set sizes before (the run's
own pieces) and after (refitted on the other half), and the site check's verdict on each half.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from kneeosteo.data.reference import read_reference
from kneeosteo.experiments.trust_fit import site_check, temperature_fit
from kneeosteo.run import RunDir
from kneeosteo.trust import ConformalClassifier, choose_threshold, logit, parse_operating_point
from kneeosteo.utils.atomic import write_json


def _sets(mask: np.ndarray, y: np.ndarray) -> dict:
    size = mask.sum(axis=1)
    return {
        "covered": int(mask[np.arange(y.size), y].sum()),
        "n": int(y.size),
        "single_class_sets": int((size == 1).sum()),
        "both_class_sets": int((size == 2).sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--predictions", type=Path, required=True)
    ap.add_argument("--reference", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("docs/results/research/SITE_RECALIBRATION.json"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    run = RunDir.open(args.run)
    old = run.trust
    if old is None or old.conformal is None:
        raise SystemExit(f"{args.run}: no trust files (run `kneeosteo calibrate` first)")
    with open(args.predictions, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    ref = read_reference(args.reference, args.data)
    paths = [r["path"] for r in rows]
    y = np.array([int(r["label"]) for r in rows])
    z = logit(np.array([float(r["probability"]) for r in rows]))
    patient = [(ref.files[p].rows[0].patient or p) if p in ref.files else p for p in paths]
    op = parse_operating_point(old.operating_point or "0.5")
    folds = StratifiedGroupKFold(2, shuffle=True, random_state=args.seed).split(z, y, patient)
    out: dict = {"run": str(args.run), "model": run.model_id, "coverage": old.conformal.coverage, "halves": []}
    before_mask = old.conformal.predict_mask(old.calibrated(z))
    pooled_after = np.zeros_like(before_mask)
    for fit, score in folds:
        check = site_check(old, z[fit], y[fit], tuple(run.config.classes), run.config.threshold)
        cal, _ = temperature_fit(z[fit], y[fit])
        p_fit = cal.transform(z[fit])
        threshold = choose_threshold(p_fit, y[fit], op)
        sets = ConformalClassifier(old.conformal.coverage).fit(p_fit, y[fit])
        p = cal.transform(z[score])
        after = sets.predict_mask(p)
        pooled_after[score] = after
        call = (p >= threshold).astype(int)
        out["halves"].append(
            {
                "fitted_on": int(fit.size),
                "scored": int(score.size),
                "site_check_on_fit_half": {k: check[k] for k in ("verdict", "reason", "auc")},
                "before": _sets(before_mask[score], y[score]),
                "after": _sets(after, y[score]),
                "threshold_after": float(threshold),
                "sensitivity_after": float(call[y[score] == 1].mean()),
                "specificity_after": float(1 - call[y[score] == 0].mean()),
            }
        )
    out["pooled"] = {"before": _sets(before_mask, y), "after": _sets(pooled_after, y)}
    for k, h in enumerate(out["halves"]):
        print(
            f"half {k}: site check {h['site_check_on_fit_half']['verdict']} (AUC {h['site_check_on_fit_half']['auc']}); "
            f"covered before {h['before']['covered']}/{h['before']['n']}, after {h['after']['covered']}/{h['after']['n']} "
            f"({h['after']['both_class_sets']} sets hold both classes)"
        )
    b, a = out["pooled"]["before"], out["pooled"]["after"]
    print(
        f"pooled: covered before {b['covered']}/{b['n']} ({b['both_class_sets']} both-class sets), "
        f"after {a['covered']}/{a['n']} ({a['both_class_sets']} both-class sets)"
    )
    write_json(args.out, out)  # atomic, the package's writer
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
