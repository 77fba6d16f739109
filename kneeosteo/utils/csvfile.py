"""Every CSV file kneeosteo writes goes through here: one dialect (comma, ``\\n`` line ends,
minimal quoting), written atomically, and safe to open in a spreadsheet.

Formula injection (OWASP "CSV Injection"): a cell that starts with ``=``, ``+``, ``-``, ``@``, a
tab or a carriage return is run as a formula by Excel, LibreOffice and Google Sheets. A file
named ``=HYPERLINK(...).png`` would then put a live formula into ``predictions.csv``. Such text
cells are written with a leading ``'`` (the guidance's escape; spreadsheets show the text as
is); numbers, and text that is a plain number such as ``-0.5``, are left alone."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

from kneeosteo.errors import DataError
from kneeosteo.utils.atomic import atomic_path, write_text

__all__ = ["csv_stream", "csv_text", "read_csv_table", "safe_cell", "write_csv"]

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value):
    """``value``, with a leading ``'`` if it is text a spreadsheet would run as a formula."""
    if not isinstance(value, str) or not value.startswith(_FORMULA_START):
        return value
    try:
        float(value)
        return value  # a plain number such as "-0.5"
    except ValueError:
        return "'" + value


def csv_text(header: Sequence[str], rows: Iterable[Sequence | Mapping], with_header: bool = True) -> str:
    """The CSV text of ``rows`` (sequences in ``header`` order, or mappings keyed by it)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    # Python < 3.12 quotes a field only for the characters of ``lineterminator``, so a bare "\r"
    # in a file name would end the row for every reader: rows holding one are fully quoted
    quoted = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
    if with_header:
        w.writerow(header)
    for row in rows:
        cells = [safe_cell(c) for c in ([row.get(k, "") for k in header] if isinstance(row, Mapping) else row)]
        (quoted if any(isinstance(c, str) and "\r" in c for c in cells) else w).writerow(cells)
    return buf.getvalue()


@contextmanager
def csv_stream(target: str | os.PathLike, header: Sequence[str]) -> Iterator[Callable[[Iterable], None]]:
    """Yield ``write(rows)``: a CSV file written chunk by chunk (a few rows in memory at a time),
    renamed onto ``target`` only when the ``with`` block ends without an error, like :func:`write_csv`."""
    with atomic_path(target) as tmp:
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as fh:
            fh.write(csv_text(header, []))
            yield lambda rows: fh.write(csv_text(header, rows, with_header=False))


def write_csv(target: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence | Mapping]) -> None:
    """Write ``rows`` under ``header`` to ``target`` atomically."""
    write_text(target, csv_text(header, rows))


def read_csv_table(file: str | os.PathLike, what: str, header_hint: str) -> tuple[list[str], list[list[str]]]:
    """A user's CSV manifest as (stripped column names, data rows): UTF-8 with or without Excel's
    byte-order mark; a missing, unreadable or empty file is a one-line :class:`DataError` naming it
    and ``what`` it is (``header_hint``: the header row it needs, for the message); a table without a
    ``path`` column too."""
    try:
        with open(file, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            lines = list(reader)
    except FileNotFoundError:
        raise DataError(f"{file}: {what} not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{file}: cannot read the {what} as UTF-8 CSV ({exc})") from exc
    if not header:
        raise DataError(f"{file}: empty {what} (it needs a header row: {header_hint})")
    columns = [h.strip() for h in header]
    if "path" not in columns:
        raise DataError(f"{file}: no 'path' column (columns: {', '.join(columns)})")
    return columns, lines
