"""Uploads, handled defensively: the body is counted while it streams in (413 past the limit,
before it is all received), the file goes only into a private temporary folder that the request
removes, its type is decided by its first bytes (the client's file name is never a path), and
the project's reader decodes it with its decompression-bomb guard.

Status codes: 413 too large; 415 not an image we read; 422 an image that cannot be decoded
(corrupt, truncated, empty, too many pixels), with the reader's reason."""

from __future__ import annotations

import tempfile
from pathlib import Path, PurePath

from fastapi import HTTPException, UploadFile

from kneeosteo.data import formats
from kneeosteo.data.reader import LoadedImage, read_image
from kneeosteo.errors import ImageReadError, NotAnImageError

__all__ = ["ACCEPTED", "ACCEPT_LIST", "BodyLimit", "TooLarge", "decode", "display_name", "save_upload"]

CHUNK = 1 << 20
# multipart framing (boundaries, part headers) on top of the file itself
MULTIPART_SLACK = 64 * 1024
ACCEPTED = formats.describe("or")  # "PNG, JPEG, BMP, TIFF, GIF or DICOM": the 415 message and the page
ACCEPT_LIST = formats.accept_attribute()  # the page's <input type=file accept=...>


class TooLarge(HTTPException):
    """413; an HTTPException so that FastAPI passes it through its body parsing unchanged."""

    def __init__(self, limit: int):
        super().__init__(413, f"upload too large: the limit is {_mb(limit)}")


def _mb(n: int) -> str:
    return f"{n / 1e6:g} MB" if n >= 100_000 else f"{n} bytes"


class BodyLimit:
    """ASGI middleware: refuse a request body over ``limit`` (+ multipart framing) bytes, by its
    Content-Length when it has one, else by counting the chunks as they arrive (chunked uploads)."""

    def __init__(self, app, limit: int, slack: int = MULTIPART_SLACK):
        self.app, self.limit, self.body_limit = app, limit, limit + slack

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.body_limit):
            from fastapi.responses import JSONResponse

            response = JSONResponse({"detail": TooLarge(self.limit).detail}, 413, headers={"Connection": "close"})
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.body_limit:
                    raise TooLarge(self.limit)
            return message

        await self.app(scope, counted, send)


def display_name(filename: str | None) -> str:
    """The client's name for the file, for messages only: never opened, never joined to a path."""
    name = PurePath((filename or "").replace("\\", "/")).name
    return "".join(c for c in name if c.isprintable())[:200] or "upload"


def _suffix(head: bytes, filename: str) -> str | None:
    """The temporary file's suffix, from the formats table: by content (first bytes), or by the
    client's name for a format without a reliable signature (DICOM without preamble)."""
    fmt = formats.sniff(head)
    if fmt is None:
        fmt = formats.by_suffix(PurePath(filename).suffix)
        if fmt is not None and not fmt.trust_suffix:
            fmt = None
    return None if fmt is None else fmt.suffixes[0]


async def save_upload(upload: UploadFile, folder: Path, limit: int) -> Path:
    """Copy the upload into ``folder`` (a TemporaryDirectory) with a suffix chosen by content."""
    name = display_name(upload.filename)
    head = await upload.read(CHUNK)
    if not head:
        raise HTTPException(422, f"{name}: the file is empty")
    suffix = _suffix(head, name)
    if suffix is None:
        raise HTTPException(415, f"{name}: not an image this service reads; send a {ACCEPTED} file")
    size = 0
    with tempfile.NamedTemporaryFile(dir=folder, prefix="upload-", suffix=suffix, delete=False) as out:
        while head:
            size += len(head)
            if size > limit:
                raise TooLarge(limit)
            out.write(head)
            head = await upload.read(CHUNK)
    return Path(out.name)


def decode(path: Path, name: str, max_pixels: int) -> LoadedImage:
    """The reader's canonical image; its errors become 415/422 naming the upload, not our path."""
    try:
        img = read_image(path, max_pixels=max_pixels)
        _ = img.content_id  # hash here, in the worker thread
        return img
    except ImageReadError as exc:
        reason = exc.reason.replace(str(path), name)
        by_name = formats.by_suffix(path.suffix)
        if isinstance(exc, NotAnImageError) or (
            reason.startswith("not a recognised") and by_name and by_name.trust_suffix
        ):
            raise HTTPException(415, f"{name}: {reason}") from None  # DICOM by name only, and it is not
        if reason.startswith("not a recognised"):  # its first bytes said what it is: a damaged file
            reason = f"corrupt {by_name.name if by_name else path.suffix[1:].upper()} data: the file starts like one but cannot be decoded"
        if reason.startswith("decompression bomb"):  # the declared size is over ours (or over Pillow's own limit)
            reason += (
                f"; this service decodes at most {max_pixels / 1e6:g} MP per image (`serve --max-megapixels`):"
                " send a smaller image"
            )
        raise HTTPException(422, f"{name}: {reason}") from None
