"""Every CSV file kneeosteo writes goes through here: one dialect (comma, ``\\n`` line ends,
minimal quoting), written atomically."""

from __future__ import annotations

import csv
import io
import os
from typing import Iterable, Mapping, Sequence

from kneeosteo.utils.atomic import write_text

__all__ = ["csv_text", "write_csv"]


def csv_text(header: Sequence[str], rows: Iterable[Sequence | Mapping]) -> str:
    """The CSV text of ``rows`` (sequences in ``header`` order, or mappings keyed by it)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow([row.get(k, "") for k in header] if isinstance(row, Mapping) else row)
    return buf.getvalue()


def write_csv(target: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence | Mapping]) -> None:
    """Write ``rows`` under ``header`` to ``target`` atomically."""
    write_text(target, csv_text(header, rows))
