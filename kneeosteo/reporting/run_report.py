"""The report of one run folder: the sections of ``kneeosteo report RUN``, in the issue's order.

Each ``*_section`` function returns a plain dict for the template (or None when the run lacks
what the section needs, which the page then says). Nothing here computes a metric of its own:
the numbers come from the run's files (``metrics.json``, ``predictions.csv``, ``split.json``,
``history.csv``, ``config.json``, ``trust.json``) or, for a run folder without test results (the
bundled model), from ``evaluate`` run into a temporary folder, which the page says.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import platform
import shlex
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from kneeosteo.errors import ConfigError, DataError
from kneeosteo.evaluation import figures
from kneeosteo.reporting import gallery, sanity
from kneeosteo.reporting.checklist import checklist_rows
from kneeosteo.reporting.embed import file_uri, image_uri
from kneeosteo.run import RunDir
from kneeosteo.tasks import task_for
from kneeosteo.utils.hashing import sha256_file

log = logging.getLogger(__name__)

__all__ = ["run_context"]

CAVEAT = (
    "Research use only. This model is not a medical device and has not been validated for "
    "clinical decisions; its evidence below comes from one public data set."
)
HEADLINE = ("accuracy", "auc", "sensitivity", "specificity", "precision", "f1")
METRIC_NAMES = {
    "sensitivity": "sensitivity (recall)",
    "specificity": "specificity",
    "precision": "precision (PPV)",
    "fpr": "false positive rate",
    "accuracy": "accuracy",
    "f1": "F1",
    "auc": "AUC (ROC)",
    "loss": "log loss",
}
LIBRARIES = (
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "scikit-learn",
    "scipy",
    "statsmodels",
    "grad-cam",
    "onnxruntime",
    "pillow",
    "pydicom",
)
SECTIONS = (
    ("summary", "Summary"),
    ("data-flow", "Data flow"),
    ("audit", "Data audit"),
    ("performance", "Performance"),
    ("calibration", "Calibration and decisions"),
    ("probes", "Does it read bone?"),
    ("explanations", "Explanations"),
    ("reproducibility", "Reproducibility"),
    ("checklist", "Checklist"),
)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def resolve_data(run: RunDir, data: str | Path | None) -> Path | None:
    """The data folder: ``data`` if given (must exist), else the one the run recorded, if it is here."""
    if data is not None:
        p = Path(data)
        if not p.is_dir():
            raise DataError(f"{p}: data folder not found")
        return p
    recorded = run.config.record.get("data")
    return Path(recorded) if recorded and Path(recorded).is_dir() else None


def scored_folder(run: RunDir, data: Path | None, work: Path) -> tuple[Path | None, str]:
    """Where the test results are: the run folder, or a fresh ``evaluate`` of its own split into
    ``work`` when the folder has none (and the data is here). Returns (folder or None, a note)."""
    if run.metrics_file.is_file() and run.predictions_file.is_file():
        return run.path, "from the run folder's metrics.json and predictions.csv"
    if data is None or not run.split_file.is_file():
        return None, "the run folder has no test results and its data folder is not here (pass --data)"
    from kneeosteo.evaluation.evaluate import evaluate_run

    out = work / "evaluated"
    evaluate_run(run, data=data, split=run.split_file, out=out)
    return out, "scored now by kneeosteo evaluate on the run's own split (the run folder had no test results)"


# ------------------------------------------------------------------------------------ sections


def summary_section(run: RunDir, metrics: dict | None, note: str) -> dict:
    cfg = run.config
    head = []
    if metrics:
        head = [{"name": METRIC_NAMES[k], "value": metrics[k]} for k in HEADLINE if k in metrics]
    return {
        "model_id": run.model_id,
        "backbone": cfg.backbone,
        "architecture": _architecture(cfg.model),
        "data": cfg.record.get("data", "?"),
        "classes": list(cfg.classes),
        "n_test": (metrics or {}).get("n"),
        "headline": head,
        "caveat": CAVEAT,
        "scored": note,
    }


def _architecture(model: dict) -> str:
    parts = []
    if model.get("use_backbone"):
        tuned = model.get("trainable_stages")
        state = (
            "frozen"
            if model.get("freeze_backbone")
            else (f"last {tuned} stage(s) fine-tuned" if tuned else "fine-tuned")
        )
        parts.append(f"{model.get('backbone')} ({state}, {model.get('feature_dim')} features)")
    if model.get("use_attention"):
        parts.append("attention module (128 features)")
    head = model.get("head") or {}
    parts.append("FC head " + "-".join(str(v) for v in [head.get("in_features", "?"), *head.get("hidden", []), 1]))
    return " + ".join(parts) + f", input {model.get('image_size', 224)} px"


def _category(reason: str) -> str:
    r = reason.lower()
    if r.startswith("label conflict"):
        return "label conflicts"
    if "near" in r and "duplicate" in r:
        return "near duplicates"
    if "duplicate" in r:
        return "exact duplicates"
    return "other"


def data_flow_section(run: RunDir, scan) -> dict | None:
    if not run.split_file.is_file():
        return None
    doc = json.loads(run.split_file.read_text())
    classes = list(doc.get("classes", run.config.classes))

    def cls(path: str) -> str:
        head = Path(path).parts[0] if Path(path).parts else ""
        return head if head in classes else "?"

    parts = {}
    for part in ("train", "val", "test"):
        paths = doc.get(part, [])
        parts[part] = {"total": len(paths), **{c: sum(cls(p) == c for p in paths) for c in classes}}
    excluded: dict[str, int] = {}
    for e in doc.get("excluded", []):
        excluded[_category(e.get("reason", ""))] = excluded.get(_category(e.get("reason", "")), 0) + 1
    unreadable = len(scan.unreadable) if scan is not None else None
    in_split = sum(v["total"] for v in parts.values()) + len(doc.get("excluded", []))
    return {
        "classes": classes,
        "parts": parts,
        "excluded": excluded,
        "excluded_total": len(doc.get("excluded", [])),
        "unreadable": unreadable,
        "files_read": in_split + (unreadable or 0),
        "readable": in_split,
        "protocol": doc.get("protocol"),
        "seed": doc.get("seed"),
        "near_threshold": doc.get("near_duplicate_threshold"),
        "source": "scan of the data folder and split.json"
        if scan is not None
        else "split.json only (data folder not here: unreadable files unknown)",
    }


def audit_section(scan) -> dict | None:
    if scan is None:
        return None
    from kneeosteo.data.audit import build_audit

    a = build_audit(scan)
    rows = []
    for c, d in a["per_class"].items():
        rows.append(
            {
                "class": c,
                "images": d["images"],
                "formats": ", ".join(f"{k} {v}" for k, v in sorted(d["formats"].items())),
                "modes": ", ".join(f"{k} {v}" for k, v in sorted(d["modes"].items())),
                "width": d["width"],
                "height": d["height"],
                "aspect": d["aspect_ratio"],
            }
        )
    return {
        "rows": rows,
        "files_read": a["files_read"],
        "distinct": a["distinct_images"],
        "exact": a["exact_duplicates"],
        "near": {k: v for k, v in a["near_duplicates"].items() if k != "list"},
        "shortcut": a["shortcut_metadata_only"],
        "unreadable": a["unreadable"],
    }


def performance_section(run: RunDir, folder: Path, metrics: dict, work: Path) -> dict:
    trust = metrics.get("trust") or {}
    at_op = trust.get("at_operating_threshold")
    at_half = trust.get("at_0.5") or (metrics if abs(float(metrics.get("threshold", 0.5)) - 0.5) < 1e-12 else None)
    same = at_op is not None and abs(float(at_op.get("threshold", 0.5)) - 0.5) <= 1e-12
    columns = [
        (
            "at 0.5"
            + (f" (= the operating threshold, operating point {trust.get('operating_point')})" if same else ""),
            at_half,
        )
    ]
    if at_op is not None and not same:
        columns.append(
            (f"at the operating threshold {float(at_op['threshold']):.3f} ({trust.get('operating_point')})", at_op)
        )
    elif at_half is None:
        columns = [(f"at the run's threshold {float(metrics.get('threshold', 0.5)):.3f}", metrics)]
    table = [
        {"name": METRIC_NAMES[k], "cells": [c[k] if c and k in c else None for _, c in columns]} for k in METRIC_NAMES
    ]
    hist = run.history_file
    curves = {}
    if hist.is_file():
        rows = _read_csv(hist)
        if not (run.path / "accuracy.png").is_file():
            figures.curves(rows, work)
            src = work
        else:
            src = run.path
        curves = {
            "accuracy": file_uri(src / "accuracy.png"),
            "loss": file_uri(src / "loss.png"),
            "epochs": len(rows),
            "best_epoch": run.config.record.get("best_epoch"),
        }
    counts = metrics.get("counts", {})
    return {
        "columns": [c[0] for c in columns],
        "table": table,
        "counts": counts,
        "classes": list(run.config.classes),
        "n": metrics.get("n"),
        "roc": file_uri(folder / "roc.png"),
        "confusion": file_uri(folder / "confusion_matrix.png"),
        "curves": curves,
        "clinical": metrics.get("clinical"),
    }


def calibration_section(folder: Path, metrics: dict) -> dict | None:
    t = metrics.get("trust")
    if not t:
        return None
    return {
        "raw": t.get("raw"),
        "calibrated": t.get("calibrated_probabilities"),
        "method": t.get("calibration"),
        "fitted": t.get("fitted"),
        "coverage": t.get("coverage"),
        "conformal_coverage": t.get("conformal_coverage"),
        "abstention": t.get("abstention_rate"),
        "confident_share": t.get("confident_share"),
        "confident": t.get("confident_subset"),
        "domain_acceptance": t.get("domain_acceptance_by_features"),
        "domain_method": t.get("domain_method"),
        "n": t.get("n"),
        "per_class": t.get("conformal_coverage_per_class"),
        "class_conditional": t.get("class_conditional"),
        "shift": t.get("batch_shift"),
        "site": t.get("site_check"),
        "reliability": file_uri(folder / "calibration.png"),
        "decision": file_uri(folder / "decision_curve.png"),
    }


def probes_section(metrics: dict) -> dict | None:
    p = metrics.get("shortcut_probes")
    if not p:
        return None
    src = p.get("source", {})
    return {
        "adv": p.get("shortcut_adversarial", {}),
        "occ": p.get("occlusion", {}),
        "within": p.get("within_source"),
        "source": {k: v for k, v in src.items() if isinstance(v, dict)},
        "source_skipped": src.get("skipped"),
    }


def explanations_section(run: RunDir, folder: Path, data: Path | None, correct: int, seed: int) -> dict | None:
    if data is None:
        return None
    from kneeosteo.data.reader import read_image
    from kneeosteo.errors import ImageReadError
    from kneeosteo.inference.explain import Explainer

    rows = _read_csv(folder / "predictions.csv")
    cases = gallery.select_cases(rows, correct)
    model = run.load_model("cpu")
    explainer = Explainer.from_model(model, run.info, trust=run.trust)
    twin = Explainer.from_model(sanity.randomised_copy(model, seed), run.info, trust=None)
    shown, explained, unreadable = [], [], []
    for c in cases:
        try:
            pixels = read_image(data / c.path).pixels
        except ImageReadError as exc:
            unreadable.append(f"{c.path}: {exc}")
            continue
        ex = explainer.explain(pixels)
        explained.append((c.path, pixels, ex))
        shown.append(
            {
                "path": c.path,
                "kind": c.kind,
                "probability": c.probability,
                "correct": c.correct,
                "picture": image_uri(gallery.panels(pixels, ex.gradcam, ex.attention)),
                "layer": ex.layer,
                "status": ex.trust.status if ex.trust is not None else "",
                "status_reason": ex.trust.status_reason if ex.trust is not None else "",
            }
        )
    check = sanity.sanity_check(explained, twin)
    by_path = {r["path"]: r for r in check["images"]}
    for s in shown:
        s["gradcam_rho"] = by_path[s["path"]]["gradcam_rho"]
        s["attention_rho"] = by_path[s["path"]]["attention_rho"]
    wrong = [s for s in shown if not s["correct"]]
    return {
        "cases": shown,
        "n_wrong": len(wrong),
        "n_correct": len(shown) - len(wrong),
        "has_attention": model.attention is not None,
        "unreadable": unreadable,
        "sanity": {
            "gradcam": check["gradcam"],
            "attention": check.get("attention"),
            "gradcam_verdict": sanity.verdict(check["gradcam"]),
            "attention_verdict": sanity.verdict(check.get("attention")) if "attention" in check else None,
            "randomised": [type(m).__name__ for m in sanity.trained_modules(model)],
            "seed": seed,
        },
    }


def _toml_value(v) -> str:
    return json.dumps(list(v) if isinstance(v, tuple) else v)


def reproducibility_section(run: RunDir) -> dict:
    cfg = run.config
    settings = {
        k: v
        for k, v in cfg.settings.items()
        if v is not None and k not in ("data", "out", "split", "extra") and not isinstance(v, dict)
    }
    toml = "[train]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in sorted(settings.items()))
    command = shlex.join(
        [
            "kneeosteo",
            "train",
            str(cfg.record.get("data", "DATA")),
            "--config",
            "settings.toml",
            "--split",
            "split.json",
            "--out",
            run.path.name,
        ]
    )
    split = {}
    if run.split_file.is_file():
        doc = json.loads(run.split_file.read_text())
        cids = doc.get("content_ids", {})
        digest = hashlib.sha256(
            "\n".join(
                f"{p}\t{cids.get(p, '')}" for part in ("train", "val", "test") for p in sorted(doc.get(part, []))
            ).encode()
        ).hexdigest()
        split = {
            "file_sha256": sha256_file(run.split_file),
            "content_digest": digest,
            "seed": doc.get("seed"),
            "protocol": doc.get("protocol"),
        }
    versions_now = {}
    for lib in LIBRARIES:
        try:
            versions_now[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions_now[lib] = "not installed"
    doc = json.loads(run.config_file.read_text())
    bw = cfg.record.get("backbone_weights") or {}
    return {
        "toml": toml,
        "command": command,
        "recorded_command": cfg.record.get("command_line"),
        "seed": cfg.settings.get("seed"),
        "precision": cfg.record.get("autocast"),
        "environment": cfg.record.get("environment", {}),
        "versions_recorded": doc.get("versions", {}),
        "versions_now": versions_now,
        "weights_sha256": cfg.weights_sha256,
        "backbone_weights": {"source": bw.get("source"), "sha256": bw.get("sha256")},
        "trust_sha256": sha256_file(run.trust_file) if run.trust_file.is_file() else None,
        "split": split,
    }


# ------------------------------------------------------------------------------------ the page


def run_context(
    run_path: str | Path, data: str | Path | None = None, correct: int = 4, seed: int = 0, work: Path | None = None
) -> dict:
    """Everything the run template needs, for ``run_path``; ``work`` is a scratch folder."""
    run = RunDir.open(run_path)
    data_dir = resolve_data(run, data)
    task = task_for(run.config)
    if not task.supports_report:  # the page's sections (probes, calibration, gallery) are the binary model's
        raise ConfigError(
            f"{run.path}: `report` covers binary runs; for this {task} run see its metrics.json, "
            "predictions.csv and figures (`kneeosteo evaluate`)"
        )
    with tempfile.TemporaryDirectory(prefix="kneeosteo-report-") as tmp:
        work = Path(work or tmp)
        folder, note = scored_folder(run, data_dir, work)
        metrics = json.loads((folder / "metrics.json").read_text()) if folder else None
        scan = None
        if data_dir is not None:
            from kneeosteo.data.scan import scan_dataset

            settings = run.config.settings  # a run trained from a label manifest, or with merged classes
            scan = scan_dataset(
                data_dir,
                positive=run.config.positive,
                labels=settings.get("labels"),
                merge=settings.get("merge") or None,
            )
        sections = {
            "summary": summary_section(run, metrics, note),
            "data-flow": data_flow_section(run, scan),
            "audit": audit_section(scan),
            "performance": performance_section(run, folder, metrics, work) if metrics else None,
            "calibration": calibration_section(folder, metrics) if metrics else None,
            "probes": probes_section(metrics) if metrics else None,
            "explanations": explanations_section(run, folder, data_dir, correct, seed) if folder else None,
            "reproducibility": reproducibility_section(run),
        }
    available = {k for k, v in sections.items() if v is not None}
    sections["checklist"] = checklist_rows(available)
    return {
        "kind": "run",
        "title": f"kneeosteo report: {run.model_id}",
        "sections": sections,
        "toc": [(k, t) for k, t in SECTIONS],
        "missing_reason": _missing_reasons(data_dir, folder),
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
    }


def _missing_reasons(data: Path | None, folder: Path | None) -> dict:
    no_data = "the data folder is not here: pass --data DIR"
    no_scores = "the run has no test results and they cannot be computed here: pass --data DIR"
    return {
        "data-flow": "the run folder has no split.json",
        "audit": no_data,
        "performance": no_scores,
        "calibration": "the run has no trust files (`kneeosteo calibrate`)",
        "probes": "the run's metrics have no shortcut probes (`kneeosteo evaluate RUN --probes`)",
        "explanations": no_data if data is None else no_scores,
    }
