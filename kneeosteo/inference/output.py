"""Prediction files (CSV, JSON or Parquet, chosen by the extension) and the terminal table.

:class:`PredictionWriter` streams: rows are written as they come (``predict --ray`` never holds
them all), CSV into one file, Parquet into a folder of part files (``preds.parquet/part-00000.parquet``,
...; ``pyarrow.parquet.read_table(folder)`` reads them as one table), each committed atomically."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from kneeosteo.errors import KneeosteoError, OutputError
from kneeosteo.inference.predictor import COLUMNS, Prediction, PredictionResult
from kneeosteo.utils.atomic import atomic_path, new_folder_mode, write_json
from kneeosteo.utils.csvfile import csv_stream
from kneeosteo.utils.text import printable

__all__ = [
    "OUTPUT_SUFFIXES",
    "SET_SEPARATOR",
    "STREAM_SUFFIXES",
    "PredictionWriter",
    "check_output",
    "csv_row",
    "format_table",
    "knees_cell",
    "shift_side_file",
    "write_predictions",
]

OUTPUT_SUFFIXES = (".csv", ".json", ".parquet")
STREAM_SUFFIXES = (".csv", ".parquet")  # written row by row; JSON is one document
SET_SEPARATOR = ";"  # a conformal set of two classes in a CSV cell: "normal;osteoporosis"
SHARD_ROWS = 100_000  # rows per Parquet part file
PART_FILE = re.compile(r"part-\d{5}\.parquet")
# how our own files begin (a file that does not is the user's, and is never replaced)
_OWN_START = {".csv": b"path,content_id,", ".json": b'{\n  "columns": [\n    "path",'}


def _foreign(out: Path) -> str | None:
    """Why ``out``, which exists, is not a prediction output of ours (None: it is ours, or empty)."""
    st = out.lstat()
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    suffix = out.suffix.lower()
    if suffix == ".parquet":
        if not stat.S_ISDIR(st.st_mode):
            return "not a folder of Parquet part files"
        with os.scandir(out) as entries:
            other = sorted(
                e.name for e in entries if not (PART_FILE.fullmatch(e.name) and e.is_file(follow_symlinks=False))
            )
        return (
            f"a folder holding {other[0]!r}" + (f" and {len(other) - 1} more" if len(other) > 1 else "")
            if other
            else None
        )
    if stat.S_ISDIR(st.st_mode):
        return "a folder"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_size == 0:
        return None
    start = _OWN_START.get(suffix, b"")
    with open(out, "rb") as fh:
        head = fh.read(len(start))
    return None if start and head == start else f"not a {suffix.lstrip('.').upper()} prediction file of kneeosteo"


def check_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse, before any work, an ``out`` that would destroy what kneeosteo did not write: one
    that exists and is not an earlier prediction output (a folder of our part files, a file
    beginning with our header) or is empty, and one that is also an input (or holds one); and
    Parquet without pyarrow."""
    out = Path(out)
    if out.suffix.lower() == ".parquet":
        _pyarrow()  # not installed: one line now, not after predicting everything
    try:
        where = out.resolve()
        for item in inputs:
            try:
                p = Path(item).resolve()
            except (OSError, RuntimeError):  # a link loop, a name too long: the input's own error, later
                p = Path(os.path.abspath(item))
            if p == where or where in p.parents:
                raise OutputError(f"{out}: is also an input; choose another --out")
        why = _foreign(out) if os.path.lexists(out) else None
    except (OSError, RuntimeError) as exc:
        raise OutputError(f"{out}: cannot be checked ({getattr(exc, 'strerror', None) or exc})") from exc
    if why is not None:
        raise OutputError(
            f"{out}: exists and is {why}, not an earlier output of `kneeosteo predict`; "
            "nothing was changed: choose another --out or move it away"
        )
    return out


def csv_row(p: Prediction) -> tuple:
    """One prediction as its CSV cells: a two-class set joined by ``;``, a missing domain score empty."""
    return (
        p.path,
        p.content_id,
        p.status,
        _num(p.probability),
        _num(p.raw_probability),
        p.label,
        SET_SEPARATOR.join(p.prediction_set),
        _num(p.domain_score),
        _num(p.domain_threshold),
        str(p.calibrated).lower(),
        f"{p.threshold:g}",
        p.model,
        SET_SEPARATOR.join(f"{c}={v:.6f}" for c, v in p.probabilities.items()) if p.probabilities else "",
        _num(p.value),
        _num(p.interval_low),
        _num(p.interval_high),
        knees_cell(p),
        p.knee_reason,
        p.status_reason,
        _num(p.fused_probability),
        p.answer_basis,
    )


