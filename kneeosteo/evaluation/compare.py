"""`kneeosteo compare RUN_A RUN_B`: paired tests of two runs scored on the same test images.

``reproduce`` runs these tests inside its grid for binary models; ``compare`` runs them on any
two scored runs (their ``predictions.csv``, or an ``evaluate`` folder's), whatever the task:

- **binary**: exact McNemar on correctness at each run's own threshold, DeLong on the AUCs;
- **multiclass**: Stuart-Maxwell (marginal homogeneity of the two runs' predicted classes),
  exact McNemar on overall correctness and per class one-vs-rest
  (``evaluation.multiclass.paired_multiclass_tests``);
- **regression**: Wilcoxon signed-rank test on the paired absolute errors (scipy), with the
  mean difference of absolute errors.

The two files must hold the same images with the same labels: a comparison on different test
images is no paired test, and is refused naming the first difference.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon

from kneeosteo.errors import DataError
from kneeosteo.evaluation.multiclass import paired_multiclass_tests
from kneeosteo.evaluation.stats import delong_test, mcnemar_exact
from kneeosteo.run import RunDir

__all__ = ["compare_runs", "format_comparison"]


def _rows(folder: Path) -> dict[str, dict]:
    """The predictions of a run folder (or of an evaluate folder inside one), keyed by path."""
    f = folder / "predictions.csv"
    if not f.is_file():
        raise DataError(f"{folder}: no predictions.csv (score the run with `kneeosteo evaluate` first)")
    with open(f, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    return rows


def _run_of(folder: Path) -> RunDir:
    for p in (folder, *folder.parents):
        if RunDir(p).is_run():
            return RunDir(p)
    raise DataError(f"{folder}: not inside a run folder")


def compare_runs(a: str | Path, b: str | Path) -> dict:
    """Paired tests of the runs (or evaluation folders) ``a`` and ``b`` on their shared test set."""
    a, b = Path(a), Path(b)
    run_a, run_b = _run_of(a), _run_of(b)
    task = run_a.config.task
    if run_b.config.task != task or run_a.config.classes != run_b.config.classes:
        raise DataError(
            f"{b}: a {run_b.config.task} run with classes {list(run_b.config.classes)}; {a} is a {task} "
            f"run with {list(run_a.config.classes)}: nothing to pair"
        )
    ra, rb = _rows(a), _rows(b)
    if set(ra) != set(rb):
        only = sorted(set(ra) ^ set(rb))
        raise DataError(f"{a} and {b} were scored on different images (e.g. {only[0]}); compare runs on one split")
    paths = sorted(ra)
    label = (
        "t_score"
        if task == "regression" and "t_score" in ra[paths[0]]
        else ("bmd" if task == "regression" else "label")
    )
    differ = [p for p in paths if ra[p][label] != rb[p][label]]
    if differ:
        raise DataError(f"{a} and {b} disagree on the label of {differ[0]}")
    out = {
        "task": task,
        "n": len(paths),
        "a": str(a),
        "b": str(b),
        "model_a": run_a.model_id,
        "model_b": run_b.model_id,
    }
    if task == "binary":
        y = np.array([int(ra[p]["label"]) for p in paths])
        pa = np.array([float(ra[p]["probability"]) for p in paths])
        pb = np.array([float(rb[p]["probability"]) for p in paths])
        ca = np.array([int(ra[p]["prediction"]) for p in paths]) == y
        cb = np.array([int(rb[p]["prediction"]) for p in paths]) == y
        out.update(
            accuracy_a=float(ca.mean()),
            accuracy_b=float(cb.mean()),
            mcnemar=mcnemar_exact(ca, cb),
            delong=delong_test(y, pa, pb),
        )
    elif task == "multiclass":
        classes = list(run_a.config.classes)
        idx = {c: k for k, c in enumerate(classes)}
        y = [idx[ra[p]["label"]] for p in paths]
        pred_a = np.array([idx[ra[p]["prediction"]] for p in paths])
        pred_b = np.array([idx[rb[p]["prediction"]] for p in paths])
        out.update(
            accuracy_a=float(np.mean(pred_a == y)),
            accuracy_b=float(np.mean(pred_b == y)),
            **paired_multiclass_tests(y, pred_a, pred_b, classes),
        )
    else:
        y = np.array([float(ra[p][label]) for p in paths])
        ea = np.abs(np.array([float(ra[p]["prediction"]) for p in paths]) - y)
        eb = np.abs(np.array([float(rb[p]["prediction"]) for p in paths]) - y)
        if np.allclose(ea, eb):
            test = {"statistic": 0.0, "p_value": 1.0, "note": "identical errors"}
        else:
            res = wilcoxon(ea, eb)
            test = {"statistic": float(res.statistic), "p_value": float(res.pvalue)}
        out.update(
            mae_a=float(ea.mean()),
            mae_b=float(eb.mean()),
            mae_difference=float((ea - eb).mean()),
            wilcoxon_abs_errors=test,
        )
    return out


def format_comparison(c: dict) -> str:
    """A few lines for the terminal."""
    lines = [f"{c['model_a']} vs {c['model_b']}: {c['task']}, {c['n']} paired test images"]
    if c["task"] == "binary":
        d, m = c["delong"], c["mcnemar"]
        lines += [
            f"accuracy {c['accuracy_a']:.3f} vs {c['accuracy_b']:.3f}: exact McNemar p = {m['pvalue']:.4g} "
            f"(b {m['b']}, c {m['c']})",
            f"AUC {d['auc_a']:.3f} vs {d['auc_b']:.3f}: DeLong p = {d['pvalue']:.4g}",
        ]
    elif c["task"] == "multiclass":
        sm, m = c["stuart_maxwell"], c["mcnemar_correct"]
        lines += [
            f"accuracy {c['accuracy_a']:.3f} vs {c['accuracy_b']:.3f}: exact McNemar p = {m['pvalue']:.4g}",
            f"Stuart-Maxwell (same class frequencies?): statistic {sm['statistic']:.3f}, df {sm['df']}, "
            f"p = {sm['p_value']:.4g}" + (f" ({sm['note']})" if sm.get("note") else ""),
        ]
        lines += [f"  {name}: one-vs-rest McNemar p = {t['pvalue']:.4g}" for name, t in c["per_class"].items()]
    else:
        w = c["wilcoxon_abs_errors"]
        lines.append(
            f"MAE {c['mae_a']:.3f} vs {c['mae_b']:.3f}: Wilcoxon signed-rank on absolute errors p = {w['p_value']:.4g}"
        )
    return "\n".join(lines)
