"""Reference labels: a T-score manifest that says what each film *is*, beside its folder label.

A class folder is somebody's filing, not a diagnosis. A *reference manifest* is a CSV with one row
per (file, patient record) that carries the measured truth::

    path,t_score,diagnosis,source_id,age,sex,weight_kg,height_m,bmi
    normal/normal_0031.jpg,-2.32,osteopenia,OP100,55,female,68.0,1.58,27.2

- ``path`` (required): the file, relative to DATA.
- ``t_score`` and/or ``diagnosis`` (one required): the WHO band is derived from the T-score by
  :mod:`kneeosteo.data.who`; a ``diagnosis`` alone must be a WHO band name; both on one row must
  agree, or the row is an error.
- ``source_id`` (or ``patient_id``): the patient record; films sharing one are one patient.
- any other column: a covariate the user may name (``--covariates age,sex,weight_kg``).

A file may appear on several rows (the same bytes filed under two patients). When those rows give
different WHO bands the file has **no single truth**: it is excluded from training and scoring
whenever a reference is used, and listed as such. Rows that agree on the band keep the file (its
binary truth is the same under every definition), but their covariates may differ (two patients'
ages): :meth:`ReferenceFile.covariates` then says so instead of averaging.

The binary question is the user's choice (:data:`DEFINITIONS`): ``osteoporosis`` (WHO,
T <= -2.5) or ``low_bone_mass`` (T < -1, osteopenia or osteoporosis).

Whole-file problems and bad rows (no path, a non-numeric T-score, a band the T-score
contradicts) are a one-line :class:`~kneeosteo.errors.DataError` naming the file and row: the
reference is the ground truth, so nothing in it is skipped silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from kneeosteo.data.who import WHO_CLASSES, who_band
from kneeosteo.errors import ConfigError, DataError
from kneeosteo.utils.csvfile import read_csv_table

__all__ = [
    "DEFINITIONS",
    "SEX_CODES",
    "covariate_value",
    "Reference",
    "ReferenceFile",
    "ReferenceRow",
    "agreement",
    "check_definition",
    "covariate_matrix",
    "is_positive",
    "read_reference",
]

#: binary definition -> (what it means, the least severe WHO band index that is positive)
DEFINITIONS: dict[str, tuple[str, int]] = {
    "osteoporosis": ("osteoporosis = T <= -2.5 (WHO)", WHO_CLASSES.index("osteoporosis")),
    "low_bone_mass": ("low bone mass = T < -1 (osteopenia or osteoporosis)", WHO_CLASSES.index("osteopenia")),
}
#: the one text covariate read as a number: female 1, male 0 (nothing else is guessed)
SEX_CODES = {"female": 1.0, "f": 1.0, "male": 0.0, "m": 0.0}
_PATIENT_COLUMNS = ("source_id", "patient_id")


def check_definition(definition: str) -> str:
    if definition not in DEFINITIONS:
        raise ConfigError(f"unknown reference definition {definition!r} (choose {' or '.join(DEFINITIONS)})")
    return definition


def is_positive(band: str, definition: str) -> bool:
    """Is a film of WHO ``band`` positive under ``definition``?"""
    return WHO_CLASSES.index(band) >= DEFINITIONS[check_definition(definition)][1]


@dataclass
class ReferenceRow:
    row: int  # 1-based CSV line (header = 1)
    path: str
    band: str  # WHO band
    t_score: float | None
    patient: str  # source_id / patient_id, "" when absent
    cells: dict[str, str] = field(default_factory=dict)  # every other column, as text


@dataclass
class ReferenceFile:
    path: str
    rows: list[ReferenceRow]

    @property
    def bands(self) -> list[str]:
        return sorted({r.band for r in self.rows}, key=WHO_CLASSES.index)

    @property
    def single_truth(self) -> bool:
        return len(self.bands) == 1

    @property
    def band(self) -> str | None:
        """The WHO band, or None when the rows disagree (no single truth)."""
        return self.bands[0] if self.single_truth else None

    @property
    def t_score(self) -> float | None:
        """The T-score when every row gives the same one (else None: two patients' values)."""
        values = {r.t_score for r in self.rows}
        return values.pop() if len(values) == 1 and None not in values else None

    def positive(self, definition: str) -> bool:
        if self.band is None:
            raise ValueError(f"{self.path}: no single truth")
        return is_positive(self.band, definition)

    def covariates(self, names: list[str]) -> dict[str, str] | None:
        """The named cells when every row gives the same values, else None (the file is linked to
        patients with different covariates: there is no one value to use)."""
        values = {tuple(r.cells.get(n, "") for n in names) for r in self.rows}
        return dict(zip(names, values.pop())) if len(values) == 1 else None


@dataclass
class Reference:
    file: Path
    columns: list[str]
    files: dict[str, ReferenceFile]  # path -> its rows, in the manifest's order

    @property
    def single(self) -> list[ReferenceFile]:
        return [f for f in self.files.values() if f.single_truth]

    @property
    def multi_truth(self) -> list[ReferenceFile]:
        return [f for f in self.files.values() if not f.single_truth]

    def excluded(self) -> list[dict]:
        """The files with no single truth, with the reason the split and the audit give."""
        return [
            {
                "path": f.path,
                "reason": "reference gives no single truth: rows "
                + ", ".join(f"{r.row} ({r.band}{'' if r.t_score is None else f', T {r.t_score:g}'})" for r in f.rows),
            }
            for f in self.multi_truth
        ]

    def summary(self) -> dict:
        return {
            "file": str(self.file),
            "rows": sum(len(f.rows) for f in self.files.values()),
            "files": len(self.files),
            "single_truth": len(self.single),
            "multi_truth": len(self.multi_truth),
        }


def _relative(text: str) -> str | None:
    p = PurePosixPath(text.replace("\\", "/"))
    if p.is_absolute() or not p.parts or ".." in p.parts or p.parts[0].endswith(":"):
        return None
    return p.as_posix()


def read_reference(file: str | Path, root: str | Path | None = None) -> Reference:
    """Parse a reference manifest (module docstring); ``root``: also check every file exists."""
    file = Path(file)
    columns, lines = read_csv_table(file, "reference manifest", "path,t_score,...")
    if "t_score" not in columns and "diagnosis" not in columns:
        raise DataError(f"{file}: no 't_score' or 'diagnosis' column: no reference truth")
    doubled = sorted({c for c in columns if columns.count(c) > 1})
    if doubled:
        raise DataError(f"{file}: column(s) {', '.join(doubled)} appear twice")
    patient_col = next((c for c in _PATIENT_COLUMNS if c in columns), None)
    files: dict[str, ReferenceFile] = {}
    for number, cells in enumerate(lines, start=2):
        if not any(c.strip() for c in cells):
            continue
        where = f"{file} row {number}"
        if len(cells) != len(columns):
            raise DataError(f"{where}: {len(cells)} cells, the header has {len(columns)}")
        values = dict(zip(columns, (c.strip() for c in cells)))
        rel = _relative(values["path"]) if values["path"] else None
        if rel is None:
            raise DataError(
                f"{where}: " + ("no path" if not values["path"] else f"path {values['path']!r} outside the data folder")
            )
        if root is not None and not (Path(root) / rel).is_file():
            raise DataError(f"{where}: {rel} not found in {root}")
        t = None
        if values.get("t_score"):
            try:
                t = float(values["t_score"])
            except ValueError:
                t = math.nan
            if not math.isfinite(t):
                raise DataError(f"{where} ({rel}): T-score {values['t_score']!r} is not a finite number")
        diagnosis = values.get("diagnosis", "").lower()
        if diagnosis and diagnosis not in WHO_CLASSES:
            raise DataError(
                f"{where} ({rel}): diagnosis {values['diagnosis']!r} is not one of {', '.join(WHO_CLASSES)}"
            )
        if t is None and not diagnosis:
            raise DataError(f"{where} ({rel}): neither a T-score nor a diagnosis")
        band = who_band(t) if t is not None else diagnosis
        if diagnosis and diagnosis != band:
            raise DataError(f"{where} ({rel}): diagnosis {diagnosis} but T-score {t:g} is {band}")
        rest = {c: v for c, v in values.items() if c not in ("path", "t_score", "diagnosis")}
        row = ReferenceRow(number, rel, band, t, values.get(patient_col, "") if patient_col else "", rest)
        files.setdefault(rel, ReferenceFile(rel, [])).rows.append(row)
    if not files:
        raise DataError(f"{file}: no rows")
    return Reference(file, columns, files)


def covariate_value(name: str, text: object) -> float | None:
    """One covariate cell as a number: None when empty (missing); ``sex`` reads female/f as 1 and
    male/m as 0; anything else that is not a finite number is a ValueError saying so."""
    if text is None:
        return None
    if isinstance(text, bool):
        raise ValueError(f"covariate {name} {text!r} is not a number")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        text = str(text).strip()
        if not text:
            return None
        if name == "sex":
            if text.lower() not in SEX_CODES:
                raise ValueError(f"sex {text!r} is not female/male")
            return SEX_CODES[text.lower()]
        try:
            value = float(text)
        except ValueError:
            value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"covariate {name} {text!r} is not a number")
    return value


