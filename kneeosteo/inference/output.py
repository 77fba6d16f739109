"""Prediction files (CSV or JSON, chosen by the extension) and the terminal table."""

from __future__ import annotations

from pathlib import Path

from kneeosteo.inference.predictor import COLUMNS, PredictionResult
from kneeosteo.utils.atomic import write_json
from kneeosteo.utils.csvfile import write_csv
from kneeosteo.utils.text import printable

__all__ = ["OUTPUT_SUFFIXES", "SET_SEPARATOR", "format_table", "write_predictions"]

OUTPUT_SUFFIXES = (".csv", ".json")
SET_SEPARATOR = ";"  # a conformal set of two classes in a CSV cell: "normal;osteoporosis"


def write_predictions(result: PredictionResult, out: str | Path) -> Path:
    """CSV: the columns only (errors go to stderr; a two-class set joined by ``;``, a missing domain
    score empty); JSON: rows plus an ``errors`` list."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix == ".csv":
        write_csv(out, COLUMNS, [(p.path, p.content_id, p.status, f"{p.probability:.6f}", f"{p.raw_probability:.6f}",
                                  p.label, SET_SEPARATOR.join(p.prediction_set), _num(p.domain_score),
                                  _num(p.domain_threshold), str(p.calibrated).lower(), f"{p.threshold:g}", p.model)
                                 for p in result.predictions])
    elif suffix == ".json":
        write_json(out, {"columns": list(COLUMNS), "predictions": [p.as_row() for p in result.predictions],
                         "errors": [{"path": e.path, "reason": e.reason} for e in result.errors]})
    else:
        raise ValueError(f"{out}: unknown output type {suffix or '(none)'!r}; use {' or '.join(OUTPUT_SUFFIXES)}")
    return out


def _num(v) -> str:
    return "" if v is None else f"{v:.6f}"


def format_table(result: PredictionResult) -> str:
    """Aligned columns for a terminal; content ids shortened to 12 hex digits (files keep all 64).
    Names are shown through ``printable``: a newline, tab, escape sequence, bidi mark or
    undecodable byte in a file name is escaped, so it can neither break nor reorder the table;
    the CSV and JSON files keep the real name."""
    rows = [list(COLUMNS)] + [[printable(p.path), p.content_id[:12], p.status, f"{p.probability:.4f}",
                               f"{p.raw_probability:.4f}", printable(p.label) or "-",
                               printable(SET_SEPARATOR.join(p.prediction_set)) or "-",
                               "-" if p.domain_score is None else f"{p.domain_score:.4g}",
                               "-" if p.domain_threshold is None else f"{p.domain_threshold:.4g}",
                               "yes" if p.calibrated else "NO", f"{p.threshold:g}", printable(p.model)]
                              for p in result.predictions]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