def knees_cell(p: Prediction) -> str:
    """A knee run's knees as one CSV/Parquet cell: compact JSON (a list of objects, left to right:
    position, x, y, plateau_width, box and the knee's own answer); empty for other runs."""
    if p.knees is None:
        return ""
    return json.dumps(
        [{k: (None if isinstance(v, float) and v != v else v) for k, v in d.items()} for d in p.knees],
        separators=(",", ":"),
        default=str,
    )


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise KneeosteoError(
            f"Parquet output needs pyarrow ({exc}); pip install 'kneeosteo[ray]' (or pyarrow)"
        ) from exc
    return pa, pq


def parquet_schema():
    pa, _ = _pyarrow()
    return pa.schema(
        [
            ("path", pa.string()),
            ("content_id", pa.string()),
            ("status", pa.string()),
            ("probability", pa.float64()),
            ("raw_probability", pa.float64()),
            ("label", pa.string()),
            ("prediction_set", pa.list_(pa.string())),
            ("domain_score", pa.float64()),
            ("domain_threshold", pa.float64()),
            ("calibrated", pa.bool_()),
            ("threshold", pa.float64()),
            ("model", pa.string()),
            ("probabilities", pa.map_(pa.string(), pa.float64())),
            ("value", pa.float64()),
            ("interval_low", pa.float64()),
            ("interval_high", pa.float64()),
            ("knees", pa.string()),
            ("knee_reason", pa.string()),
            ("status_reason", pa.string()),
            ("fused_probability", pa.float64()),
            ("answer_basis", pa.string()),
        ]
    )


def _utf8(text: str) -> str:
    # Parquet strings are UTF-8: a file name that is not (os.fsdecode's lone surrogates) is kept
    # readable with \x escapes, as the terminal table shows it
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class PredictionWriter:
    """Stream predictions into ``out`` (.csv: one file; .parquet: a folder of part files of
    ``shard_rows`` rows). Nothing appears at ``out`` unless the ``with`` block ends without an
    error; then it replaces what was there."""

    def __init__(self, out: str | os.PathLike, shard_rows: int = SHARD_ROWS):
        self.out, self.shard_rows, self.rows = Path(out), shard_rows, 0
        self.suffix = self.out.suffix.lower()
        if self.suffix not in STREAM_SUFFIXES:
            raise ValueError(f"{out}: cannot stream {self.suffix or '(none)'!r}; use {' or '.join(STREAM_SUFFIXES)}")
        self._pending: list[Prediction] = []
        check_output(self.out)

    def __enter__(self) -> PredictionWriter:
        if self.suffix == ".csv":
            self._csv = csv_stream(self.out, COLUMNS)
            self._write_csv = self._csv.__enter__()
        else:
            self._schema = parquet_schema()
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=self.out.parent))
            os.chmod(self._dir, new_folder_mode())  # mkdtemp made it 0700
            self._parts = 0
        return self

    def write(self, predictions) -> None:
        predictions = list(predictions)
        self.rows += len(predictions)
        if self.suffix == ".csv":
            self._write_csv(csv_row(p) for p in predictions)
            return
        self._pending.extend(predictions)
        while len(self._pending) >= self.shard_rows:
            self._flush(self._pending[: self.shard_rows])
            self._pending = self._pending[self.shard_rows :]

    def _flush(self, rows: list[Prediction]) -> None:
        pa, pq = _pyarrow()
        cols = {name: [] for name in self._schema.names}
        for p in rows:
            for name in cols:
                v = getattr(p, name)
                cols[name].append(
                    _utf8(v)
                    if name == "path"
                    else list(v)
                    if name == "prediction_set"
                    else (knees_cell(p) or None)
                    if name == "knees"
                    else (None if v is None else list(v.items()))
                    if name == "probabilities"
                    else v
                )
        table = pa.table(cols, schema=self._schema)
        with atomic_path(self._dir / f"part-{self._parts:05d}.parquet") as tmp:
            pq.write_table(table, tmp)
        self._parts += 1

    def __exit__(self, et, ev, tb) -> bool:
        if self.suffix == ".csv":
            return bool(self._csv.__exit__(et, ev, tb))
        try:
            if et is None:
                if self._pending or not self._parts:  # an empty result is still a readable (empty) table
                    self._flush(self._pending)
                self._pending = []
                check_output(self.out)  # again: something may have been put there meanwhile
                old = None
                if os.path.lexists(self.out):  # only ever our own part files (or nothing)
                    old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old.", suffix=".tmp", dir=self.out.parent))
                    os.replace(self.out, old / "x")
                try:
                    os.replace(self._dir, self.out)
                except OSError:
                    if old is not None:
                        os.replace(old / "x", self.out)
                    raise
                if old is not None:  # file by file, never a whole tree: only what check_output let through
                    for part in (old / "x").iterdir():
                        if PART_FILE.fullmatch(part.name):
                            part.unlink()
                    (old / "x").rmdir()
                    old.rmdir()
        except OutputError:
            raise
        except OSError as exc:
            raise OutputError(
                f"{self.out}: could not be written ({exc.strerror or exc}); its previous version, if any, is unchanged"
            ) from exc
        finally:
            if self._dir.exists():
                shutil.rmtree(self._dir, ignore_errors=True)
        return False


