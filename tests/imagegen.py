"""Small generated test images, good and bad, written to a given path.

Every writer takes the destination ``path`` and returns it as a :class:`Path`.  Pictures are a
gradient plus a bright disc whose position depends on ``variant``, so different variants are
different pictures (different content ids and perceptual hashes).  Writers that take ``array``
write exactly those values instead, for tests that check specific pixels.
Everything is deterministic.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

W, H = 64, 48  # default size: deliberately not square, so transposition bugs show


# --------------------------------------------------------------------------- pictures


def picture(width: int = W, height: int = H, variant: int = 0) -> np.ndarray:
    """Float64 HxW in [0, 1]: diagonal gradient (exactly 0 at top-left, 1 at bottom-right
    before the disc) plus a bright disc placed by ``variant``."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    img = 0.6 * (x / max(width - 1, 1) + y / max(height - 1, 1)) / 2.0
    rng = np.random.default_rng(1000 + variant)
    cx, cy = rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height
    r = rng.uniform(0.12, 0.22) * min(width, height)
    img[(x - cx) ** 2 + (y - cy) ** 2 <= r * r] = 0.95
    if variant % 2:  # mirror every other variant so low frequencies differ, not just the disc
        img = img[:, ::-1]
    return np.ascontiguousarray(img)


def grey8(width: int = W, height: int = H, variant: int = 0) -> np.ndarray:
    return np.rint(picture(width, height, variant) * 255).astype(np.uint8)


def grey16(width: int = W, height: int = H, variant: int = 0) -> np.ndarray:
    return np.rint(picture(width, height, variant) * 65535).astype(np.uint16)


def rgb8(width: int = W, height: int = H, variant: int = 0, equal_channels: bool = False) -> np.ndarray:
    g = grey8(width, height, variant)
    if equal_channels:
        return np.stack([g, g, g], axis=-1)
    return np.stack([g, (g.astype(np.int32) * 3 // 4).astype(np.uint8), 255 - g], axis=-1)


def add_noise(arr: np.ndarray, amplitude: int = 2, seed: int = 0) -> np.ndarray:
    """Tiny integer noise (near-duplicate), saturating at the dtype limits."""
    info = np.iinfo(arr.dtype)
    rng = np.random.default_rng(seed)
    noisy = arr.astype(np.int64) + rng.integers(-amplitude, amplitude + 1, size=arr.shape)
    return np.clip(noisy, info.min, info.max).astype(arr.dtype)


def _save(img: Image.Image, path, fmt: str, **kw) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)
    return path


# --------------------------------------------------------------------------- raster writers


def png_grey8(path, variant: int = 0, array: np.ndarray | None = None, size=(W, H)) -> Path:
    a = grey8(*size, variant) if array is None else np.asarray(array, dtype=np.uint8)
    return _save(Image.fromarray(a), path, "PNG")


def png_grey16(path, variant: int = 0, array: np.ndarray | None = None, size=(W, H)) -> Path:
    a = grey16(*size, variant) if array is None else np.asarray(array, dtype=np.uint16)
    return _save(Image.fromarray(a), path, "PNG")  # mode I;16


def png_rgb(path, variant: int = 0, equal_channels: bool = False, array: np.ndarray | None = None, size=(W, H)) -> Path:
    a = rgb8(*size, variant, equal_channels) if array is None else np.asarray(array, dtype=np.uint8)
    return _save(Image.fromarray(a), path, "PNG")


def png_rgba(path, variant: int = 0, equal_channels: bool = True, alpha: int | None = None, size=(W, H)) -> Path:
    """Alpha is a horizontal ramp unless a constant ``alpha`` is given."""
    rgb = rgb8(*size, variant, equal_channels)
    w, h = size
    a = (
        np.full((h, w), alpha, np.uint8)
        if alpha is not None
        else np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))
    )
    return _save(Image.fromarray(np.dstack([rgb, a])), path, "PNG")


