"""Tests for kneeosteo.data.reader: every supported format decodes to the same canonical image,
and every kind of bad file becomes an ImageReadError naming the file."""

from __future__ import annotations

import asyncio
import io
import pickle
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import imagegen as g
from kneeosteo.data import formats
from kneeosteo.data.reader import (
    IMAGE_SUFFIXES,
    MAX_PIXELS,
    ImageMeta,
    ImageReadError,
    LoadedImage,
    NotAnImageError,
    is_candidate,
    read_image,
    to_uint8,
)

GREY = g.grey8() / 255.0  # the reference picture, HxW = 48x64


def check_canonical(img: LoadedImage, shape=(g.H, g.W)) -> None:
    px = img.pixels
    assert isinstance(px, np.ndarray) and px.dtype == np.float32 and px.shape == shape
    assert px.flags.c_contiguous
    assert float(px.min()) >= 0.0 and float(px.max()) <= 1.0
    assert (img.meta.height, img.meta.width) == shape


# (writer, file name, kwargs, format, mode, bit_depth, channels)
FORMATS = [
    (g.png_grey8, "a.png", {}, "PNG", "L", 8, 1),
    (g.png_grey16, "a.png", {}, "PNG", "I;16", 16, 1),
    (g.png_rgb, "a.png", {}, "PNG", "RGB", 8, 3),
    (g.png_rgba, "a.png", {}, "PNG", "RGBA", 8, 4),
    (g.png_palette, "a.png", {}, "PNG", "P", 8, 1),
    (g.jpeg_rgb, "a.jpg", {}, "JPEG", "RGB", 8, 3),
    (g.jpeg_grey, "a.jpeg", {}, "JPEG", "L", 8, 1),
    (g.jpeg_cmyk, "a.jpg", {}, "JPEG", "CMYK", 8, 4),
    (g.bmp, "a.bmp", {}, "BMP", "RGB", 8, 3),
    (g.bmp, "a.bmp", {"mode": "L"}, "BMP", "L", 8, 1),
    (g.tiff, "a.tif", {}, "TIFF", "L", 8, 1),
    (g.tiff, "a.tiff", {"bits": 16}, "TIFF", "I;16", 16, 1),
    (g.gif_animated, "a.png", {}, "GIF", "P", 8, 1),  # decoded by content, not by suffix
    (g.dicom, "a.dcm", {}, "DICOM", "MONOCHROME2", 16, 1),
    (g.dicom, "a.dcm", {"bits": 8}, "DICOM", "MONOCHROME2", 8, 1),
    (g.dicom, "a.dcm", {"photometric": "MONOCHROME1"}, "DICOM", "MONOCHROME1", 16, 1),
    (g.dicom, "a.dcm", {"rgb": True}, "DICOM", "RGB", 8, 3),
    (g.dicom, "a.dcm", {"frames": 3}, "DICOM", "MONOCHROME2", 16, 1),
    (g.dicom, "a.dcm", {"preamble": False}, "DICOM", "MONOCHROME2", 16, 1),
    (g.dicom, "IM0001", {}, "DICOM", "MONOCHROME2", 16, 1),  # no suffix: found by preamble
    (g.dicom_rle, "a.dicom", {}, "DICOM", "MONOCHROME2", 16, 1),
]


@pytest.mark.parametrize(
    "writer,name,kw,fmt,mode,bits,channels", FORMATS, ids=[f"{w.__name__}-{n}-{k}" for w, n, k, *_ in FORMATS]
)
def test_every_format_reads_to_canonical_image(tmp_path, writer, name, kw, fmt, mode, bits, channels):
    path = writer(tmp_path / name, **kw)
    img = read_image(path)
    check_canonical(img)
    m = img.meta
    assert (m.format, m.mode, m.bit_depth, m.channels) == (fmt, mode, bits, channels)
    assert m.path == str(path) and m.file_size == path.stat().st_size > 0


