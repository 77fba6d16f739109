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
from kneeosteo.tasks import task_for, task_named

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


def _paired_probabilities(ra: dict, rb: dict, paths: list[str], label: str, classes: list[str]) -> dict:
    """Binary: exact McNemar on correctness at each run's own threshold, DeLong on the AUCs."""
    y = np.array([int(ra[p]["label"]) for p in paths])
    pa = np.array([float(ra[p]["probability"]) for p in paths])
    pb = np.array([float(rb[p]["probability"]) for p in paths])
    ca = np.array([int(ra[p]["prediction"]) for p in paths]) == y
    cb = np.array([int(rb[p]["prediction"]) for p in paths]) == y
    return dict(
        accuracy_a=float(ca.mean()),
        accuracy_b=float(cb.mean()),
        mcnemar=mcnemar_exact(ca, cb),
        delong=delong_test(y, pa, pb),
    )


def _paired_classes(ra: dict, rb: dict, paths: list[str], label: str, classes: list[str]) -> dict:
    """Multiclass: Stuart-Maxwell, exact McNemar on correctness overall and per class."""
    idx = {c: k for k, c in enumerate(classes)}
    y = [idx[ra[p]["label"]] for p in paths]
    pred_a = np.array([idx[ra[p]["prediction"]] for p in paths])
    pred_b = np.array([idx[rb[p]["prediction"]] for p in paths])
    return dict(
        accuracy_a=float(np.mean(pred_a == y)),
        accuracy_b=float(np.mean(pred_b == y)),
        **paired_multiclass_tests(y, pred_a, pred_b, classes),
    )


def _paired_values(ra: dict, rb: dict, paths: list[str], label: str, classes: list[str]) -> dict:
    """Regression: Wilcoxon signed-rank on the paired absolute errors, the mean difference."""
    y = np.array([float(ra[p][label]) for p in paths])
    ea = np.abs(np.array([float(ra[p]["prediction"]) for p in paths]) - y)
    eb = np.abs(np.array([float(rb[p]["prediction"]) for p in paths]) - y)
    if np.allclose(ea, eb):
        test = {"statistic": 0.0, "p_value": 1.0, "note": "identical errors"}
    else:
        res = wilcoxon(ea, eb)
        test = {"statistic": float(res.statistic), "p_value": float(res.pvalue)}
    return dict(
        mae_a=float(ea.mean()),
        mae_b=float(eb.mean()),
        mae_difference=float((ea - eb).mean()),
        wilcoxon_abs_errors=test,
    )


# the paired tests of each kind of answer (Task.scoring), on two predictions.csv keyed by path
PAIRED_TESTS = {"probability": _paired_probabilities, "classes": _paired_classes, "value": _paired_values}


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
    out.update(PAIRED_TESTS[task.scoring](ra, rb, paths, label, list(run_a.config.classes)))
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
    if not task_for(run_a.config).supports_clinical_baselines or not task_for(run_b.config).supports_clinical_baselines:
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
    lines += task_named(c["task"]).comparison_lines(c)
    return "\n".join(lines)
