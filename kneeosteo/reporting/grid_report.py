"""The report of a ``reproduce`` folder: Table I with its forest plot, the paired tests against the
reference row, the per-seed spread, the probes, and a short section per cell (linked from the
tables). A cell is an ordinary run folder: ``kneeosteo report CELL`` gives its full page."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

from kneeosteo.errors import DataError
from kneeosteo.reporting.embed import file_uri
from kneeosteo.reporting.run_report import CAVEAT
from kneeosteo.run import RunDir

__all__ = ["grid_context", "is_grid"]


def is_grid(path: Path) -> bool:
    return (Path(path) / "table1.json").is_file() and (Path(path) / "cells").is_dir()


def _anchor(cell: Path, root: Path) -> str:
    rel = cell.relative_to(root / "cells").as_posix()
    return "cell-" + "".join(ch if ch.isalnum() else "-" for ch in rel)


def _cells(root: Path, model_key: str) -> list[Path]:
    """The model's finished cells (folders with metrics.json), seeds (and folds) in order."""
    base = root / "cells" / model_key
    if not base.is_dir():
        return []
    return sorted((m.parent for m in base.rglob("metrics.json")), key=lambda p: p.relative_to(base).as_posix())


def _model_key(model: str) -> str:
    """table1.json names a settings-file model by its path; its cells live under the file's stem."""
    return Path(model).stem if model.endswith(".toml") else model


def clinical_section(root: Path) -> dict | None:
    """``clinical.json`` of a ``reproduce --covariates`` folder (:func:`kneeosteo.evaluation.clinical.over_seeds`):
    the fixed baselines and, per model and seed, the image and fused AUCs and the paired DeLong
    differences with their intervals; None when the folder has none."""
    f = root / "clinical.json"
    if not f.is_file():
        return None
    doc = json.loads(f.read_text())
    seeds = [{"model": model, **s} for model, per in doc.get("models", {}).items() for s in per]
    return {
        "n": doc.get("n"),
        "positives": doc.get("positives"),
        "covariates": doc.get("covariates", []),
        "left_out": doc.get("left_out", []),
        "fixed": doc.get("fixed", {}),
        "seeds": seeds,
        "cost": doc.get("cost"),
    }


def grid_context(path: str | Path) -> dict:
    root = Path(path)
    if not is_grid(root):
        raise DataError(f"{root}: not a reproduce folder (needs table1.json and cells/)")
    doc = json.loads((root / "table1.json").read_text())
    info, rows = doc.get("info", {}), doc.get("rows", [])
    cells, table, spread = [], [], []
    for r in rows:
        if not r.get("seeds"):
            table.append({**r, "anchor": None})
            continue
        key = _model_key(r["model"])
        found = _cells(root, key)
        per = []
        for c in found:
            m = json.loads((c / "metrics.json").read_text())
            run = RunDir(c)
            probes = m.get("shortcut_probes") or {}
            adv = probes.get("shortcut_adversarial", {})
            occ = probes.get("occlusion", {})
            anchor = _anchor(c, root)
            label = c.relative_to(root / "cells" / key).as_posix()
            per.append({"label": label, "anchor": anchor, "accuracy": m["accuracy"]["value"], "auc": m["auc"]["value"]})
            cells.append(
                {
                    "anchor": anchor,
                    "model": r.get("title", key),
                    "label": label,
                    "path": c.relative_to(root).as_posix(),
                    "model_id": run.model_id if run.config_file.is_file() else "-",
                    "metrics": m,
                    "adv": adv,
                    "hide": (occ.get("hide_bone") or {}).get("auc"),
                    "only": (occ.get("only_bone") or {}).get("auc"),
                    "loss_png": file_uri(c / "loss.png"),
                    "roc_png": file_uri(c / "roc.png"),
                }
            )
        spread.append({"title": r.get("title", key), "cells": per})
        table.append({**r, "anchor": per[0]["anchor"] if per else None})
    return {
        "kind": "grid",
        "title": f"kneeosteo report: reproduce {root.name}",
        "info": info,
        "rows": table,
        "clinical": clinical_section(root),
        "forest": file_uri(root / "table1.png"),
        "spread": spread,
        "cells": cells,
        "caveat": CAVEAT,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
    }
