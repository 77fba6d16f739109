"""The input formats kneeosteo reads: one table, and everything that needs the list derived from it.

The reader (which suffixes it tries, which Pillow plugins it enables), the command line's
candidate-file check (``reader.is_candidate``), the web upload check and its 415 message, the web
page's file picker (``accept``) and the help texts all read :data:`FORMATS`, so they cannot
disagree. Adding a format is one :class:`InputFormat` entry; one Pillow decodes needs nothing
else, a new kind of decoder also needs its branch in ``reader.read_image``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "FORMATS",
    "InputFormat",
    "accept_attribute",
    "by_pillow_format",
    "by_suffix",
    "describe",
    "pillow_formats",
    "sniff",
    "suffixes",
]

DECODERS = ("pillow", "dicom")


def _starts(*magic: bytes) -> Callable[[bytes], bool]:
    return lambda head: head.startswith(magic)


_BMP_DIB_SIZES = (12, 40, 52, 56, 64, 108, 124)  # "BM" alone is too weak: it also starts text


def _is_bmp(head: bytes) -> bool:
    return head[:2] == b"BM" and len(head) > 18 and head[14] in _BMP_DIB_SIZES and head[15:18] == bytes(3)


def _is_dicom(head: bytes) -> bool:
    # with the preamble: "DICM" at 128; without (old archives): a group 0002 or 0008 tag first,
    # a weak sign, so the reader has the last word
    return head[128:132] == b"DICM" or head[:2] in (b"\x02\x00", b"\x08\x00")


@dataclass(frozen=True)
class InputFormat:
    """One readable format. ``name`` is what ``ImageMeta.format``, the audit and the help texts show."""

    name: str
    suffixes: tuple[str, ...]  # lower case, with the dot; a file with one of them is tried
    mime_types: tuple[str, ...]  # for the web page's file picker
    decoder: str  # "pillow" or "dicom"
    sniff: Callable[[bytes], bool]  # does a file starting with these bytes look like this format?
    # Pillow format ids: the first is the plugin the reader enables, the others what that plugin
    # may report besides (the JPEG opener yields MPO for multi-picture camera files)
    pillow: tuple[str, ...] = ()
    trust_suffix: bool = False  # no reliable signature: an upload *named* so is tried anyway
    notes: str = ""

    def __post_init__(self):
        if self.decoder not in DECODERS:
            raise ValueError(f"{self.name}: unknown decoder {self.decoder!r} (one of {DECODERS})")
        if (self.decoder == "pillow") != bool(self.pillow):
            raise ValueError(f"{self.name}: a Pillow-decoded format names its Pillow format(s), no other does")
        if any(s != s.lower() or not s.startswith(".") for s in self.suffixes):
            raise ValueError(f"{self.name}: suffixes are lower case and start with a dot: {self.suffixes}")


FORMATS: tuple[InputFormat, ...] = (
    InputFormat(
        "PNG",
        (".png",),
        ("image/png",),
        "pillow",
        _starts(b"\x89PNG\r\n\x1a\n"),
        ("PNG",),
        notes="8- and 16-bit; greyscale, RGB, RGBA, palette",
    ),
    InputFormat(
        "JPEG",
        (".jpg", ".jpeg"),
        ("image/jpeg",),
        "pillow",
        _starts(b"\xff\xd8\xff"),
        ("JPEG", "MPO"),
        notes="EXIF orientation applied",
    ),
    InputFormat("BMP", (".bmp",), ("image/bmp",), "pillow", _is_bmp, ("BMP",)),
    InputFormat(
        "TIFF",
        (".tif", ".tiff"),
        ("image/tiff",),
        "pillow",
        _starts(b"II*\x00", b"MM\x00*"),
        ("TIFF",),
        notes="8/16/32-bit integer (32-bit: stretched to its own range), 32-bit float",
    ),
    InputFormat(
        "GIF", (".gif",), ("image/gif",), "pillow", _starts(b"GIF87a", b"GIF89a"), ("GIF",), notes="first frame"
    ),
    InputFormat(
        "DICOM",
        (".dcm", ".dicom"),
        ("application/dicom",),
        "dicom",
        _is_dicom,
        trust_suffix=True,
        notes="with or without the DICM preamble, any suffix (found by its preamble)",
    ),
)


def suffixes(decoder: str | None = None) -> frozenset[str]:
    """Every suffix the reader tries (of one decoder's formats, given ``decoder``)."""
    return frozenset(s for f in FORMATS if decoder in (None, f.decoder) for s in f.suffixes)


def pillow_formats() -> tuple[str, ...]:
    """The Pillow plugins the reader enables, in table order (the order Pillow tries them)."""
    return tuple(f.pillow[0] for f in FORMATS if f.pillow)


def by_pillow_format(pil_format: str) -> InputFormat | None:
    return next((f for f in FORMATS if pil_format in f.pillow), None)


def by_suffix(suffix: str) -> InputFormat | None:
    return next((f for f in FORMATS if suffix.lower() in f.suffixes), None)


def sniff(head: bytes) -> InputFormat | None:
    """The format a file starting with ``head`` (its first bytes, 132 are enough) looks like."""
    return next((f for f in FORMATS if f.sniff(head)), None)


def describe(last: str = ",") -> str:
    """One line for help texts: ``"PNG, JPEG, BMP, TIFF, GIF, DICOM"``; ``describe("or")`` ends
    ``"... GIF or DICOM"``."""
    names = [f.name for f in FORMATS]
    if last == "," or len(names) < 2:
        return ", ".join(names)
    return f"{', '.join(names[:-1])} {last} {names[-1]}"


def accept_attribute() -> str:
    """The ``accept`` list of an HTML file input: every suffix, then every MIME type."""
    return ",".join([s for f in FORMATS for s in f.suffixes] + [m for f in FORMATS for m in f.mime_types])