def covariate_matrix(files: list[ReferenceFile], names: list[str], where: str = "reference") -> np.ndarray:
    """(len(files), len(names)) float matrix of the named covariates.

    A missing or non-numeric value is a DataError naming the file's row, never a zero or a mean;
    ``sex`` reads female/f as 1 and male/m as 0. Files whose rows give different values
    (:meth:`ReferenceFile.covariates` is None) must be left out by the caller first."""
    out = np.empty((len(files), len(names)), dtype=np.float64)
    known = {c for f in files for r in f.rows for c in r.cells}
    absent = [n for n in names if n not in known]
    if files and absent:
        raise DataError(
            f"{where}: no covariate column {', '.join(map(repr, absent))} (columns: {', '.join(sorted(known))})"
        )
    for i, f in enumerate(files):
        cells = f.covariates(names)
        if cells is None:
            raise DataError(
                f"{where}: {f.path} (rows {', '.join(str(r.row) for r in f.rows)}) is linked to patients "
                f"with different {', '.join(names)}: no single covariate value"
            )
        for j, name in enumerate(names):
            row = f.rows[0].row
            try:
                value = covariate_value(name, cells.get(name, ""))
            except ValueError as exc:
                raise DataError(f"{where} row {row} ({f.path}): {exc}") from None
            if value is None:
                raise DataError(f"{where} row {row} ({f.path}): covariate {name} is missing")
            out[i, j] = value
    return out


