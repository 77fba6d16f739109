"""Label manifests: a CSV of labels beside the images, instead of (or on top of) class folders.

A hospital export is a folder of files (DICOM, PNG, JPEG...) and a spreadsheet saying what each
is. ``--labels labels.csv`` reads that spreadsheet, saved as CSV (comma-separated, UTF-8; Excel's
byte-order mark is accepted). One row per image::

    path,label,patient_id,t_score,bmd,side,study_date,site
    p001/left.dcm,osteopenia,P001,-1.8,0.81,left,2024-03-01,A
    p001/right.dcm,osteopenia,P001,-1.6,0.83,right,2024-03-01,A

- ``path`` (required): the file, relative to DATA (POSIX ``/``; never absolute, never ``..``).
- ``label``: the class name; required for a classification task, optional for a regression
  target (then the WHO band of ``t_score`` stands in for stratifying the split).
- ``patient_id``: every film of one patient lands in one partition (``data/grouping.py``).
- ``t_score``, ``bmd``: numbers (``--target t_score|bmd`` trains on them).
- ``side``, ``study_date`` and any other column: kept as text, shown in the audit.

Whole-file problems (no such file, no ``path`` column, no label or target column) are a
:class:`~kneeosteo.errors.DataError` naming the file. A bad *row* (missing file, empty or unknown
label, duplicate path, a path listed twice with two labels (a label conflict: every row of it),
non-numeric or out-of-range T-score, a path outside DATA, symbolic links followed, a name the system
cannot open) is left out with a one-line reason naming the row; nothing is dropped silently: the reasons travel to the audit
(``manifest_rows_left_out``) and the split file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from kneeosteo.errors import ConfigError, DataError
from kneeosteo.utils.csvfile import read_csv_table

__all__ = ["NUMERIC_COLUMNS", "TARGETS", "Manifest", "ManifestRow", "parse_merge", "read_manifest"]

NUMERIC_COLUMNS = ("t_score", "bmd")  # also the regression targets (``--target``)
TARGETS = ("label", *NUMERIC_COLUMNS)  # TrainConfig.target: "label" = classification
MAX_ROWS = 5_000_000  # a bigger "manifest" is a mistake, not a data set


@dataclass
class ManifestRow:
    row: int  # 1-based line number of the CSV (the header is line 1), as a spreadsheet shows it
    path: str  # relative to DATA, POSIX
    label: str  # "" when the manifest gives none
    patient_id: str = ""
    values: dict[str, float] = field(default_factory=dict)  # t_score, bmd when given
    info: dict[str, str] = field(default_factory=dict)  # side, study_date and the extra columns


@dataclass
class Manifest:
    file: Path
    columns: list[str]
    rows: list[ManifestRow]
    left_out: list[dict]  # {"row", "path", "reason"}

    def leave_out(self, row: ManifestRow, reason: str) -> None:
        self.left_out.append({"row": row.row, "path": row.path, "reason": reason})


def parse_merge(items) -> dict[str, str]:
    """``["osteopenia=normal"]`` (or one comma-separated string) -> ``{"osteopenia": "normal"}``."""
    if not items:
        return {}
    if isinstance(items, str):
        items = [items]
    if isinstance(items, dict):
        items = [f"{k}={v}" for k, v in items.items()]
    out: dict[str, str] = {}
    for item in (p for text in items for p in str(text).split(",")):
        src, sep, dst = (s.strip() for s in item.partition("="))
        if not sep or not src or not dst or src == dst:
            raise ConfigError(f"merge {item!r}: write CLASS=INTO, such as osteopenia=normal")
        if src in out and out[src] != dst:
            raise ConfigError(f"merge: {src!r} merged into both {out[src]!r} and {dst!r}")
        out[src] = dst
    chained = sorted(set(out) & set(out.values()))
    if chained:
        raise ConfigError(
            f"merge: {', '.join(chained)} both merged and merged into; merge each class straight into its final one"
        )
    return out


def _relative(text: str) -> str | None:
    """The manifest's path as a clean relative POSIX path, or None when it leaves DATA."""
    p = PurePosixPath(text.replace("\\", "/"))
    if p.is_absolute() or not p.parts or ".." in p.parts or p.parts[0].endswith(":"):
        return None
    return p.as_posix()