def png_palette(path, variant: int = 0, size=(W, H)) -> Path:
    """Mode 'P' with a grey-ramp palette: index i is grey level i, so it reads like png_grey8."""
    img = Image.new("P", size)
    img.frombytes(grey8(*size, variant).tobytes())
    img.putpalette(bytes(v for i in range(256) for v in (i, i, i)))
    return _save(img, path, "PNG")


def jpeg_rgb(path, variant: int = 0, quality: int = 95, size=(W, H)) -> Path:
    return _save(Image.fromarray(rgb8(*size, variant)), path, "JPEG", quality=quality)


def jpeg_grey(path, variant: int = 0, quality: int = 95, size=(W, H)) -> Path:
    return _save(Image.fromarray(grey8(*size, variant)), path, "JPEG", quality=quality)


def jpeg_cmyk(path, variant: int = 0, size=(W, H)) -> Path:
    img = Image.fromarray(rgb8(*size, variant)).convert("CMYK")
    return _save(img, path, "JPEG", quality=95)


def jpeg_exif_rotated(path, variant: int = 0, orientation: int = 6, size=(W, H)) -> Path:
    """Stored WxH, EXIF says rotate (6 = 90 degrees clockwise), so it displays HxW."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(Image.fromarray(grey8(*size, variant)), path, "JPEG", quality=95, exif=exif)


def bmp(path, variant: int = 0, mode: str = "RGB", size=(W, H)) -> Path:
    a = rgb8(*size, variant) if mode == "RGB" else grey8(*size, variant)
    return _save(Image.fromarray(a), path, "BMP")


def tiff(path, variant: int = 0, bits: int = 8, array: np.ndarray | None = None, size=(W, H)) -> Path:
    if array is not None:
        a = np.asarray(array, dtype=np.uint16 if bits == 16 else np.uint8)
    else:
        a = grey16(*size, variant) if bits == 16 else grey8(*size, variant)
    return _save(Image.fromarray(a), path, "TIFF")


def tiff_float(path, array: np.ndarray | None = None, variant: int = 0, size=(W, H)) -> Path:
    """32-bit float TIFF (mode F) holding exactly ``array`` (NaN and inf included)."""
    a = picture(*size, variant) if array is None else array
    return _save(Image.fromarray(np.asarray(a, dtype=np.float32)), path, "TIFF")


def tiff_int32(path, array: np.ndarray | None = None, variant: int = 0, size=(W, H)) -> Path:
    """32-bit signed integer TIFF (mode I, BitsPerSample 32); by default 12-bit data in it, as
    some scanners write."""
    a = np.rint(picture(*size, variant) * 4095) if array is None else array
    return _save(Image.fromarray(np.asarray(a, dtype=np.int32)), path, "TIFF")


def gif_animated(path, variant: int = 0, frames: int = 3, size=(W, H)) -> Path:
    """Frame 0 is ``variant``; later frames are other pictures, which the reader must ignore."""
    imgs = [Image.fromarray(grey8(*size, variant + 7 * i)) for i in range(frames)]
    return _save(imgs[0], path, "GIF", save_all=True, append_images=imgs[1:], duration=100, loop=0)


def one_by_one(path, value: int = 128) -> Path:
    return png_grey8(path, array=np.full((1, 1), value, np.uint8))


# --------------------------------------------------------------------------- DICOM


def dicom(
    path,
    photometric: str = "MONOCHROME2",
    bits: int = 16,
    rescale_slope: float | None = None,
    rescale_intercept: float | None = None,
    window_center: float | None = None,
    window_width: float | None = None,
    pixel_data: bool = True,
    rgb: bool = False,
    array: np.ndarray | None = None,
    frames: int = 1,
    variant: int = 0,
    size=(W, H),
    bits_stored: int | None = None,
    preamble: bool = True,
    patient_id: str = "TEST",
    study_uid: str | None = None,
) -> Path:
    """A minimal valid DX-like DICOM (Explicit VR Little Endian).  ``preamble=False`` writes a
    bare dataset without the 128-byte preamble, 'DICM' and file meta, as old archives do."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    w, h = size
    if rgb:
        a = rgb8(w, h, variant) if array is None else np.asarray(array, dtype=np.uint8)
        photometric, bits = "RGB", 8
    elif array is not None:
        a = np.asarray(array, dtype=np.uint16 if bits == 16 else np.uint8)
    else:
        a = grey16(w, h, variant) if bits == 16 else grey8(w, h, variant)
    if frames > 1:
        a = np.stack([a] + [np.flip(a, axis=0)] * (frames - 1))

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    if patient_id:
        ds.PatientID = patient_id
    if study_uid:
        ds.StudyInstanceUID = study_uid
    ds.Rows, ds.Columns = a.shape[-3:-1] if rgb else a.shape[-2:]
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = photometric
    if rgb:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = bits
    ds.BitsStored = bits_stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if rescale_slope is not None or rescale_intercept is not None:
        ds.RescaleSlope = rescale_slope if rescale_slope is not None else 1
        ds.RescaleIntercept = rescale_intercept if rescale_intercept is not None else 0
        ds.RescaleType = "US"
    if window_center is not None:
        ds.WindowCenter = window_center
        ds.WindowWidth = window_width
    if pixel_data:
        ds.PixelData = np.ascontiguousarray(a).astype("<u2" if bits == 16 else "u1").tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:
        del ds.file_meta
        ds.save_as(path, implicit_vr=False, little_endian=True)
    return path