def agreement(reference: Reference, folder_labels: dict[str, str], positive: str) -> dict:
    """How the folder labels (``path -> class``) agree with the reference truth, per definition.

    Only files with a single truth and a folder label are counted; the rest are listed."""
    scored = [f for f in reference.single if f.path in folder_labels]
    out: dict = {
        "files_with_single_truth": len(scored),
        "multi_truth": reference.excluded(),
        "not_in_data": sorted(p for p in reference.files if p not in folder_labels),
        "definitions": {},
    }
    bands: dict[str, dict[str, int]] = {}
    for f in scored:
        bands.setdefault(folder_labels[f.path], {b: 0 for b in WHO_CLASSES})[f.band] += 1
    out["folder_by_band"] = bands
    for name, (meaning, _) in DEFINITIONS.items():
        table = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
        disagree = []
        for f in scored:
            folder_pos = folder_labels[f.path] == positive
            truth = f.positive(name)
            table[("t" if folder_pos == truth else "f") + ("p" if folder_pos else "n")] += 1
            if folder_pos != truth:
                disagree.append({"path": f.path, "folder": folder_labels[f.path], "band": f.band, "t_score": f.t_score})
        agree = table["tp"] + table["tn"]
        out["definitions"][name] = {
            "meaning": meaning,
            "agree": agree,
            "of": len(scored),
            "share": agree / len(scored) if scored else None,
            "table": table,
            "disagreeing": disagree,
        }
    return out