# T-scores are standard deviations from a young adult's mean: beyond these a cell is a typo or
# another unit (``1_000``, a BMD in the wrong column), never a patient
T_SCORE_RANGE = (-10.0, 10.0)


def _number(text: str) -> float | None:
    """A finite number from a cell; None when the cell is not one (a decimal comma is not guessed,
    nor Python's ``1_000``)."""
    if "_" in text:
        return None
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _out_of_range(column: str, v: float) -> str | None:
    if column == "t_score" and not T_SCORE_RANGE[0] <= v <= T_SCORE_RANGE[1]:
        return f"t_score {v:g} out of [{T_SCORE_RANGE[0]:g}, {T_SCORE_RANGE[1]:g}]"
    if column == "bmd" and not v > 0:
        return f"bmd {v:g} is not positive"
    return None


def _inside(target: Path, root: Path) -> bool:
    """Does ``target`` (symbolic links followed) lie inside ``root``?"""
    return target.resolve().is_relative_to(root)


def read_manifest(file: str | Path, root: str | Path) -> Manifest:
    """Parse and check ``file`` against the data folder ``root`` (see the module docstring)."""
    file, root = Path(file), Path(root)
    columns, lines = read_csv_table(file, "label manifest", "path,label,...")
    if not any(c in columns for c in TARGETS):
        raise DataError(f"{file}: no 'label', 't_score' or 'bmd' column: nothing to learn from")
    doubled = sorted({c for c in columns if columns.count(c) > 1})
    if doubled:
        raise DataError(f"{file}: column(s) {', '.join(doubled)} appear twice")
    if len(lines) > MAX_ROWS:
        raise DataError(f"{file}: {len(lines)} rows, more than {MAX_ROWS}")
    out = Manifest(file, columns, [], [])
    seen: dict[str, ManifestRow] = {}
    conflicts: dict[str, list[int]] = {}  # a path listed with two labels: left out, every row of it
    real_root = root.resolve()
    for number, cells in enumerate(lines, start=2):
        if not any(c.strip() for c in cells):
            continue  # a blank line, as spreadsheets leave at the end
        values = dict(zip(columns, (c.strip() for c in cells)))
        row = ManifestRow(number, values.get("path", ""), values.get("label", ""), values.get("patient_id", ""))
        if len(cells) != len(columns):
            out.leave_out(row, f"{len(cells)} cells, the header has {len(columns)}")
            continue
        rel = _relative(row.path) if row.path else None
        if rel is None:
            out.leave_out(row, "no path" if not row.path else "path outside the data folder (absolute or '..')")
            continue
        row.path = rel
        if rel in seen:
            first = seen[rel]
            if row.label != first.label:  # as identical images with two labels: a label conflict
                conflicts.setdefault(rel, [first.row]).append(number)
                out.leave_out(row, f"label conflict: {row.label!r} here, {first.label!r} on row {first.row}")
            else:
                out.leave_out(row, f"duplicate path (first on row {first.row})")
            continue
        seen[rel] = row
        bad = [c for c in NUMERIC_COLUMNS if values.get(c) and _number(values[c]) is None]
        if bad:
            out.leave_out(row, "; ".join(f"non-numeric {c} {values[c]!r}" for c in bad))
            continue
        row.values = {c: _number(values[c]) for c in NUMERIC_COLUMNS if values.get(c)}
        wild = [w for w in (_out_of_range(c, v) for c, v in row.values.items()) if w]
        if wild:
            out.leave_out(row, "; ".join(wild))
            continue
        row.info = {c: v for c, v in values.items() if c not in ("path", "label", "patient_id", *NUMERIC_COLUMNS) and v}
        target = root / rel
        try:
            if not target.is_file():
                out.leave_out(row, "file not found" if not target.exists() else "not a regular file")
                continue
            if not _inside(target, real_root):
                out.leave_out(row, "path outside the data folder (through a symbolic link)")
                continue
        except (OSError, RuntimeError) as exc:  # a name too long, a permission, a link loop: this row only
            out.leave_out(row, f"cannot be opened ({getattr(exc, 'strerror', None) or exc})")
            continue
        out.rows.append(row)
    if conflicts:
        for row in [r for r in out.rows if r.path in conflicts]:
            out.rows.remove(row)
            rows = conflicts[row.path]
            out.leave_out(
                row,
                f"label conflict: the path is listed again with another label on row(s) "
                f"{', '.join(map(str, rows[1:]))}",
            )
    return out