def test_lossless_grey_containers_give_exact_values_and_same_content_id(tmp_path):
    ref = read_image(g.png_grey8(tmp_path / "grey.png"))
    np.testing.assert_array_equal(ref.pixels, (g.grey8() / 255.0).astype(np.float32))
    same = [
        g.png_rgb(tmp_path / "rgb.png", equal_channels=True),
        g.png_rgba(tmp_path / "rgba.png", equal_channels=True),  # alpha ramp is dropped
        g.png_palette(tmp_path / "pal.png"),
        g.bmp(tmp_path / "grey.bmp", mode="L"),
        g.tiff(tmp_path / "grey.tif"),
        g.gif_animated(tmp_path / "anim.png"),  # first frame only
    ]
    for p in same:
        assert read_image(p).content_id == ref.content_id, p.name
    other = read_image(g.png_grey8(tmp_path / "other.png", variant=1))
    assert other.content_id != ref.content_id
    assert len(ref.content_id) == 64 and int(ref.content_id, 16) >= 0


def test_content_id_depends_on_shape(tmp_path):
    a = read_image(g.png_grey8(tmp_path / "a.png", array=np.zeros((4, 6), np.uint8)))
    b = read_image(g.png_grey8(tmp_path / "b.png", array=np.zeros((6, 4), np.uint8)))
    assert a.pixels.tobytes() == b.pixels.tobytes() and a.content_id != b.content_id


