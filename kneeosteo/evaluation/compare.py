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

With a reference manifest and covariates (binary runs), :func:`clinical_beside` puts the clinical
baselines beside the two runs on the films the reference covers, scored against its truth: the
clinical logistic, the OST index, each run fused with the covariates, and the paired DeLong
differences (:func:`kneeosteo.evaluation.clinical.clinical_comparison`).
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
from kneeosteo.tasks import Binary, Multiclass, task_for, task_named

__all__ = ["clinical_beside", "compare_runs", "format_comparison"]


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
    task = task_for(run_a.config)
    if type(task_for(run_b.config)) is not type(task) or run_a.config.classes != run_b.config.classes:
        raise DataError(
            f"{b}: a {run_b.config.task} run with classes {list(run_b.config.classes)}; {a} is a {task} "
            f"run with {list(run_a.config.classes)}: nothing to pair"
        )
    ra, rb = _rows(a), _rows(b)
    if set(ra) != set(rb):
        only = sorted(set(ra) ^ set(rb))
        raise DataError(f"{a} and {b} were scored on different images (e.g. {only[0]}); compare runs on one split")
    paths = sorted(ra)
    label = task.target  # predictions.csv's truth column: label, or a regression's target
    differ = [p for p in paths if ra[p][label] != rb[p][label]]
    if differ:
        raise DataError(f"{a} and {b} disagree on the label of {differ[0]}")
    out = {
        "task": task.name,
        "n": len(paths),
        "a": str(a),
        "b": str(b),
        "model_a": run_a.model_id,
        "model_b": run_b.model_id,
    }
    if isinstance(task, Binary):
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
    elif isinstance(task, Multiclass):
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


def _threshold(folder: Path, run: RunDir) -> float:
    """The threshold the folder's predictions were called at (its metrics.json, else the run's)."""
    import json

    m = folder / "metrics.json"
    if m.is_file():
        t = json.loads(m.read_text()).get("threshold")
        if t is not None:
            return float(t)
    return float(run.config.threshold)


def clinical_beside(
    a: str | Path, b: str | Path, reference: str | Path, covariates: list[str], definition: str = "osteoporosis"
) -> dict:
    """The clinical comparison of runs ``a`` and ``b`` (both binary, scored on the same films) on
    the films of ``reference``, against its truth under ``definition``."""
    from kneeosteo.data.reference import check_definition, read_reference
    from kneeosteo.evaluation.clinical import by_path, clinical_comparison, clinical_set

    a, b = Path(a), Path(b)
    run_a, run_b = _run_of(a), _run_of(b)
    if not isinstance(task_for(run_a.config), Binary) or not isinstance(task_for(run_b.config), Binary):
        raise DataError("--reference/--covariates compare binary runs (a probability of the positive class)")
    ref = read_reference(reference)
    probs = {}
    for key, folder in (("a", a), ("b", b)):
        probs[key] = {p: float(r["probability"]) for p, r in _rows(folder).items()}
    scored = [p for p in probs["a"] if p in ref.files and p in probs["b"]]
    if not scored:
        raise DataError(f"{reference}: none of the {len(probs['a'])} scored films is in the reference manifest")
    cs = clinical_set(ref, scored, check_definition(definition), covariates)
    name_a, name_b = f"A ({run_a.model_id})", f"B ({run_b.model_id})"
    out = clinical_comparison(
        cs,
        {
            name_a: (by_path(probs["a"], cs.paths), _threshold(a, run_a)),
            name_b: (by_path(probs["b"], cs.paths), _threshold(b, run_b)),
        },
    )
    out.update(reference=str(reference), definition=definition, not_in_reference=len(probs["a"]) - len(scored))
    return out


def format_comparison(c: dict) -> str:
    """A few lines for the terminal."""
    lines = [f"{c['model_a']} vs {c['model_b']}: {c['task']}, {c['n']} paired test images"]
    task = task_named(c["task"])
    if isinstance(task, Binary):
        d, m = c["delong"], c["mcnemar"]
        lines += [
            f"accuracy {c['accuracy_a']:.3f} vs {c['accuracy_b']:.3f}: exact McNemar p = {m['pvalue']:.4g} "
            f"(b {m['b']}, c {m['c']})",
            f"AUC {d['auc_a']:.3f} vs {d['auc_b']:.3f}: DeLong p = {d['pvalue']:.4g}",
        ]
    elif isinstance(task, Multiclass):
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
