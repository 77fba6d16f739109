"""Read one radiograph file (raster or DICOM) into a canonical greyscale float32 image.

Every failure becomes an :class:`ImageReadError` naming the file, so that a scan over
thousands of files can report bad ones by name and carry on instead of crashing.
The format is decided by content, not by suffix: the suffix only decides whether we try.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from kneeosteo.data import formats
from kneeosteo.errors import ImageReadError, NotAnImageError

if TYPE_CHECKING:  # pydicom and imagehash are imported where a DICOM file is read or a hash taken
    import imagehash

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "MAX_SIDE",
    "ImageReadError",
    "NotAnImageError",
    "ImageMeta",
    "LoadedImage",
    "is_candidate",
    "read_image",
    "to_uint8",
]

# Which files we try, and with which decoder, comes from the formats table (data/formats.py).
IMAGE_SUFFIXES: frozenset[str] = formats.suffixes()
MAX_PIXELS: int = 100_000_000
# Images whose longer side exceeds this are decoded reduced by an integer factor (JPEG at reduced
# DCT scale, others averaged over factor x factor blocks in their integer type), so that a small
# file with huge pixels cannot cost gigabytes. Every KOP image (at most 2430 x 2660) and anything
# up to 4096 x 4096 decodes exactly as it always did: same pixels, same content id.
MAX_SIDE: int = 4096

_DICOM_SUFFIXES = formats.suffixes("dicom")
# Restrict Pillow to the formats we mean to accept: with every plugin enabled, random bytes are
# occasionally "recognised" as TGA, SPIDER, ... and decoded into noise.
_PIL_FORMATS = formats.pillow_formats()
_PIL_NAMES = "/".join(f.name for f in formats.FORMATS if f.decoder == "pillow")
_MODE_BITS = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 16, "F": 32}
NON_FINITE = "pixel values are not finite (NaN or infinity)"


@dataclass(frozen=True)
class ImageMeta:
    path: str
    format: str  # decoded format: a name in the formats table (PNG, JPEG, ..., DICOM)
    mode: str  # PIL mode, or DICOM photometric interpretation
    width: int  # of the canonical pixels, i.e. after EXIF orientation
    height: int
    bit_depth: int  # bits per sample in the source
    file_size: int
    channels: int
    # width/height stay the source's; the pixels are that size divided by ``reduction`` (rounded
    # up) when the longer side exceeded ``max_side`` (1: full size)
    reduction: int = 1
    # DICOM only: who and which study the film belongs to ("" when absent), so a split can keep
    # every film of one patient in one partition (data/grouping.py)
    patient_id: str = ""
    study_uid: str = ""


@dataclass(frozen=True, eq=False)  # eq=False: comparing ndarrays field-wise is ambiguous
class LoadedImage:
    pixels: np.ndarray  # float32, HxW, [0, 1], C-contiguous
    meta: ImageMeta

    @cached_property
    def content_id(self) -> str:
        """Identity of the picture itself, independent of container, colour type and name."""
        h = hashlib.sha256(f"{self.pixels.shape[0]}x{self.pixels.shape[1]}:".encode())
        h.update(np.ascontiguousarray(self.pixels, dtype="<f4").tobytes())
        return h.hexdigest()

    def phash(self) -> imagehash.ImageHash:
        import imagehash

        return imagehash.phash(Image.fromarray(to_uint8(self.pixels)), hash_size=8)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """[0,1] floats to uint8 with rounding, so that 8-bit sources round-trip exactly."""
    return np.rint(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def is_candidate(path) -> bool:
    """Suffix decides cheaply; otherwise sniff for DICOM, which scanners often save as
    ``IM0001`` or ``1.2.840....42`` (a numeric "suffix")."""
    p = Path(path)
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return True
    return p.is_file() and _has_dicom_preamble(p)


def read_image(path, max_pixels: int = MAX_PIXELS, max_side: int | None = MAX_SIDE) -> LoadedImage:
    """Decode ``path``; raise ImageReadError (NotAnImageError for non-images), never anything else.

    ``max_pixels`` refuses files declaring more pixels (a decompression bomb; checked on the
    header, before decoding). An image whose longer side exceeds ``max_side`` is decoded reduced
    by the smallest integer factor that brings it to at most ``max_side`` (``None``: never), so
    memory stays bounded: a 9999 x 9999 PNG costs its decoder's buffer plus a 3333 x 3333 image.
    Images within ``max_side`` decode exactly as without it."""
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    p = Path(path)
    try:
        size = p.stat().st_size
        if not p.is_file():
            raise ImageReadError(p, "not a regular file")
    except OSError as e:
        raise ImageReadError(p, f"cannot read file ({e.strerror or e})") from e
    suffix = p.suffix.lower()
    dicm = _has_dicom_preamble(p)
    if not dicm and suffix not in IMAGE_SUFFIXES:
        raise NotAnImageError(p, f"not an image file (suffix {suffix or 'none'!r})")
    if size == 0:
        raise ImageReadError(p, "empty file")
    try:
        if dicm:
            pixels, meta = _read_dicom(p, size, max_pixels, max_side, force=False)
        else:
            try:
                pixels, meta = _read_pil(p, size, max_pixels, max_side)
            except UnidentifiedImageError:
                if suffix not in _DICOM_SUFFIXES:
                    raise ImageReadError(p, f"not a recognised image format (content is not {_PIL_NAMES})") from None
                pixels, meta = _read_dicom(p, size, max_pixels, max_side, force=True)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own backstop, beyond ours: same words, our limit
        declared = re.search(r"\((\d+) pixels\)", str(e))
        limit = min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or max_pixels))
        raise ImageReadError(p, _bomb_reason(declared.group(1) if declared else "more", limit)) from e
    except MemoryError as e:
        raise ImageReadError(p, "out of memory while decoding") from e
    except Exception as e:  # decoders raise anything (OSError, SyntaxError, struct.error, ...)
        raise ImageReadError(p, f"corrupt or truncated image data ({_short(e)})") from e
    if not np.isfinite(pixels).all():  # a NaN/inf sample is no measurement: never guess one (was: 0)
        raise ImageReadError(p, NON_FINITE)
    pixels = np.ascontiguousarray(np.clip(pixels, 0.0, 1.0), dtype=np.float32)
    return LoadedImage(pixels, meta)


def _short(e: BaseException, limit: int = 200) -> str:
    msg = f"{type(e).__name__}: {e}"
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _bomb_reason(declared: str, limit: int) -> str:
    """The one wording, quoting the one limit (MAX_PIXELS unless a caller passed another)."""
    return f"decompression bomb: {declared} pixels exceeds the limit of {limit} ({limit / 1e6:g} megapixels)"


def _bomb_check(path: Path, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageReadError(path, _bomb_reason(f"{width}x{height} = {width * height}", max_pixels))


def _factor(width: int, height: int, max_side: int | None) -> int:
    """The smallest integer reduction that brings the longer side to at most ``max_side``."""
    longer = max(width, height)
    return 1 if max_side is None or longer <= max_side else -(-longer // max_side)


# modes Image.reduce averages as we need; the others go strip by strip through a mode it does:
# palette indices cannot be averaged, and alpha is dropped (reduce would weight colour by it)
_REDUCIBLE = {"L", "RGB", "I", "F", "CMYK", "YCbCr"}
_REDUCE_VIA = {
    "P": "RGB",
    "PA": "RGB",
    "RGBA": "RGB",
    "RGBX": "RGB",
    "LA": "L",
    "1": "L",
    "I;16": "I",
    "I;16B": "I",
    "I;16L": "I",
    "I;16N": "I",
}


def _reduce(img: Image.Image, factor: int) -> Image.Image:
    """Average ``factor`` x ``factor`` blocks (partial blocks at the edges, like Image.reduce) in
    the image's integer type; modes that cannot be averaged as stored are converted strip by
    strip, so no full-size copy is ever made."""
    if factor <= 1:
        return img
    if img.mode in _REDUCIBLE:
        return img.reduce(factor)
    target = _REDUCE_VIA.get(img.mode, "RGB")
    w, h = img.size
    out = Image.new(target, (-(-w // factor), -(-h // factor)))
    rows = factor * max(1, (1 << 22) // max(1, w * factor))  # strips of about 4 Mpixel, whole blocks
    for y in range(0, h, rows):
        strip = img.crop((0, y, w, min(h, y + rows))).convert(target).reduce(factor)
        out.paste(strip, (0, y // factor))
    out.info = dict(img.info)  # keep EXIF for the orientation
    return out


def _read_pil(path: Path, size: int, max_pixels: int, max_side: int | None = MAX_SIDE) -> tuple[np.ndarray, ImageMeta]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data" etc.: not actionable
        # Our limit is ``max_pixels``, checked on the declared size below, so Pillow's global
        # MAX_IMAGE_PIXELS is left alone and its warning ignored; its hard error (twice its own
        # limit, about 179 megapixels) stays as a backstop and is reported as a bomb too.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path, formats=_PIL_FORMATS) as img:
            _bomb_check(path, img.width, img.height, max_pixels)  # header only, nothing decoded yet
            fmt, mode, channels = img.format, img.mode, len(img.getbands())
            bits = _MODE_BITS.get(mode, 8)
            if fmt == "TIFF":  # 'I' and 'F' may hold 8..32-bit samples; the tag knows which
                tag = img.tag_v2.get(258, bits)
                bits = int(tag[0] if isinstance(tag, tuple) else tag)
            width, height = img.size
            factor = _factor(width, height, max_side)
            if factor > 1 and fmt in ("JPEG", "MPO"):  # the decoder scales by 1/2, 1/4 or 1/8 itself
                img.draft(img.mode, (-(-width // factor), -(-height // factor)))
            img.load()  # first frame only; raises on truncated data
            reduction = 1
            if factor > 1:
                img = _reduce(img, _factor(*img.size, max_side))
                reduction = -(-max(width, height) // max(img.size))  # JPEG: DCT scale x block factor
            swap = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientation turns it a quarter
            img = ImageOps.exif_transpose(img)
            pixels = _pil_to_grey(img, bits, path)
    entry = formats.by_pillow_format(fmt)
    if reduction > 1:  # the source's size, after orientation
        width, height = (height, width) if swap else (width, height)
    else:
        width, height = pixels.shape[1], pixels.shape[0]
    meta = ImageMeta(str(path), entry.name if entry else fmt, mode, width, height, bits, size, channels, reduction)
    return pixels, meta


def _pil_to_grey(img: Image.Image, bits: int, path: Path) -> np.ndarray:
    """Scale by the type's full range, never by the image's own min/max, so that exposure
    differences between radiographs survive; the exceptions are the types without a meaningful
    full range: integers wider than 16 bits (a 32-bit TIFF holding 12-bit data would be black
    by 2**32 - 1) and floats outside [0, 1], both stretched to the image's own min..max.
    Alpha is dropped, not composited: exported radiographs carry an all-opaque alpha, and the
    stored grey values are the measurement. NaN/inf samples are refused (ImageReadError)."""
    mode = img.mode
    if mode == "1":
        return np.asarray(img, dtype=np.float32)
    if mode == "L":
        return np.asarray(img, dtype=np.float32) / 255.0
    if mode.startswith("I"):
        a = np.asarray(img).astype(np.float64)
        if bits > 16:  # 24/32-bit integers: scanners fill a few bits of them; use the actual range
            lo, hi = float(a.min()), float(a.max())
            return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        return a / float(2**bits - 1)
    if mode == "F":  # float has no intrinsic range: keep [0,1] data, stretch anything else
        a = np.asarray(img, dtype=np.float64)
        if not np.isfinite(a).all():
            raise ImageReadError(path, NON_FINITE)
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0.0 and hi <= 1.0:
            return a
        return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    # RGB, RGBA, P, PA, LA, CMYK, YCbCr, ...: via RGB to ITU-R 601 luma (Pillow's 'L');
    # R=G=B maps exactly to the grey value, so equal-channel RGB matches grey files.
    return np.asarray(img.convert("RGB").convert("L"), dtype=np.float32) / 255.0


def _block_mean(arr: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor`` x ``factor`` blocks of an (H, W[, C]) array, one block row at a time
    (no full-size temporary); integers are rounded back to their type."""
    h, w = arr.shape[:2]
    starts = np.arange(0, w, factor)
    widths = np.minimum(factor, w - starts).reshape((-1,) + (1,) * (arr.ndim - 2))
    out = np.empty((-(-h // factor), len(starts)) + arr.shape[2:], dtype=np.float64)
    for i, y in enumerate(range(0, h, factor)):
        block = arr[y : y + factor]
        out[i] = np.add.reduceat(block.sum(axis=0, dtype=np.float64), starts, axis=0) / (widths * len(block))
    if np.issubdtype(arr.dtype, np.integer):
        return np.rint(out).astype(arr.dtype)
    return out.astype(arr.dtype)


def _read_dicom(
    path: Path, size: int, max_pixels: int, max_side: int | None, force: bool
) -> tuple[np.ndarray, ImageMeta]:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every odd tag in real-world files
        ds = pydicom.dcmread(path, force=force)
        if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            if force:  # a forced read of a file without preamble: most likely not DICOM at all
                raise ImageReadError(path, "not a recognised image format (no DICOM preamble, no pixel data)")
            raise ImageReadError(path, "DICOM has no pixel data")
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        if rows <= 0 or cols <= 0:
            raise ImageReadError(path, "DICOM has no valid Rows/Columns")
        _bomb_check(path, cols, rows, max_pixels)
        if "TransferSyntaxUID" not in ds.file_meta:
            # no file meta: pydicom needs a syntax to decode; use the one the body was read with
            implicit, little = (
                getattr(ds, "original_encoding", None)  # pydicom 2.x lacks it
                or (ds.is_implicit_VR, ds.is_little_endian)
            )
            ds.file_meta.TransferSyntaxUID = (
                pydicom.uid.ImplicitVRLittleEndian
                if implicit
                else pydicom.uid.ExplicitVRLittleEndian
                if little
                else pydicom.uid.ExplicitVRBigEndian
            )
        arr = _dicom_first_frame(path, ds)
        factor = _factor(cols, rows, max_side)
        if factor > 1:  # before the LUTs, which work in float64 on every pixel
            if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "PALETTE COLOR":
                arr = np.ascontiguousarray(arr[::factor, ::factor])  # indices: pick, never average
            else:
                arr = _block_mean(arr, factor)
        pixels = _dicom_to_grey(ds, arr)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    meta = ImageMeta(
        str(path),
        "DICOM",
        photometric,
        cols,
        rows,
        int(ds.get("BitsStored", ds.get("BitsAllocated", 0)) or 0),
        size,
        int(ds.get("SamplesPerPixel", 1) or 1),
        factor,
        _dicom_text(ds, "PatientID"),
        _dicom_text(ds, "StudyInstanceUID"),
    )
    return pixels, meta


def _dicom_text(ds, keyword: str) -> str:
    """A DICOM string attribute, stripped; "" when absent or unreadable."""
    try:
        return str(ds.get(keyword, "") or "").strip()
    except Exception:  # a malformed value must not cost the image
        return ""


def _dicom_first_frame(path: Path, ds) -> np.ndarray:
    """Decode frame 0 only; a missing codec is a fixable setup problem, so say how to fix it."""
    ts = ds.file_meta.get("TransferSyntaxUID")
    try:
        if hasattr(ds, "pixel_array_options"):  # pydicom 3 decodes just the frame asked for
            ds.pixel_array_options(index=0)
            return ds.pixel_array
        arr = ds.pixel_array  # pragma: no cover - pydicom 2.x
        return arr[0] if int(ds.get("NumberOfFrames", 1) or 1) > 1 else arr
    except Exception as e:
        if ts is not None and ts.is_transfer_syntax and ts.is_compressed:
            raise ImageReadError(
                path,
                f"cannot decode compressed DICOM transfer syntax "
                f"'{ts.name}' ({ts}): install a decoder, e.g. `pip install "
                f"pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg` (JPEG, "
                f"JPEG 2000), `pip install pyjpegls` (JPEG-LS) or `pip "
                f"install python-gdcm` [{_short(e, 120)}]",
            ) from e
        raise


def _dicom_to_grey(ds, arr: np.ndarray) -> np.ndarray:
    try:  # pydicom >= 3
        from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
    except ImportError:  # pragma: no cover - pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_color_lut, apply_modality_lut, apply_voi_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3:  # colour (pydicom already converted YBR to RGB): ITU-R 601 luma
        top = 255.0 if arr.dtype == np.uint8 else float(2 ** int(ds.get("BitsStored", 16)) - 1)
        return (arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114])) / top
    arr = apply_modality_lut(arr, ds).astype(np.float64)
    if "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds):
        # The VOI output range depends on BitsStored, rescale and LUT descriptor; probing the
        # transform at -inf/+inf gives that range without re-deriving pydicom's rules.
        out = apply_voi_lut(arr, ds).astype(np.float64)
        lo, hi = sorted(float(v) for v in apply_voi_lut(np.array([-1e12, 1e12]), ds))
        out = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    else:  # no display transform stored: stretch to the image's own range
        lo, hi = float(arr.min()), float(arr.max())
        out = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if photometric == "MONOCHROME1":  # after windowing: the window is defined on stored values
        out = 1.0 - np.clip(out, 0.0, 1.0)
    return out
