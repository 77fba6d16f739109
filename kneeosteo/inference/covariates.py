"""Covariates for a run that uses them (a run with ``fused.json``, :mod:`kneeosteo.models.fused`).

``predict --covariates FILE.csv``: a CSV with a ``path`` column and one column per covariate the
fused model takes (``age``, ``sex``, ``weight_kg``, ...); relative paths are taken from the CSV's
folder, as in an input manifest, so one CSV can be both (``predict covs.csv --covariates covs.csv``).
A column the model needs that the file lacks is a one-line error. Per image, a missing row or cell
gives the image model's answer alone, marked ``answer_basis: image_only`` and named on stderr, and
a value that is not a number is named the same way: nothing is filled in."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from kneeosteo.errors import DataError
from kneeosteo.inference.predictor import Prediction
from kneeosteo.models.fused import FusedModel

__all__ = ["apply_covariates", "read_covariates"]


def _key(path: str | Path) -> str:
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):
        return str(Path(path).absolute())


def read_covariates(file: str | Path, names: Sequence[str]) -> dict[str, tuple[int, dict[str, str]]]:
    """resolved image path -> (CSV row number, its covariate cells)."""
    file = Path(file)
    try:
        with open(file, newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in reader.fieldnames or []]
            rows = list(reader)
    except (OSError, csv.Error) as exc:
        raise DataError(f"{file}: covariates cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    if "path" not in header:
        raise DataError(f"{file}: no 'path' column (columns: {', '.join(header) or 'none'})")
    absent = [n for n in names if n not in header]
    if absent:
        raise DataError(
            f"{file}: no covariate column {', '.join(absent)}, which the run's fused model takes "
            f"(columns: {', '.join(header)})"
        )
    out: dict[str, tuple[int, dict[str, str]]] = {}
    for number, row in enumerate(rows, start=2):
        row = {(k or "").strip(): v for k, v in row.items()}
        path = (row.get("path") or "").strip()
        if not path:
            continue
        p = Path(path)
        out[_key(p if p.is_absolute() else file.parent / p)] = (number, {n: row.get(n) or "" for n in names})
    return out


def apply_covariates(
    predictions: Sequence[Prediction],
    fused: FusedModel,
    table: dict[str, tuple[int, dict[str, str]]] | None,
    source: str = "",
) -> tuple[list[Prediction], list[str]]:
    """The predictions with the fused model's answer where every covariate is there, and one note
    per image answered from the image alone (saying why)."""
    out, notes = [], []
    for p in predictions:
        if p.status == "out_of_domain" or p.raw_probability is None or not math.isfinite(p.raw_probability):
            out.append(p)  # no image answer to fuse
            continue
        if table is None:
            out.append(p)
            continue
        found = table.get(_key(p.path))
        if found is None:
            notes.append(f"{p.path}: no row in {source}: answered image-only")
            out.append(p)
            continue
        number, cells = found
        try:
            a = fused.answer(p.raw_probability, cells, f"{source} row {number}")
        except DataError as exc:
            notes.append(f"{exc}: answered image-only")
            out.append(p)
            continue
        if a["missing_covariates"]:
            notes.append(
                f"{source} row {number} ({p.path}): {', '.join(a['missing_covariates'])} missing: answered image-only"
            )
        out.append(replace(p, fused_probability=a["fused_probability"], answer_basis=a["answer_basis"]))
    return out, notes
