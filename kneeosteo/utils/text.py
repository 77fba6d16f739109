"""File names shown to a person: on a terminal, in a table, in a figure title.

A file name is whatever bytes the file system holds: not valid UTF-8 (Python carries those bytes
as lone surrogates, ``os.fsdecode``), a raw newline that breaks a table row, a right-to-left
override that reverses what follows it on screen. :func:`printable` shows such a name safely and
unambiguously; files, CSV and JSON keep the real name.
"""

from __future__ import annotations

__all__ = ["printable"]

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, as os.fsdecode carries it
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def printable(text) -> str:
    """``text`` with every character that is not printable as itself escaped: control characters
    (``\\n``, ``\\x1b``), format characters such as the bidirectional marks and overrides
    (``\\u202e``), line/paragraph separators, lone surrogates (an undecodable byte ``\\xe9``).
    Printable text, any script, comes back unchanged."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)