def dicom_compressed_unsupported(path, size=(W, H)) -> Path:
    """JPEG-LS Lossless transfer syntax with junk fragments: no decoder for it is installed."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    p = dicom(path, bits=8, size=size)
    ds = pydicom.dcmread(p)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(60) + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(p, enforce_file_format=True)
    return p


def dicom_rle(path, variant: int = 0, size=(W, H)) -> Path:
    """RLE Lossless: compressed, but decodable by pydicom's own numpy decoder."""
    import pydicom
    from pydicom.uid import RLELossless

    p = dicom(path, bits=16, variant=variant, size=size)
    ds = pydicom.dcmread(p)
    ds.compress(RLELossless)
    ds.save_as(p, enforce_file_format=True)
    return p


# --------------------------------------------------------------------------- bad files


def zero_byte(path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _noisy_bytes(fmt: str, **kw) -> bytes:
    # noise does not compress, so the cut lands well inside the compressed pixel data
    a = np.random.default_rng(7).integers(0, 256, size=(128, 128), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt, **kw)
    return buf.getvalue()


def truncated_png(path) -> Path:
    data = _noisy_bytes("PNG")
    Path(path).write_bytes(data[: len(data) // 2])
    return Path(path)


def truncated_jpeg(path) -> Path:
    data = _noisy_bytes("JPEG", quality=95)
    Path(path).write_bytes(data[: len(data) // 2])
    return Path(path)


def text_as_png(path) -> Path:
    Path(path).write_text("patient list\nid,label\n1,normal\n" * 4)
    return Path(path)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path, width: int = 60000, height: int = 60000) -> Path:
    """A well-formed PNG header claiming a huge size, with only a token IDAT: a reader that
    checks the header first rejects it without allocating anything."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + _png_chunk(b"IEND", b"")
    )
    Path(path).write_bytes(data)
    return Path(path)


def huge_png(path, width: int = 9999, height: int = 9999) -> Path:
    """A valid 8-bit greyscale PNG with huge pixels in a small file ("small file, huge pixels"):
    a horizontal gradient, each row the same; written row by row, never held in memory."""
    row = b"\x00" + (np.arange(width) * 255 // max(width - 1, 1)).astype(np.uint8).tobytes()
    z = zlib.compressobj(9)
    chunks = [z.compress(row * min(256, height - y)) for y in range(0, height, 256)] + [z.flush()]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(chunks))
        + _png_chunk(b"IEND", b"")
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data)
    return Path(path)


# --------------------------------------------------------------------------- class-folder data set


@dataclass
class GeneratedDataset:
    root: Path
    items: list[tuple[Path, str]] = field(default_factory=list)  # every file, with its label
    exact_duplicates: list[tuple[Path, Path]] = field(default_factory=list)  # (original, copy)
    conflicts: list[tuple[Path, Path]] = field(default_factory=list)  # exact copy in the other class
    near_duplicates: list[tuple[Path, Path]] = field(default_factory=list)  # (original, noisy copy)

    def paths(self, label: str | None = None) -> list[Path]:
        return [p for p, lab in self.items if label is None or lab == label]


def dataset_image(
    index: int, label: str, size: int = 64, seed: int = 0, learnable: bool = True, classes=("normal", "osteoporosis")
) -> np.ndarray:
    """A distinct uint8 "radiograph" per (seed, index): smooth random blobs; with
    ``learnable`` the second class gets strong high-frequency texture (thin trabeculae)."""
    rng = np.random.default_rng([seed, index, classes.index(label)])
    y, x = np.mgrid[0:size, 0:size] / size
    img = 0.2 + 0.2 * x if index % 2 else 0.2 + 0.2 * y
    for _ in range(4):
        cx, cy, s, amp = rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85), rng.uniform(0.06, 0.2), rng.uniform(0.2, 0.5)
        img = img + amp * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))
    noise = 0.12 if learnable and label == classes[1] else 0.02
    img = img + rng.normal(0.0, noise, size=img.shape)
    return np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_dataset(
    root,
    n_per_class: int = 8,
    size: int = 64,
    seed: int = 0,
    classes=("normal", "osteoporosis"),
    exact_duplicates: int = 0,
    conflict_duplicates: int = 0,
    near_duplicates: int = 0,
    learnable: bool = True,
) -> GeneratedDataset:
    """Write ``root/<class>/<class>_NNN.png``.  Duplicates copy the first images of the first
    class: ``exact_duplicates`` into the same class (``dup_`` prefix), ``conflict_duplicates``
    into the other class (``conflict_`` prefix, a label conflict), ``near_duplicates`` into the
    same class with +-2 grey-level noise (``near_`` prefix)."""
    root = Path(root)
    out = GeneratedDataset(root)
    originals: dict[str, list[tuple[Path, np.ndarray]]] = {c: [] for c in classes}
    for label in classes:
        for i in range(n_per_class):
            a = dataset_image(i, label, size, seed, learnable, tuple(classes))
            p = png_grey8(root / label / f"{label}_{i:03d}.png", array=a)
            out.items.append((p, label))
            originals[label].append((p, a))
    src_label, other = classes[0], classes[1]
    src = originals[src_label]
    for k in range(exact_duplicates):
        p0, a = src[k % len(src)]
        p = png_grey8(root / src_label / f"dup_{k:03d}.png", array=a)
        out.items.append((p, src_label))
        out.exact_duplicates.append((p0, p))
    for k in range(conflict_duplicates):
        p0, a = src[(k + exact_duplicates) % len(src)]
        p = png_grey8(root / other / f"conflict_{k:03d}.png", array=a)
        out.items.append((p, other))
        out.conflicts.append((p0, p))
    for k in range(near_duplicates):
        p0, a = src[(k + exact_duplicates + conflict_duplicates) % len(src)]
        p = png_grey8(root / src_label / f"near_{k:03d}.png", array=add_noise(a, 2, seed=seed * 1000 + k))
        out.items.append((p, src_label))
        out.near_duplicates.append((p0, p))
    return out


def t_score_image(t_score: float, index: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """A "radiograph" whose texture tracks a T-score: smooth blobs plus noise of amplitude
    0.02 + 0.035 * max(0, -T), so lower T (less bone) looks coarser and a model can learn it."""
    rng = np.random.default_rng([seed, index, 7])
    y, x = np.mgrid[0:size, 0:size] / size
    img = 0.25 + 0.2 * (x if index % 2 else y)
    for _ in range(4):
        cx, cy, s, amp = rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85), rng.uniform(0.06, 0.2), rng.uniform(0.2, 0.4)
        img = img + amp * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))
    img = img + rng.normal(0.0, 0.02 + 0.035 * max(0.0, -t_score), size=img.shape)
    return np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_patient_dataset(root, patients: int = 18, size: int = 64, seed: int = 0, dicom_every: int = 4):
    """A hospital-style export: ``root/films/pNNN_{left,right}.{png,dcm}`` (two knees per
    patient; every ``dicom_every``-th patient as DICOM carrying its PatientID), and
    ``root/labels.csv`` with path, label (the WHO band), patient_id, t_score, bmd, side,
    study_date and an extra ``site`` column. T-scores are spread over the three bands; a
    patient's knees differ by 0.3. Returns (data root, manifest path, rows as dicts)."""
    import csv

    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(patients):
        base = [-0.2, -1.8, -3.2][k % 3] + rng.uniform(-0.5, 0.5)
        for j, side in enumerate(("left", "right")):
            t = round(base + 0.3 * j, 2)
            a = t_score_image(t, 2 * k + j, size, seed)
            name = f"films/p{k:03d}_{side}"
            if dicom_every and k % dicom_every == dicom_every - 1:
                dicom(root / f"{name}.dcm", bits=8, array=a, patient_id=f"PAT{k:03d}")
                path = f"{name}.dcm"
            else:
                path = png_grey8(root / f"{name}.png", array=a).relative_to(root).as_posix()
            label = "normal" if t >= -1.0 else ("osteopenia" if t > -2.5 else "osteoporosis")
            rows.append(
                {
                    "path": path,
                    "label": label,
                    "patient_id": f"P{k:03d}",
                    "t_score": t,
                    "bmd": round(1.0 + 0.12 * t, 3),
                    "side": side,
                    "study_date": "2024-03-01",
                    "site": "A" if k % 2 else "B",
                }
            )
    manifest = root / "labels.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root, manifest, rows


def non_knee_corpus(folder: Path) -> list[Path]:
    """Noise, blank and uniform images, documents, photo-like scenes, screenshots-like UI and
    pydicom's own CT and MR samples: nothing a knee model has seen."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    out = []

    def save(name, arr):
        p = folder / name
        Image.fromarray(arr).save(p)
        out.append(p)

    save("noise_uniform.png", (rng.random((320, 256)) * 255).astype(np.uint8))
    save("noise_gaussian.png", np.clip(rng.normal(128, 40, (300, 300)), 0, 255).astype(np.uint8))
    save("black.png", np.zeros((256, 256), np.uint8))
    save("white.png", np.full((256, 256), 255, np.uint8))
    save("grey.png", np.full((200, 300), 117, np.uint8))
    for k in range(2):  # a document: black lines of "text" on white
        page = Image.new("L", (400, 520), 250)
        d = ImageDraw.Draw(page)
        for line in range(30):
            y = 30 + line * 16
            x = 30
            while x < 360:
                w = int(rng.integers(10, 40))
                d.rectangle([x, y, x + w, y + 8], fill=int(rng.integers(0, 60)))
                x += w + 6
        out.append(folder / f"document_{k}.png")
        page.save(out[-1])
    for k in range(3):  # a photo-like scene: smooth colour fields and shapes
        yy, xx = np.mgrid[0:240, 0:320] / 240.0
        a, b = rng.random(2) * 6
        rgb = np.stack([np.sin(a * xx + k) * 0.5 + 0.5, np.cos(b * yy) * 0.5 + 0.5, xx * yy], axis=2)
        img = Image.fromarray((rgb * 255).astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, 280)), int(rng.integers(0, 200))
            d.ellipse([x0, y0, x0 + 40, y0 + 40], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        out.append(folder / f"photo_{k}.png")
        img.save(out[-1])
    ui = Image.new("RGB", (480, 300), (240, 240, 240))  # a screenshot: bars, buttons, text blocks
    d = ImageDraw.Draw(ui)
    d.rectangle([0, 0, 480, 30], fill=(40, 80, 160))
    for i in range(5):
        d.rectangle([20, 50 + 45 * i, 200, 80 + 45 * i], fill=(200, 200, 210), outline=(90, 90, 90))
        d.rectangle([240, 55 + 45 * i, 460, 60 + 45 * i], fill=(30, 30, 30))
    out.append(folder / "screenshot.png")
    ui.save(out[-1])
    import pydicom.data

    samples = Path(pydicom.data.__file__).parent / "test_files"
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm"):
        if (samples / name).is_file():
            out.append(samples / name)
    return out


# --------------------------------------------------------------------------- knee films (issue 32)


def knee_film(
    width: int = 240,
    height: int = 480,
    joint: tuple[float, float] = (120, 200),
    plateau: float = 90,
    texture: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """Float64 HxW in [0, 1]: a schematic frontal knee with a known joint centre ``joint`` (x, y)
    and tibial plateau width ``plateau`` (px): dark film, a rounded soft-tissue leg 1.9 plateaus wide,
    the femur (shaft flaring into condyles 0.96 plateau wide), a dark joint space 0.06 plateau
    high, the tibia (plateau, tapering to its shaft) and the fibula, slightly blurred;
    ``texture`` adds that much grain inside the bone (a "trabecular" class cue)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    jx, jy, p = float(joint[0]), float(joint[1]), float(plateau)
    gap = 0.06 * p
    dx = np.abs(x - jx) / p
    up = (jy - gap / 2 - y) / p  # above the joint space, in plateau widths
    down = (y - jy - gap / 2) / p  # below it
    femur_half = np.where(up <= 0.35, 0.48, np.clip(0.48 - (up - 0.35) * 0.47, 0.22, 0.48))
    femur = (up >= 0) & (dx <= femur_half)
    femur &= ~((up < 0.08) & (dx > 0.48 - 0.08 + up))  # rounded condyles
    tibia_half = np.where(down <= 0.2, 0.5, np.clip(0.5 - (down - 0.2) * 0.47, 0.22, 0.5))
    tibia = (down >= 0) & (dx <= tibia_half)
    fibula = (down >= 0.22) & (np.abs(x - (jx + 0.4 * p)) <= 0.06 * p)
    bone = femur | tibia | fibula
    img = np.full((height, width), 0.04)
    img += 0.41 * np.sqrt(np.clip(1 - (dx / 0.95) ** 2, 0, 1))  # soft tissue: brightness follows thickness
    img[bone] = 0.8
    if texture:
        img[bone] += rng.normal(0.0, texture, size=int(bone.sum()))
    img = (
        np.asarray(
            Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.0)),
            dtype=np.float64,
        )
        / 255
    )
    img += rng.normal(0.0, 0.005, size=img.shape)
    return np.clip(img, 0.0, 1.0)


def two_knee_film(left: np.ndarray, right: np.ndarray, gap: int = 0) -> np.ndarray:
    """``left`` and ``right`` (same height) side by side, ``right`` mirrored, ``gap`` black columns between."""
    return np.hstack([left, np.zeros((left.shape[0], gap)), right[:, ::-1]])


def make_knee_dataset(root, n_per_class: int = 8, conflict_duplicates: int = 0, seed: int = 0) -> GeneratedDataset:
    """Like :func:`make_dataset`, with schematic knee films (:func:`knee_film`, 120x240, joint and
    plateau width varied per film; the second class with bone grain) for a knee-region run, whose
    localiser finds no knee in :func:`dataset_image`'s blobs."""
    root = Path(root)
    out = GeneratedDataset(root)
    first: list[tuple[Path, np.ndarray]] = []
    for c, label in enumerate(("normal", "osteoporosis")):
        for i in range(n_per_class):
            rng = np.random.default_rng([seed, c, i])
            plateau = float(rng.uniform(40, 50))
            joint = (float(rng.uniform(56, 64)), float(rng.uniform(95, 115)))
            film = knee_film(120, 240, joint, plateau, texture=0.06 * c, seed=int(rng.integers(1 << 30)))
            a = np.rint(film * 255).astype(np.uint8)
            p = png_grey8(root / label / f"{label}_{i:03d}.png", array=a)
            out.items.append((p, label))
            if c == 0:
                first.append((p, a))
    for k in range(conflict_duplicates):
        p0, a = first[k % len(first)]
        p = png_grey8(root / "osteoporosis" / f"conflict_{k:03d}.png", array=a)
        out.items.append((p, "osteoporosis"))
        out.conflicts.append((p0, p))
    return out
