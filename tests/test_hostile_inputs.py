"""Hostile inputs (issue 14): files and folders a careless or hostile user can put in front of
kneeosteo, each pinned by a test that failed before its fix. The rule: no input produces a
traceback, a hang, a non-finite probability or a silent omission.

Kinds exercised here (docs/reliability.md lists them with the outcomes):
FIFO in a data folder or named on the command line, non-UTF-8 file names in `explain`, one
image failing inside an `explain` batch, NaN/inf float TIFFs, 32-bit integer TIFFs, small files
with huge pixels (PNG, JPEG, 16-bit PNG, palette, DICOM), unreadable sub-folders, a
decompression bomb beyond Pillow's own limit, control and bidi characters in file names, an
empty input folder and an output path through a file.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import imagegen as g
from kneeosteo.data.scan import scan_dataset
from kneeosteo.interfaces.cli import main


def _main(argv) -> int:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    return exc.value.code


def _unblock(fifo: Path) -> bool:
    """Open ``fifo`` for writing and close it: a reader stuck in open() gets end-of-file. Whether
    a reader was there (a writer's non-blocking open succeeds only then)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader waiting (ENXIO): nothing to unblock
        return False
    return True


def run_guarded(fn, fifos: list[Path], timeout: float = 600.0):
    """Run ``fn()`` in a thread and fail, instead of hanging the suite, as soon as it opens one of
    ``fifos`` for reading: a reader waiting on a FIFO is the hang itself, seen directly, so no time
    bound decides it and a loaded machine cannot fake it. The FIFO is unblocked so the thread can
    end. ``timeout`` only stops a test that hangs some other way."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    opened: set[str] = set()
    end = time.monotonic() + timeout
    while t.is_alive() and time.monotonic() < end:
        opened |= {f.name for f in fifos if _unblock(f)}
        t.join(0.05)
    hung = t.is_alive()
    deadline = time.monotonic() + 30
    while t.is_alive() and time.monotonic() < deadline:
        for f in fifos:
            _unblock(f)
        t.join(0.2)
    assert not opened, f"opened a FIFO for reading (a hang without this test's writer): {sorted(opened)}"
    assert not hung, f"still running after {timeout:.0f} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


# --------------------------------------------------------------------------- item 3: FIFOs


@pytest.fixture
def fifo_data(tmp_path):
    data = g.make_dataset(tmp_path / "data", n_per_class=4, size=32).root
    fifos = [data / "normal" / "fifo.png", data / "osteoporosis" / "pipe"]
    for f in fifos:
        os.mkfifo(f)
    return data, fifos


def test_fifo_in_a_data_folder_is_reported_never_opened(fifo_data):
    data, fifos = fifo_data
    scan = run_guarded(lambda: scan_dataset(data), fifos)
    unreadable = {u["path"]: u["reason"] for u in scan.unreadable}
    assert unreadable == {"normal/fifo.png": "not a regular file", "osteoporosis/pipe": "not a regular file"}
    assert len(scan.records) == 8


def test_audit_and_split_with_a_fifo_finish(fifo_data, tmp_path):
    data, fifos = fifo_data
    out = tmp_path / "out"
    assert run_guarded(lambda: _main(["audit", data, "--out", out / "audit"]), fifos) == 0
    doc = json.loads((out / "audit" / "audit.json").read_text())
    assert {u["path"] for u in doc["unreadable"]} == {"normal/fifo.png", "osteoporosis/pipe"}
    assert run_guarded(lambda: _main(["split", data, "--out", out / "split.json", "--test-size", "2"]), fifos) == 0
    split = json.loads((out / "split.json").read_text())
    assert not {"normal/fifo.png", "osteoporosis/pipe"} & set(split["train"] + split["val"] + split["test"])


# --------------------------------------------------------------------------- item 4: explain

CAFE = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not valid UTF-8, a lone surrogate in Python
MATH = "x$\\frac$y.png"  # an even number of dollar signs: matplotlib would parse it as mathtext


@pytest.fixture
def explain_inputs(tmp_path):
    src = tmp_path / "in"
    g.png_grey8(src / CAFE, variant=1)
    g.png_grey8(src / "good.png", variant=2)
    g.png_grey8(src / MATH, variant=3)
    g.text_as_png(src / "text.png")
    return src


def test_explain_survives_non_utf8_and_mathtext_names(explain_inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert _main(["explain", explain_inputs, "--out", out]) == 0
    std = capsys.readouterr()
    for stem in ("caf\udce9", "good", "x$\\frac$y"):
        assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.json").is_file(), stem
    assert json.loads((out / "caf\udce9.json").read_text())["path"] == str(explain_inputs / CAFE)  # the real name
    assert "caf\\xe9.png" in std.out and "\udce9" not in std.out + std.err  # shown safely
    assert "text.png: not a recognised image format" in std.err  # the unreadable list survives


def test_one_image_failing_in_explain_never_drops_the_others(explain_inputs, tmp_path, capsys, monkeypatch):
    from kneeosteo.inference import report

    real = report.write_explanation

    def flaky(pixels, ex, out_dir, name, extra):
        if name == "good":
            raise RuntimeError("renderer exploded")
        return real(pixels, ex, out_dir, name, extra)

    monkeypatch.setattr(report, "write_explanation", flaky)
    out = tmp_path / "out"
    assert _main(["explain", explain_inputs, "--out", out]) == 0
    err = capsys.readouterr().err
    assert (out / "caf\udce9.png").is_file() and (out / "x$\\frac$y.png").is_file()
    assert "good.png: could not be explained (RuntimeError: renderer exploded)" in err
    assert "text.png: not a recognised image format" in err


# --------------------------------------------------------------------------- item 5: float and wide TIFFs

from kneeosteo.data.reader import ImageReadError, read_image  # noqa: E402


def _with(value, where=(3, 5)):
    a = g.picture().astype(np.float32)
    a[where] = value
    return a


@pytest.mark.parametrize(
    "name,array",
    [
        ("nan.tif", _with(np.nan)),
        ("inf.tif", _with(np.inf)),
        ("minus_inf.tif", _with(-np.inf)),
        ("all_nan.tif", np.full((g.H, g.W), np.nan, np.float32)),
        ("all_inf.tif", np.full((g.H, g.W), np.inf, np.float32)),
    ],
)
def test_non_finite_float_tiff_is_an_error_naming_the_file(tmp_path, name, array):
    path = g.tiff_float(tmp_path / name, array)
    with pytest.raises(ImageReadError) as exc:
        read_image(path)
    assert exc.value.path == str(path) and "not finite" in exc.value.reason


def test_finite_float_tiff_still_reads(tmp_path):
    a = g.picture()
    assert np.allclose(read_image(g.tiff_float(tmp_path / "f.tif", a)).pixels, a, atol=1e-6)
    b = read_image(g.tiff_float(tmp_path / "g.tif", a * 1000 - 7)).pixels  # outside [0, 1]: stretched
    assert np.allclose(b, (a - a.min()) / (a.max() - a.min()), atol=1e-5)


def test_int32_tiff_is_scaled_by_its_actual_range(tmp_path):
    img = read_image(g.tiff_int32(tmp_path / "i32.tif"))  # 12-bit data in a 32-bit container
    a = np.rint(g.picture() * 4095)
    assert img.meta.bit_depth == 32 and img.pixels.max() == 1.0
    assert np.allclose(img.pixels, (a - a.min()) / (a.max() - a.min()), atol=1e-6)
    flat = read_image(g.tiff_int32(tmp_path / "flat.tif", np.full((g.H, g.W), 70000))).pixels
    assert flat.max() == 0.0  # one value: no contrast, not a division by zero


# --------------------------------------------------------------------------- item 6: small files, huge pixels


def test_images_up_to_max_side_decode_exactly_larger_ones_reduced(tmp_path):
    from kneeosteo.data.reader import MAX_SIDE

    assert MAX_SIDE >= 4096  # every KOP image (at most 2430 x 2660) decodes exactly as before
    a = np.tile(np.arange(MAX_SIDE, dtype=np.uint32) % 251, (6, 1)).astype(np.uint8)
    exact = read_image(g.png_grey8(tmp_path / "edge.png", array=a))
    assert np.array_equal(exact.pixels, a / np.float32(255.0)) and exact.meta.reduction == 1
    b = np.tile(np.arange(MAX_SIDE + 1, dtype=np.uint32) % 251, (6, 1)).astype(np.uint8)
    big = read_image(g.png_grey8(tmp_path / "over.png", array=b))
    assert big.pixels.shape == (3, MAX_SIDE // 2 + 1) and big.meta.reduction == 2
    assert (big.meta.width, big.meta.height) == (MAX_SIDE + 1, 6)  # the source's size


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    h, w = a.shape
    pad = np.pad(a.astype(np.float64), ((0, -h % f), (0, -w % f)), constant_values=np.nan)
    return np.nanmean(pad.reshape(-(-h // f), f, -(-w // f), f), axis=(1, 3))


@pytest.mark.parametrize(
    "writer,name",
    [
        (g.png_grey8, "a.png"),
        (g.png_grey16, "a.png"),
        (g.png_rgb, "a.png"),
        (g.png_rgba, "a.png"),
        (g.png_palette, "a.png"),
        (g.jpeg_grey, "a.jpg"),
        (g.jpeg_exif_rotated, "a.jpg"),
        (g.tiff, "a.tif"),
        (g.bmp, "a.bmp"),
        (g.gif_animated, "a.gif"),
        (g.dicom, "a.dcm"),
        (g.dicom_rle, "a.dcm"),
    ],
)
def test_max_side_reduces_every_format_to_the_block_mean(tmp_path, writer, name):
    path = writer(tmp_path / name, size=(403, 101))
    full = read_image(path, max_side=None).pixels
    small = read_image(path, max_side=100)  # factor 5 (a JPEG decodes at 1/4 scale, then 2)
    assert max(small.pixels.shape) <= 100 and small.meta.reduction in (5, 8)
    assert (small.meta.width, small.meta.height) == (full.shape[1], full.shape[0])
    f = small.meta.reduction
    if f == 5:  # the JPEG's DCT scaling is not a block mean: only its size is checked
        assert np.abs(_block_mean(full, f) - small.pixels).max() < 0.01


def test_a_small_file_with_huge_pixels_decodes_in_bounded_memory(tmp_path):
    import tracemalloc

    path = g.huge_png(tmp_path / "huge.png")  # 9999 x 9999, under 1 MB on disk
    assert path.stat().st_size < 2_000_000
    tracemalloc.start()
    try:
        img = read_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert img.pixels.shape == (3333, 3333) and img.meta.reduction == 3
    # numpy's allocations (tracemalloc sees them): a full-size float32 copy alone would be 400 MB
    assert peak < 200e6, f"{peak / 1e6:.0f} MB"


# --------------------------------------------------------------------------- item 10: unreadable sub-folders


@pytest.fixture
def locked_folder(tmp_path, monkeypatch):
    """A data set with a sub-folder that cannot be listed. Tests run as root here, where chmod 000
    does not stop anyone, so listing it raises PermissionError as it would for another user."""
    data = g.make_dataset(tmp_path / "data", n_per_class=3, size=32).root
    locked = data / "normal" / "private"
    g.png_grey8(locked / "a.png", variant=5)
    g.png_grey8(locked / "b.png", variant=6)
    real = os.scandir

    def scandir(path="."):
        if Path(os.fsdecode(path)) == locked:
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    return data, locked


def test_unreadable_sub_folder_is_reported_by_scan_and_audit(locked_folder, tmp_path):
    data, locked = locked_folder
    scan = scan_dataset(data)
    assert {"path": "normal/private", "reason": "cannot list folder (Permission denied)"} in scan.unreadable
    assert _main(["audit", data, "--out", tmp_path / "audit"]) == 0
    doc = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert "normal/private" in {u["path"] for u in doc["unreadable"]}


def test_unreadable_sub_folder_is_reported_by_predicts_input_collection(locked_folder):
    from kneeosteo.inference.inputs import collect_inputs

    data, locked = locked_folder
    files, errors = collect_inputs([data])
    assert len(files) == 6
    assert [(e.path, e.reason) for e in errors] == [(str(locked), "cannot list folder (Permission denied)")]


# --------------------------------------------------------------------------- item 12: one bomb limit


def test_bomb_message_and_readme_quote_the_one_limit(tmp_path):
    from kneeosteo.data.reader import MAX_PIXELS

    mp = f"{MAX_PIXELS / 1e6:g} megapixels"
    docs = (Path(__file__).resolve().parent.parent / "docs" / "own-data.md").read_text()  # "Data layout"
    assert f"more than {mp}" in docs
    for w, h in ((60000, 60000), (12000, 9000)):  # beyond Pillow's own backstop, and only beyond ours
        with pytest.raises(ImageReadError) as exc:
            read_image(g.bomb_png(tmp_path / f"bomb{w}.png", w, h))
        assert f"{w * h} pixels exceeds the limit of {MAX_PIXELS} ({mp})" in exc.value.reason, exc.value.reason
        assert "178956970" not in exc.value.reason


# --------------------------------------------------------------------------- item 13: the terminal


def test_table_escapes_control_and_bidi_characters_files_keep_the_name():
    from kneeosteo.inference.output import format_table
    from kneeosteo.inference.predictor import Prediction, PredictionResult

    names = ["a\nb.png", "\u202egnp.exe", "tab\there.png", "caf\udce9.png", "x\x1b[31mred.png"]
    rows = [
        Prediction(n, "0" * 64, "ok", 0.25, 0.25, "normal", ("normal",), None, None, False, 0.5, "m") for n in names
    ]
    table = format_table(PredictionResult(rows))
    lines = table.split("\n")
    assert len(lines) == 1 + len(names)
    for bad in ("\u202e", "\t", "\udce9", "\x1b"):
        assert bad not in table
    for shown in ("a\\nb.png", "\\u202egnp.exe", "tab\\there.png", "caf\\xe9.png", "x\\x1b[31mred.png"):
        assert shown in table
    assert len({line.index("0" * 12) for line in lines[1:]} | {lines[0].index("content_id")}) == 1  # aligned
    assert rows[0].path == "a\nb.png"  # the row (CSV, JSON) keeps the real name


def test_empty_input_says_no_image_found(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert _main(["predict", "--engine", "torch", tmp_path / "empty"]) == 1
    err = capsys.readouterr().err
    assert "no image found in the inputs" in err and "0 unreadable" not in err


def test_out_through_a_file_says_a_part_of_the_path_is_a_file(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    img = g.png_grey8(tmp_path / "x.png")
    assert _main(["predict", img, "--out", afile / "x.csv"]) == 1
    err = capsys.readouterr().err
    assert "a part of the path is a file" in err and "File exists" not in err


def test_names_over_255_bytes_are_one_line_each_and_the_batch_goes_on(tmp_path, caplog):
    """Issue 28 row 2 and the manifest items: a file name too long (argument or manifest row) is
    that input's error; Excel's byte-order mark is not an entry; a repeated row is said, read once."""
    import logging

    from kneeosteo.inference.inputs import collect_inputs

    good = g.png_grey8(tmp_path / "a.png")
    long_png, long_csv = tmp_path / ("x" * 300 + ".png"), tmp_path / ("y" * 300 + ".csv")
    manifest = tmp_path / "list.csv"
    manifest.write_bytes("\ufeffpath\na.png\n./a.png\n".encode() + b"z" * 300 + b".png\n")
    with caplog.at_level(logging.WARNING):
        files, errors = collect_inputs([long_png, long_csv, manifest, good])
    assert files == [good]
    assert [e.path for e in errors] == [str(long_png), str(long_csv), str(tmp_path / ("z" * 300 + ".png"))]
    assert all("File name too long" in e.reason for e in errors)
    assert any("row 3 (./a.png) repeats row 2" in m for m in caplog.messages)


def test_predict_with_a_too_long_name_is_one_line(tmp_path, capsys):
    assert _main(["predict", "--engine", "torch", tmp_path / ("x" * 300 + ".png")]) == 1
    err = capsys.readouterr().err
    assert "File name too long" in err and "Traceback" not in err