@pytest.mark.parametrize("writer,name", [(g.png_grey16, "a.png"), (g.tiff, "a.tif")])
def test_16_bit_uses_full_type_range_not_image_range(tmp_path, writer, name):
    a = np.array([[65535, 32768, 0, 1000]] * 2, dtype=np.uint16)
    kw = {"bits": 16} if writer is g.tiff else {}
    px = read_image(writer(tmp_path / name, array=a, **kw)).pixels
    assert px[0, 0] == 1.0
    assert px[0, 1] == pytest.approx(0.5, abs=1e-4)
    assert px[0, 2] == 0.0
    assert px[0, 3] == pytest.approx(1000 / 65535, abs=1e-6)
    # a dim 16-bit image stays dim: no per-image stretch
    dim = read_image(writer(tmp_path / ("dim" + name), array=a // 16, **kw)).pixels
    assert float(dim.max()) == pytest.approx(4095 / 65535, abs=1e-6)


def test_rgb_uses_itu601_luma(tmp_path):
    rgb = g.rgb8()
    px = read_image(g.png_rgb(tmp_path / "c.png")).pixels
    expected = rgb.astype(np.float64) @ [0.299, 0.587, 0.114] / 255.0
    assert np.abs(px - expected).max() <= 1 / 255 + 1e-6
    jpg = read_image(g.jpeg_rgb(tmp_path / "c.jpg")).pixels
    cmyk = read_image(g.jpeg_cmyk(tmp_path / "k.jpg")).pixels
    assert np.abs(jpg - expected).mean() < 0.01 and np.abs(cmyk - expected).mean() < 0.01


def test_exif_orientation_is_applied(tmp_path):
    img = read_image(g.jpeg_exif_rotated(tmp_path / "r.jpg"))
    check_canonical(img, shape=(g.W, g.H))  # swapped
    assert (img.meta.width, img.meta.height) == (g.H, g.W)
    clockwise = np.rot90(GREY, -1)
    assert np.abs(img.pixels - clockwise).mean() < 0.01
    assert np.abs(img.pixels - np.rot90(GREY, 1)).mean() > 0.1


def test_one_by_one(tmp_path):
    img = read_image(g.one_by_one(tmp_path / "1.png", value=51))
    check_canonical(img, shape=(1, 1))
    assert img.pixels[0, 0] == pytest.approx(0.2)
    img.phash()  # must not fail on tiny images


# ----------------------------------------------------------------------------- DICOM


def test_dicom_without_window_is_stretched_to_own_range(tmp_path):
    a = g.grey16()
    px = read_image(g.dicom(tmp_path / "a.dcm", array=a)).pixels
    expected = (a - a.min()) / float(a.max() - a.min())
    np.testing.assert_allclose(px, expected, atol=1e-6)


def test_dicom_monochrome1_is_inverted(tmp_path):
    m2 = read_image(g.dicom(tmp_path / "m2.dcm")).pixels
    m1 = read_image(g.dicom(tmp_path / "m1.dcm", photometric="MONOCHROME1")).pixels
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert not np.allclose(m1, m2)


def test_dicom_rescale_then_window(tmp_path):
    # stored s -> HU = 2*s - 1000; window [-1000, 1000]
    a = np.array([[0, 250, 500, 750, 1000, 4000]], dtype=np.uint16)
    kw = dict(array=a, rescale_slope=2, rescale_intercept=-1000, window_center=0, window_width=2000)
    px = read_image(g.dicom(tmp_path / "w.dcm", **kw)).pixels[0]
    np.testing.assert_allclose(px, [0.0, 0.25, 0.5, 0.75, 1.0, 1.0], atol=1e-3)
    inv = read_image(g.dicom(tmp_path / "w1.dcm", photometric="MONOCHROME1", **kw)).pixels[0]
    np.testing.assert_allclose(inv, 1.0 - px, atol=1e-6)  # inverted after windowing


def test_dicom_window_without_rescale(tmp_path):
    a = np.array([[100, 150, 200, 300]], dtype=np.uint16)
    px = read_image(g.dicom(tmp_path / "w.dcm", array=a, window_center=200, window_width=200)).pixels[0]
    np.testing.assert_allclose(px, [0.0, 0.25, 0.5, 1.0], atol=3e-3)


def test_dicom_multiframe_takes_first_frame_and_rle_decodes(tmp_path):
    single = read_image(g.dicom(tmp_path / "s.dcm"))
    multi = read_image(g.dicom(tmp_path / "m.dcm", frames=3))
    rle = read_image(g.dicom_rle(tmp_path / "r.dcm"))
    assert multi.content_id == single.content_id == rle.content_id


def test_dicom_8bit_rgb_matches_png(tmp_path):
    dcm = read_image(g.dicom(tmp_path / "c.dcm", rgb=True))
    png = read_image(g.png_rgb(tmp_path / "c.png"))
    assert np.abs(dcm.pixels - png.pixels).max() <= 1 / 255 + 1e-6


def test_compressed_dicom_without_decoder_names_syntax_and_fix(tmp_path):
    path = g.dicom_compressed_unsupported(tmp_path / "ls.dcm")
    with pytest.raises(ImageReadError) as ei:
        read_image(path)
    assert "JPEG-LS" in ei.value.reason and "pip install" in ei.value.reason
    assert str(path) in str(ei.value)


# ----------------------------------------------------------------------------- bad files

BAD = [
    (lambda p: g.dicom(p, pixel_data=False), "nopix.dcm", "DICOM has no pixel data"),
    (g.zero_byte, "empty.png", "empty file"),
    (g.zero_byte, "empty.dcm", "empty file"),
    (g.truncated_png, "trunc.png", "truncated"),
    (g.truncated_jpeg, "trunc.jpg", "truncated"),
    (g.text_as_png, "text.png", "not a recognised image format"),
    (g.text_as_png, "text.dcm", "not a recognised image format"),
    (g.bomb_png, "bomb.png", "decompression bomb"),
]


@pytest.mark.parametrize("writer,name,reason", BAD, ids=[n for _, n, _ in BAD])
def test_bad_files_raise_image_read_error(tmp_path, writer, name, reason):
    path = writer(tmp_path / name)
    with pytest.raises(ImageReadError) as ei:
        read_image(path)
    e = ei.value
    assert type(e) is ImageReadError  # not NotAnImageError: these look like images
    assert reason in e.reason
    assert e.path == str(path) and str(e) == f"{path}: {e.reason}"
    assert "Traceback" not in str(e)


def test_bomb_guard_uses_header_and_max_pixels(tmp_path):
    path = g.png_grey8(tmp_path / "a.png")
    with pytest.raises(ImageReadError, match="decompression bomb"):
        read_image(path, max_pixels=g.W * g.H - 1)
    assert read_image(path, max_pixels=g.W * g.H).pixels.shape == (g.H, g.W)
    dcm = g.dicom(tmp_path / "a.dcm")
    with pytest.raises(ImageReadError, match="decompression bomb"):
        read_image(dcm, max_pixels=100)
    assert MAX_PIXELS == 100_000_000


def test_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "README.txt"
    path.write_text("hello")
    with pytest.raises(NotAnImageError) as ei:
        read_image(path)
    assert isinstance(ei.value, ImageReadError) and str(path) in str(ei.value)
    png_named_csv = g.png_grey8(tmp_path / "labels.csv")
    with pytest.raises(NotAnImageError):
        read_image(png_named_csv)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageReadError, match="cannot read file"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_image(tmp_path / "dir.png")


def test_error_is_picklable():
    e = pickle.loads(pickle.dumps(ImageReadError("/x/a.png", "empty file")))
    assert (e.path, e.reason, str(e)) == ("/x/a.png", "empty file", "/x/a.png: empty file")
    n = pickle.loads(pickle.dumps(NotAnImageError("/x/a.txt", "nope")))
    assert type(n) is NotAnImageError


# ----------------------------------------------------------------------------- helpers


def test_is_candidate(tmp_path):
    assert {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".dcm", ".dicom"} <= IMAGE_SUFFIXES
    assert is_candidate(tmp_path / "x.gif")  # docs/own-data.md says GIF is readable: the CLI must try it
    assert is_candidate(tmp_path / "x.PNG") and is_candidate(tmp_path / "x.dicom")
    assert not is_candidate(tmp_path / "x.txt")
    assert is_candidate(g.dicom(tmp_path / "IM0001"))
    assert is_candidate(g.dicom(tmp_path / "1.2.840.113619.42"))  # numeric "suffix"
    (tmp_path / "NOTES").write_text("x" * 200)
    assert not is_candidate(tmp_path / "NOTES")
    (tmp_path / "sub").mkdir()
    assert not is_candidate(tmp_path / "sub")


def test_bomb_limit_is_max_pixels_not_pillows_global(tmp_path, monkeypatch):
    path = g.png_grey8(tmp_path / "a.png")  # 3072 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # Pillow would only warn (error above 4000)
    assert read_image(path).pixels.shape == (g.H, g.W)
    with pytest.raises(ImageReadError, match="3072 pixels exceeds the limit of 3071"):
        read_image(path, max_pixels=g.W * g.H - 1)


def test_to_uint8_round_trips_8bit():
    a = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(to_uint8(a.astype(np.float32) / 255.0), a)
    np.testing.assert_array_equal(to_uint8(np.array([-0.5, 0.0, 1.0, 2.0])), [0, 0, 255, 255])


def test_phash_near_duplicate_close_different_far(tmp_path):
    base = read_image(g.png_grey8(tmp_path / "a.png"))
    near = read_image(g.png_grey8(tmp_path / "n.png", array=g.add_noise(g.grey8(), 2)))
    far = read_image(g.png_grey8(tmp_path / "f.png", variant=3))
    assert base.content_id != near.content_id
    assert base.phash() - near.phash() <= 4
    assert base.phash() - far.phash() > 12


def test_meta_and_image_are_frozen(tmp_path):
    img = read_image(g.png_grey8(tmp_path / "a.png"))
    assert isinstance(img.meta, ImageMeta)
    with pytest.raises(AttributeError):
        img.meta.width = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        img.pixels = None  # type: ignore[misc]


def test_make_dataset(tmp_path):
    ds = g.make_dataset(tmp_path, n_per_class=6, exact_duplicates=2, conflict_duplicates=1, near_duplicates=2, seed=3)
    assert len(ds.items) == 6 * 2 + 2 + 1 + 2
    assert len(ds.paths("normal")) == 6 + 2 + 2 and len(ds.paths("osteoporosis")) == 6 + 1
    ids = {p: read_image(p).content_id for p, _ in ds.items}
    for a, b in ds.exact_duplicates + ds.conflicts:
        assert ids[a] == ids[b] and a != b
    assert all(a.parent.name != b.parent.name for a, b in ds.conflicts)
    for a, b in ds.near_duplicates:
        assert ids[a] != ids[b]
        assert read_image(a).phash() - read_image(b).phash() <= 4
    originals = [p for p, _ in ds.items if p.stem.startswith(("normal_", "osteoporosis_"))]
    assert len({ids[p] for p in originals}) == len(originals) == 12
    again = g.make_dataset(
        tmp_path / "again", n_per_class=6, exact_duplicates=2, conflict_duplicates=1, near_duplicates=2, seed=3
    )
    assert [p.read_bytes() for p, _ in again.items] == [p.read_bytes() for p, _ in ds.items]

    # the class signal: osteoporosis images carry more high-frequency energy
    def hf(p):
        x = read_image(p).pixels
        return float(np.abs(np.diff(x, axis=1)).mean())

    assert min(hf(p) for p in ds.paths("osteoporosis")[:6]) > max(hf(p) for p in ds.paths("normal")[:6])


# ----------------------------------------------------------------------------- fuzz

_PREFIXES = [
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff\xe0",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"GIF89a",
    bytes(128) + b"DICM",
    bytes(128) + b"DICM\x02\x00\x10\x00UI",
]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=st.sampled_from(_PREFIXES), body=st.binary(max_size=2048), suffix=st.sampled_from([".png", ".dcm"]))
def test_random_bytes_only_ever_raise_image_read_error(tmp_path, prefix, body, suffix):
    path = tmp_path / f"x{suffix}"
    path.write_bytes(prefix + body)
    try:
        img = read_image(path)
    except ImageReadError:
        return
    px = img.pixels  # if random bytes happen to decode, the result must still be canonical
    assert px.dtype == np.float32 and px.ndim == 2 and 0.0 <= px.min() <= px.max() <= 1.0


# ----------------------------------------------------------------------------- the formats table
# Every entry of data/formats.py, written by its own encoder, must be read by the reader, tried by
# the command line (is_candidate), typed by the web upload check, and offered by the web page.

TABLE = [(f, s) for f in formats.FORMATS for s in f.suffixes]
LOSSLESS = {"PNG", "BMP", "TIFF", "GIF"}


def write_format(fmt: formats.InputFormat, path):
    if fmt.decoder == "dicom":
        return g.dicom(path)
    Image.fromarray(g.grey8()).save(path, format=fmt.pillow[0])
    return path


@pytest.mark.parametrize("fmt,suffix", TABLE, ids=[f"{f.name}{s}" for f, s in TABLE])
def test_every_format_in_the_table_is_read_tried_and_uploaded(tmp_path, fmt, suffix):
    from starlette.datastructures import UploadFile

    from kneeosteo.interfaces.web import uploads

    path = write_format(fmt, tmp_path / f"a{suffix}")
    img = read_image(path)
    check_canonical(img)
    assert img.meta.format == fmt.name
    if fmt.name in LOSSLESS:
        np.testing.assert_array_equal(img.pixels, GREY.astype(np.float32))
    assert is_candidate(path) and is_candidate(tmp_path / f"other{suffix.upper()}")
    # the web upload check types the file by its content, whatever the client calls it
    data = path.read_bytes()
    assert formats.sniff(data[:132]) is fmt
    saved = asyncio.run(uploads.save_upload(UploadFile(io.BytesIO(data), filename="upload"), tmp_path, 10**7))
    assert saved.suffix in fmt.suffixes
    assert uploads.decode(saved, "upload", MAX_PIXELS).content_id == img.content_id


def test_gif_is_read_first_frame_under_its_own_suffix(tmp_path):
    img = read_image(g.gif_animated(tmp_path / "a.gif"))
    assert img.meta.format == "GIF"
    np.testing.assert_array_equal(img.pixels, GREY.astype(np.float32))  # frame 0, not a later one


def test_help_text_and_web_page_list_exactly_the_table():
    from kneeosteo.interfaces.web.app import WebSettings, _page
    from kneeosteo.interfaces.web.uploads import ACCEPTED

    assert formats.describe() == ", ".join(f.name for f in formats.FORMATS)
    assert formats.describe("or") == ACCEPTED and ACCEPTED.endswith(f" or {formats.FORMATS[-1].name}")
    assert {"PNG", "JPEG", "GIF", "DICOM"} <= set(formats.describe().split(", "))
    page = _page("Research use only.", WebSettings())
    accept = re.search(r'<input type="file" id="file" accept="([^"]*)"', page).group(1).split(",")
    assert sorted(accept) == sorted({s for f in formats.FORMATS for s in f.suffixes + f.mime_types})
    assert ACCEPTED in page and not re.search(r"__[A-Z_]+__", page)  # every placeholder filled


def test_formats_table_is_consistent():
    names = [f.name for f in formats.FORMATS]
    suffixes = [s for f in formats.FORMATS for s in f.suffixes]
    assert len(set(names)) == len(names) and len(set(suffixes)) == len(suffixes)
    assert all(f.mime_types and f.suffixes for f in formats.FORMATS)
    with pytest.raises(ValueError, match="Pillow"):
        formats.InputFormat("X", (".x",), ("image/x",), "pillow", lambda head: False)
    assert formats.sniff(b"%PDF-1.7" + bytes(200)) is None and formats.sniff(b"BMI table\n" * 30) is None