def shift_side_file(out: str | Path) -> Path:
    """Where a CSV or Parquet output's ``batch_shift`` record goes: ``preds.csv`` ->
    ``preds.batch_shift.json`` beside it (a JSON output carries it inside)."""
    out = Path(out)
    return out.with_name(f"{out.stem}.batch_shift.json")


def write_predictions(result: PredictionResult, out: str | Path) -> Path:
    """CSV: the columns only (errors go to stderr; a two-class set joined by ``;``, a missing domain
    score empty); Parquet: the same columns typed, in part files; JSON: rows plus an ``errors`` list.
    The batch shift alarm's record (``result.batch_shift``, when assessed): a ``batch_shift`` key
    of the JSON, or the side file :func:`shift_side_file` next to a CSV or Parquet output."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix in STREAM_SUFFIXES:
        with PredictionWriter(out) as w:
            w.write(result.predictions)
        if result.batch_shift is not None:
            write_json(shift_side_file(out), {"batch_shift": result.batch_shift})
    elif suffix == ".json":
        check_output(out)
        doc = {
            "columns": list(COLUMNS),
            "predictions": [_finite(p.as_row()) for p in result.predictions],
            "errors": [{"path": e.path, "reason": e.reason} for e in result.errors],
        }
        if result.batch_shift is not None:
            doc["batch_shift"] = result.batch_shift
        write_json(out, doc)
    else:
        raise ValueError(f"{out}: unknown output type {suffix or '(none)'!r}; use {' or '.join(OUTPUT_SUFFIXES)}")
    return out


def _finite(row: dict) -> dict:
    """JSON has no NaN or infinity (strict parsers reject Python's ``NaN``): null, as the API writes."""
    return {
        k: None
        if isinstance(v, float) and not math.isfinite(v)
        else {c: None if not math.isfinite(x) else x for c, x in v.items()}
        if isinstance(v, dict)
        else v
        for k, v in row.items()
    }


def _num(v) -> str:
    return "" if v is None or v != v else f"{v:.6f}"  # v != v: NaN (a regression has no probability)


def _knees_text(p: Prediction) -> str:
    """A knee run's knees for the terminal: ``left:ok 0.812;right:uncertain 0.430``."""
    if not p.knees:
        return "-"

    def prob(v) -> str:
        return "-" if v is None or v != v else f"{v:.3f}"

    return SET_SEPARATOR.join(f"{k['position']}:{k['status']} {prob(k.get('probability'))}" for k in p.knees)


def format_table(result: PredictionResult) -> str:
    """Aligned columns for a terminal; content ids shortened to 12 hex digits (files keep all 64).
    Names are shown through ``printable``: a newline, tab, escape sequence, bidi mark or
    undecodable byte in a file name is escaped, so it can neither break nor reorder the table;
    the CSV and JSON files keep the real name."""

    def num(v, fmt: str) -> str:
        return "-" if v is None or v != v else format(v, fmt)

    rows = [list(COLUMNS)] + [
        [
            printable(p.path),
            p.content_id[:12],
            p.status,
            num(p.probability, ".4f"),
            num(p.raw_probability, ".4f"),
            printable(p.label) or "-",
            printable(SET_SEPARATOR.join(p.prediction_set)) or "-",
            num(p.domain_score, ".4g"),
            num(p.domain_threshold, ".4g"),
            "yes" if p.calibrated else "NO",
            f"{p.threshold:g}",
            printable(p.model),
            SET_SEPARATOR.join(f"{printable(c)}={v:.3f}" for c, v in (p.probabilities or {}).items()) or "-",
            num(p.value, ".3f"),
            num(p.interval_low, ".3f"),
            num(p.interval_high, ".3f"),
            _knees_text(p),
            printable(p.knee_reason) or "-",
            printable(p.status_reason) or "-",
            num(p.fused_probability, ".4f"),
            p.answer_basis if p.fused_probability is not None or p.answer_basis != "image_only" else "-",
        ]
        for p in result.predictions
    ]
    # the task columns only when a row has them: a binary run's table is the paper model's
    first_task = COLUMNS.index("probabilities")
    keep = [i for i in range(len(COLUMNS)) if i < first_task or any(r[i] != "-" for r in rows[1:])]
    rows = [[r[i] for i in keep] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(keep))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
