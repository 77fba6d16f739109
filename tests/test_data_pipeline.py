"""Tests for the data pipeline: scan, class folders, audit (duplicates, shortcut check), split,
offline augmentation and preprocessing.  Everything runs on small generated data sets; the KOP
tests at the end need ../shared/datasets/kop and skip without it."""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
import stat
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

import imagegen as g
from kneeosteo.data import audit as audit_mod
from kneeosteo.data import duplicates as dup_mod
from kneeosteo.data.audit import build_audit, write_audit
from kneeosteo.data.augment import AugmentParams, offline_versions, shrink
from kneeosteo.data.preprocess import Preprocess
from kneeosteo.data.reader import ImageMeta
from kneeosteo.data.scan import DataError, Record, resolve_classes, scan_dataset
from kneeosteo.data.shortcut import metadata_only_accuracy
from kneeosteo.data.split import PAPER_TEST_SIZE, PARTS, load_split, make_split, write_split
from kneeosteo.utils import atomic

NONUTF8 = b"\xff\xfe.png"


@pytest.fixture
def fast_shortcut(monkeypatch):
    """The shortcut check with one CV repeat instead of five (same folds, 5x faster)."""
    monkeypatch.setattr(audit_mod, "metadata_only_accuracy", functools.partial(metadata_only_accuracy, repeats=1))


def _partition_of(doc: dict) -> dict[str, str]:
    where: dict[str, str] = {}
    for part in PARTS:
        for p in doc[part]:
            assert p not in where, f"{p} is in both {where[p]} and {part}"
            where[p] = part
    return where


# --------------------------------------------------------------------------- scan


@pytest.fixture
def formats_dataset(tmp_path):
    """Every readable format in the class folders, plus every kind of bad file."""
    root = tmp_path / "formats"
    n, o = root / "normal", root / "osteoporosis"
    good = {
        "normal/grey8.png": ("PNG", g.png_grey8(n / "grey8.png", variant=0)),
        "normal/grey16.png": ("PNG", g.png_grey16(n / "grey16.png", variant=1)),
        "normal/rgb.png": ("PNG", g.png_rgb(n / "rgb.png", variant=2)),
        "normal/rgba.png": ("PNG", g.png_rgba(n / "rgba.png", variant=3)),
        "normal/palette.png": ("PNG", g.png_palette(n / "palette.png", variant=4)),
        "osteoporosis/photo.jpg": ("JPEG", g.jpeg_rgb(o / "photo.jpg", variant=5)),
        "osteoporosis/film.bmp": ("BMP", g.bmp(o / "film.bmp", variant=6)),
        "osteoporosis/film.tif": ("TIFF", g.tiff(o / "film.tif", variant=7, bits=16)),
        "osteoporosis/film.dcm": ("DICOM", g.dicom(o / "film.dcm", variant=8)),
    }
    bad = {
        "normal/zero.png": ("empty file", g.zero_byte(n / "zero.png")),
        "normal/cut.png": ("truncated", g.truncated_png(n / "cut.png")),
        "osteoporosis/cut.jpg": ("truncated", g.truncated_jpeg(o / "cut.jpg")),
        "osteoporosis/notes.png": ("not a recognised image format", g.text_as_png(o / "notes.png")),
        "osteoporosis/bomb.png": ("decompression bomb", g.bomb_png(o / "bomb.png")),
    }
    (n / "README.txt").write_text("not an image\n")
    os.symlink(n, n / "loop")  # a link loop: normal/loop -> normal
    # A file name that is not UTF-8 (a copy of the JPEG, so it is also an exact duplicate).
    try:
        with open(os.path.join(os.fsencode(o), NONUTF8), "wb") as fh:
            fh.write((o / "photo.jpg").read_bytes())
        good["osteoporosis/" + os.fsdecode(NONUTF8)] = ("JPEG", None)
    except (OSError, UnicodeError):  # e.g. macOS refuses invalid UTF-8 names
        pass
    return root, good, bad


def test_scan_reads_every_format_and_reports_every_bad_file(formats_dataset, caplog):
    root, good, bad = formats_dataset
    with caplog.at_level(logging.WARNING):
        scan = scan_dataset(root)  # must not raise for any bad file
    assert scan.classes == ["normal", "osteoporosis"]
    recs = scan.by_path()
    assert sorted(recs) == sorted(good)
    assert len(scan.records) == len(good)
    for path, (fmt, _) in good.items():
        r = recs[path]
        assert r.meta.format == fmt, path
        assert r.label == path.split("/")[0] and r.target == int(r.label == "osteoporosis")
        assert (r.meta.width, r.meta.height) == (g.W, g.H), path
        assert Path(r.meta.path) == root / path  # absolute location, not the cached one
    unreadable = {u["path"]: u["reason"] for u in scan.unreadable}
    assert sorted(unreadable) == sorted(bad)
    for path, (reason, _) in bad.items():
        assert reason in unreadable[path], (path, unreadable[path])
    assert scan.skipped == [{"path": "normal/README.txt", "reason": scan.skipped[0]["reason"]}]
    assert not any("loop" in p for p in recs)  # the symlinked folder is not followed
    # every bad file is named in a warning
    for path in bad:
        assert any(path.split("/")[1] in m for m in caplog.messages), path


def test_scan_memo_goes_to_the_isolated_cache_and_is_reused(formats_dataset, monkeypatch):
    root, good, _ = formats_dataset
    first = scan_dataset(root)
    cache = Path(os.environ["KNEEOSTEO_CACHE"]) / "scan"
    # one memo per distinct file content (the non-UTF-8 file is a byte copy of photo.jpg)
    assert len(list(cache.glob("*.json"))) == 9
    # a second scan takes readable files from the memo; only bad files are tried again
    import kneeosteo.data.scan as scan_mod

    decoded = []
    real_read = scan_mod.read_image

    def counting_read(path, *a, **k):
        decoded.append(Path(path).relative_to(root).as_posix())
        return real_read(path, *a, **k)

    monkeypatch.setattr(scan_mod, "read_image", counting_read)
    second = scan_dataset(root)
    assert not set(decoded) & set(good)
    assert [r.to_json() for r in second.records] == [r.to_json() for r in first.records]
    assert second.unreadable == first.unreadable


def test_audit_writes_reports_with_a_non_utf8_file_name(formats_dataset, tmp_path, fast_shortcut):
    root, good, bad = formats_dataset
    scan = scan_dataset(root)
    a = build_audit(scan)
    assert a["files_read"] == len(good)
    assert len(a["unreadable"]) == len(bad) and len(a["skipped_not_images"]) == 1
    assert a["shortcut_metadata_only"]["accuracy"] is None  # far too few images for 5-fold CV
    js, md = write_audit(a, tmp_path / "out")
    text = md.read_bytes().decode("utf-8")  # valid UTF-8 even with an undecodable file name
    assert "bomb.png" in text
    if any(os.fsdecode(NONUTF8) in p for p in good):
        assert r"\xff\xfe.png" in text
        assert a["exact_duplicates"]["groups"] == 1
    assert json.loads(js.read_text())["files_read"] == len(good)


# --------------------------------------------------------------------------- class folders


def _folders(root: Path, *names: str) -> Path:
    for name in names:
        (root / name).mkdir(parents=True)
        g.png_grey8(root / name / "a.png", variant=len(name))
    return root


@pytest.mark.parametrize(
    "names, message",
    [
        (("normal", "healthy"), "no class folder named 'osteoporosis'"),
        (("osteoporosis",), "expected exactly two class folders"),
        (("normal", "osteopenia", "osteoporosis"), "expected exactly two class folders"),
    ],
)
def test_resolve_classes_rejects_non_binary_layouts(tmp_path, names, message):
    root = _folders(tmp_path / "d", *names)
    with pytest.raises(DataError, match=message):
        resolve_classes(root)
    with pytest.raises(DataError):
        scan_dataset(root)


def test_resolve_classes_ignores_hidden_folders_and_orders_negative_first(tmp_path):
    root = _folders(tmp_path / "d", "osteoporosis", "normal", ".thumbs")
    assert resolve_classes(root) == ["normal", "osteoporosis"]
    with pytest.raises(DataError, match="not found"):
        resolve_classes(tmp_path / "nope")


def test_empty_class_folder_scans_with_a_warning_but_cannot_be_split(tmp_path, caplog):
    root = tmp_path / "d"
    for i in range(4):
        g.png_grey8(root / "normal" / f"n{i}.png", variant=i)
    (root / "osteoporosis").mkdir()
    g.text_as_png(root / "osteoporosis" / "junk.png")  # only an unreadable file
    with caplog.at_level(logging.WARNING):
        scan = scan_dataset(root)
    assert len(scan.records) == 4 and len(scan.unreadable) == 1
    assert any("class folder 'osteoporosis' holds no readable image" in m for m in caplog.messages)
    with pytest.raises(DataError, match="images in both classes.*none in osteoporosis"):
        make_split(scan, test_size=2)


# --------------------------------------------------------------------------- audit


@pytest.fixture(scope="module")
def dup_dataset(tmp_path_factory):
    """20+20 images, 2 exact duplicates, 2 label-conflict copies, 2 near duplicates; scanned once."""
    root = tmp_path_factory.mktemp("dups") / "data"
    ds = g.make_dataset(root, n_per_class=20, exact_duplicates=2, conflict_duplicates=2, near_duplicates=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KNEEOSTEO_CACHE", str(tmp_path_factory.mktemp("dups-cache")))
        scan = scan_dataset(root)
    return ds, scan


def _rel(ds, p: Path) -> str:
    return p.relative_to(ds.root).as_posix()


def test_audit_finds_exactly_the_planted_duplicates(dup_dataset, tmp_path, fast_shortcut):
    ds, scan = dup_dataset
    a = build_audit(scan)
    assert a["files_read"] == len(ds.items) == 46
    assert a["distinct_images"] == 46 - 2 - 2
    ex = a["exact_duplicates"]
    found = {frozenset(m["path"] for m in grp["members"]): grp["conflict"] for grp in ex["list"]}
    expected = {frozenset({_rel(ds, x), _rel(ds, y)}): False for x, y in ds.exact_duplicates}
    expected.update({frozenset({_rel(ds, x), _rel(ds, y)}): True for x, y in ds.conflicts})
    assert found == expected
    assert (ex["groups"], ex["files_involved"], ex["label_conflicts"]) == (4, 8, 2)
    clusters = [{m["path"] for m in c["members"]} for c in a["near_duplicates"]["list"]]
    assert a["near_duplicates"]["clusters"] == len(clusters) >= 2
    for x, y in ds.near_duplicates:
        assert any({_rel(ds, x), _rel(ds, y)} <= c for c in clusters), (x, y)
    js, md = write_audit(a, tmp_path / "audit")
    assert json.loads(js.read_text())["exact_duplicates"]["label_conflicts"] == 2
    text = md.read_text()
    assert text.count("LABEL CONFLICT") == 2
    assert "conflict_000.png" in text and "near_000.png" in text


def _record(path: str, content_id: str, phash: str, label: str = "normal") -> Record:
    meta = ImageMeta(path, "PNG", "L", 8, 8, 8, 1, 1)
    return Record(path, label, int(label == "osteoporosis"), content_id, phash, meta)


def test_near_pairs_match_brute_force_in_any_block_size():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=40, dtype=np.int64)
    flips = rng.integers(0, 64, size=(40, 3))
    # every other hash is a 0..3-bit variant of its neighbour, so there are pairs at every distance
    vals = [
        int(b) if i % 2 == 0 else int(base[i - 1]) ^ sum(1 << int(f) for f in flips[i][: i % 4])
        for i, b in enumerate(base)
    ]
    hexes = [f"{v:016x}" for v in vals]
    for t in (0, 2, 6, 40):
        brute = {(i, j) for i in range(40) for j in range(i + 1, 40) if (vals[i] ^ vals[j]).bit_count() <= t}
        for block in (1, 7 * 8, 1 << 22):  # one row per block, a few rows, everything at once
            got = {tuple(p) for p in dup_mod.near_pairs(hexes, t, block_elems=block).tolist()}
            assert got == brute, (t, block)
    assert dup_mod.near_pairs(hexes[:1], 6).shape == (0, 2)


def test_chains_of_near_and_exact_duplicates_form_one_group():
    recs = [
        _record("a", "c1", "0000000000000000"),
        _record("b", "c2", "000000000000000f"),  # 4 bits from a
        _record("c", "c3", "00000000000000ff"),  # 4 from b, 8 from a: joined through b
        _record("d", "c9", "ffffffffffffffff"),
        _record("e", "c9", "0f0f0f0f0f0f0f0f"),  # same pixels
        _record("f", "c5", "f0f0f0f0f0f0f0f0"),
    ]
    assert dup_mod.leakage_groups(recs, 4) == {"a": 0, "b": 0, "c": 0, "d": 1, "e": 1, "f": 2}
    assert dup_mod.leakage_groups(recs, 3) == {"a": 0, "b": 1, "c": 2, "d": 3, "e": 3, "f": 4}
    assert [[r.path for r in c] for c in dup_mod.near_duplicate_clusters(recs, 4)] == [["a", "b", "c"]]


def test_one_deduplication_for_split_and_audit(dup_dataset):
    ds, scan = dup_dataset
    kept, excluded = dup_mod.deduplicate(scan.records)
    assert [r.path for r in kept] == [r.path for r in scan.records if r.path not in {e["path"] for e in excluded}]
    assert len({r.content_id for r in kept}) == len(kept) == 46 - 2 - 2 * 2  # conflicts lose both copies
    assert sum("label conflict" in e["reason"] for e in excluded) == 4
    doc = make_split(scan, test_size=10)
    assert sorted(doc["content_ids"]) == sorted(r.path for r in kept)


def _two_sources(root: Path, n: int = 16, same_metadata: bool = False) -> Path:
    """normal: 64x64 PNG; osteoporosis: 96x64 JPEG, unless ``same_metadata`` (then both classes
    are 64x64 8-bit BMPs, whose file size is fixed by the size)."""
    for i in range(n):
        if same_metadata:
            g.bmp(root / "normal" / f"n{i:02d}.bmp", variant=i, mode="L", size=(64, 64))
            g.bmp(root / "osteoporosis" / f"o{i:02d}.bmp", variant=100 + i, mode="L", size=(64, 64))
        else:
            g.png_grey8(root / "normal" / f"n{i:02d}.png", variant=i, size=(64, 64))
            g.jpeg_rgb(root / "osteoporosis" / f"o{i:02d}.jpg", variant=100 + i, size=(96, 64))
    return root


def test_shortcut_check_flags_label_encoded_in_metadata(tmp_path, fast_shortcut):
    s = build_audit(scan_dataset(_two_sources(tmp_path / "d")))["shortcut_metadata_only"]
    assert s["n"] == 32 and s["majority_baseline"] == 0.5
    assert s["accuracy"] > 0.9 and s["auc"] > 0.9
    lo, hi = s["accuracy_ci95"]
    assert lo <= s["accuracy"] <= hi


def test_shortcut_check_near_chance_when_metadata_is_identical(tmp_path, fast_shortcut):
    s = build_audit(scan_dataset(_two_sources(tmp_path / "d", same_metadata=True)))["shortcut_metadata_only"]
    assert s["n"] == 32
    assert s["accuracy"] < 0.75


# --------------------------------------------------------------------------- split


@pytest.mark.parametrize("test_size", [10, 9])
def test_paper_split_is_exact_stratified_and_leak_free(dup_dataset, test_size):
    ds, scan = dup_dataset
    doc = make_split(scan, "paper", seed=0, test_size=test_size)
    where = _partition_of(doc)  # asserts no path in two partitions
    assert doc["format"] == "kneeosteo-split/1" and doc["protocol"] == "paper"
    # exactly test_size test images, stratified (both classes kept 20 images after de-duplication)
    assert len(doc["test"]) == test_size
    per_class = Counter(p.split("/")[0] for p in doc["test"])
    assert abs(per_class["normal"] - per_class["osteoporosis"]) <= 1
    rest = len(doc["train"]) + len(doc["val"])
    assert rest + test_size == 40
    assert abs(len(doc["val"]) - 0.1 * rest) <= 1
    # no picture on two sides
    cid = {r.path: r.content_id for r in scan.records}
    by_content = defaultdict(set)
    for p, part in where.items():
        by_content[cid[p]].add(part)
    assert all(len(parts) == 1 for parts in by_content.values())
    assert len(by_content) == len(where)  # and no picture twice at all
    # label conflicts: every copy excluded, with the reason
    excluded = {e["path"]: e["reason"] for e in doc["excluded"]}
    for x, y in ds.conflicts:
        for p in (_rel(ds, x), _rel(ds, y)):
            assert p not in where and "label conflict" in excluded[p]
    # exact duplicates: exactly one representative kept
    for x, y in ds.exact_duplicates:
        kept = [p for p in (_rel(ds, x), _rel(ds, y)) if p in where]
        assert len(kept) == 1
        other = ({_rel(ds, x), _rel(ds, y)} - set(kept)).pop()
        assert "exact duplicate" in excluded[other]
    assert len(excluded) == 2 + 4
    # near duplicates travel together
    for x, y in ds.near_duplicates:
        assert where[_rel(ds, x)] == where[_rel(ds, y)]
    assert doc["content_ids"] == {p: cid[p] for p in where}


def test_split_is_reproducible_per_seed(dup_dataset, tmp_path):
    _, scan = dup_dataset
    a, b = make_split(scan, seed=3, test_size=10), make_split(scan, seed=3, test_size=10)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    write_split(a, tmp_path / "a.json")
    write_split(b, tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    c = make_split(scan, seed=4, test_size=10)
    assert set(c["test"]) != set(a["test"])


def test_split_rejects_a_test_set_as_large_as_the_data(dup_dataset):
    _, scan = dup_dataset
    with pytest.raises(DataError, match="test size"):
        make_split(scan, test_size=40)
    with pytest.raises(ValueError, match="unknown protocol"):
        make_split(scan, protocol="nonsense", test_size=10)


def test_kfold_puts_every_kept_image_in_exactly_one_test_fold(dup_dataset):
    ds, scan = dup_dataset
    doc = make_split(scan, "kfold", seed=0, folds=5)
    assert len(doc["folds"]) == 5 and "test" not in doc
    kept = set(doc["content_ids"])
    assert len(kept) == 40
    tests = Counter(p for f in doc["folds"] for p in f["test"])
    assert set(tests) == kept and set(tests.values()) == {1}
    for fold in doc["folds"]:
        where = _partition_of(fold)
        assert set(where) == kept
        assert 6 <= len(fold["test"]) <= 10
        for x, y in ds.near_duplicates:
            assert where[_rel(ds, x)] == where[_rel(ds, y)]


def test_load_split_round_trip_and_folds(dup_dataset, tmp_path):
    ds, scan = dup_dataset
    doc = make_split(scan, seed=0, test_size=10)
    write_split(doc, tmp_path / "s.json")
    sets = load_split(tmp_path / "s.json")  # DATA from the file's "data"
    assert (sets.train, sets.val, sets.test) == (doc["train"], doc["val"], doc["test"])
    assert sets.classes == ["normal", "osteoporosis"] and sets.positive == "osteoporosis"
    assert sets.missing == []
    assert all(t == int(p.startswith("osteoporosis/")) for p, t in sets.items("test"))
    kdoc = make_split(scan, "kfold", seed=0, folds=3)
    write_split(kdoc, tmp_path / "k.json")
    assert load_split(tmp_path / "k.json", fold=2).test == kdoc["folds"][2]["test"]
    with pytest.raises(DataError, match="fold 3 out of range"):
        load_split(tmp_path / "k.json", fold=3)


def test_load_split_rejects_a_path_in_two_partitions(dup_dataset, tmp_path):
    ds, _ = dup_dataset
    f = tmp_path / "s.json"
    f.write_text(
        json.dumps(
            {
                "train": ["normal/normal_004.png", "osteoporosis/osteoporosis_000.png"],
                "val": [],
                "test": ["normal/normal_004.png"],
            }
        )
    )
    with pytest.raises(DataError, match="normal/normal_004.png"):
        load_split(f, ds.root)


def test_load_split_drops_missing_files_by_name(dup_dataset, tmp_path, caplog):
    ds, _ = dup_dataset
    f = tmp_path / "s.json"
    f.write_text(
        json.dumps(
            {
                "train": ["normal/normal_004.png", "normal/ghost.png"],
                "val": ["osteoporosis/osteoporosis_000.png"],
                "test": ["osteoporosis/gone.png", "normal/normal_005.png"],
            }
        )
    )
    with caplog.at_level(logging.WARNING):
        sets = load_split(f, ds.root)
    assert sets.missing == ["normal/ghost.png", "osteoporosis/gone.png"]
    assert sets.train == ["normal/normal_004.png"] and sets.test == ["normal/normal_005.png"]
    assert any("ghost.png" in m for m in caplog.messages)


def test_load_split_accepts_a_minimal_external_file(dup_dataset, tmp_path):
    ds, _ = dup_dataset
    f = tmp_path / "ext.json"
    f.write_text(
        json.dumps(
            {
                "train": ["normal/normal_006.png", "osteoporosis/osteoporosis_001.png"],
                "val": ["normal/normal_007.png"],
                "test": ["osteoporosis/osteoporosis_002.png"],
            }
        )
    )
    sets = load_split(f, ds.root)
    assert sets.data == ds.root
    assert sets.classes == ["normal", "osteoporosis"] and sets.positive == "osteoporosis"
    assert sets.items("train") == [("normal/normal_006.png", 0), ("osteoporosis/osteoporosis_001.png", 1)]
    assert sets.items("test") == [("osteoporosis/osteoporosis_002.png", 1)]
    with pytest.raises(DataError, match="pass DATA"):
        load_split(f)  # no "data" in the file and none given
    f.write_text(json.dumps({"train": [], "val": []}))
    with pytest.raises(DataError, match="'train', 'val' and 'test'"):
        load_split(f, ds.root)
    f.write_text(json.dumps({"train": [], "val": [], "test": []}))
    with pytest.raises(DataError, match="no images"):
        load_split(f, ds.root)


def test_load_split_minimal_file_keeps_osteoporosis_positive(tmp_path):
    """Without "positive_class", the positive class must not be 'the alphabetically last folder'."""
    root = tmp_path / "d"
    for label in ("osteoporosis", "reference"):
        g.png_grey8(root / label / "a.png")
    f = tmp_path / "ext.json"
    f.write_text(json.dumps({"train": ["reference/a.png"], "val": [], "test": ["osteoporosis/a.png"]}))
    sets = load_split(f, root)
    assert sets.positive == "osteoporosis" and sets.classes == ["reference", "osteoporosis"]
    assert sets.items("train") == [("reference/a.png", 0)]
    assert sets.items("test") == [("osteoporosis/a.png", 1)]


# --------------------------------------------------------------------------- augment

CID = "3f" * 32


@pytest.fixture(scope="module")
def big_picture():
    return g.picture(600, 540, variant=3).astype(np.float32)  # larger than WORK_SIZE: gets shrunk


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a, b)


def test_offline_versions_are_deterministic_per_seed_and_content():
    big_picture = g.picture(160, 120, variant=3).astype(np.float32)
    p = AugmentParams(copies=3)
    a = offline_versions(big_picture, CID, 0, p)
    assert len(a) == 3
    for v in a:
        assert v.dtype == np.float32 and v.ndim == 2
        assert v.min() >= 0.0 and v.max() <= 1.0
        assert v.shape[0] <= 120 and v.shape[1] <= 160  # ROI crop: at most the full image
    b = offline_versions(big_picture.copy(), CID, 0, p)
    assert all(_same(x, y) for x, y in zip(a, b))
    assert not any(_same(a[i], a[j]) for i in range(3) for j in range(i + 1, 3))
    assert not any(_same(x, y) for x, y in zip(a, offline_versions(big_picture, CID, 1, p)))
    assert not any(_same(x, y) for x, y in zip(a, offline_versions(big_picture, "a1" * 32, 0, p)))
    # the stream of copy k does not depend on how many copies are asked for
    assert _same(offline_versions(big_picture, CID, 0, AugmentParams(copies=1))[0], a[0])


def test_identity_augmentation_leaves_the_image_unchanged(big_picture):
    p = AugmentParams(copies=2, zoom=(1.0, 1.0), crop_fraction=(1.0, 1.0), rotation=0.0)
    small = shrink(big_picture)
    assert small.shape == (round(540 * 512 / 600), 512)  # picture() takes width, height
    for v in offline_versions(big_picture, CID, 0, p):
        assert v.shape == small.shape
        assert np.abs(v - small).max() < 1e-3


def test_source_augment_is_seeded_bounded_and_does_what_it_says():
    from kneeosteo.data.augment import SourceAugment, source_augment_batch

    gen = torch.Generator().manual_seed(0)
    grey = (torch.rand(6, 1, 32, 32, generator=gen) * 0.8 + 0.1).half()
    a = source_augment_batch(grey, np.random.default_rng(5))
    b = source_augment_batch(grey, np.random.default_rng(5))
    assert a.dtype == grey.dtype and a.shape == grey.shape and torch.equal(a, b)  # seeded
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert not torch.equal(a, grey)
    none = SourceAugment(p=0.0)
    assert torch.equal(source_augment_batch(grey, np.random.default_rng(1), none), grey)  # p = 0: untouched
    flip_only = SourceAugment(
        p=1.0, gamma=(1.0, 1.0), jpeg_quality=(100, 100), blur_sigma=(1e-3, 1e-3), noise_std=(0.0, 0.0)
    )
    out = source_augment_batch(grey, np.random.default_rng(1), flip_only).float()
    torch.testing.assert_close(out, grey.float().flip(-1), atol=0.02, rtol=0)  # flip; q100 JPEG nearly lossless
    harsh = SourceAugment(p=1.0, gamma=(1.0, 1.0), jpeg_quality=(5, 5), blur_sigma=(1e-3, 1e-3), noise_std=(0.0, 0.0))
    lossy = source_augment_batch(grey, np.random.default_rng(1), harsh).float()
    assert float((lossy - grey.float().flip(-1)).abs().mean()) > 0.03  # quality 5 JPEG really re-encodes


def test_augment_params_key_tracks_every_parameter():
    base = AugmentParams()
    keys = {
        base.key(),
        AugmentParams(copies=4).key(),
        AugmentParams(zoom=(0.9, 1.1)).key(),
        AugmentParams(crop_fraction=(0.7, 1.0)).key(),
        AugmentParams(rotation=10.0).key(),
    }
    assert len(keys) == 5 and base.key() == AugmentParams().key()


# --------------------------------------------------------------------------- preprocess


def test_paper_preset_normalises_with_the_given_mean_and_std():
    pp = Preprocess()
    out = pp(np.full((300, 170), 0.5, np.float32))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    want = (0.5 - np.array(pp.mean)) / np.array(pp.std)
    assert torch.allclose(out, torch.tensor(want, dtype=torch.float32).view(3, 1, 1).expand(3, 224, 224), atol=1e-5)
    custom = Preprocess(size=32, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))(np.full((40, 50), 0.75, np.float32))
    assert custom.shape == (3, 32, 32)
    assert torch.allclose(custom[:, 5, 7], torch.tensor([0.5, 2.0, 0.75]), atol=1e-5)
    # the paper preset stretches: a tall image fills the whole square
    assert torch.all(Preprocess().geometry(np.ones((400, 100), np.float32)) > 0.99)


def test_robust_preset_letterboxes_a_tall_image():
    geo = Preprocess(preset="robust").geometry(np.ones((400, 100), np.float32))[0]
    assert geo.shape == (224, 224)
    cols = geo.mean(dim=0)
    content = torch.nonzero(cols > 0.5).flatten()
    lo, hi = int(content.min()), int(content.max())
    assert hi - lo + 1 == 56  # aspect ratio kept: 224 * 100 / 400
    assert lo == (224 - 56) // 2 and abs(lo - (223 - hi)) <= 1  # centred
    assert torch.all(geo[:, :lo] == 0) and torch.all(geo[:, hi + 1 :] == 0)  # black bars left/right
    assert torch.all(geo[:, lo + 1 : hi] > 0.99)  # full height, no bars top/bottom
    # a wide image gets bars top and bottom instead
    wide = Preprocess(preset="robust").geometry(np.ones((100, 400), np.float32))[0]
    assert torch.all(wide[0] == 0) and torch.all(wide[112] > 0.99)


@pytest.mark.parametrize("preset", ["paper", "robust", "bone"])
@pytest.mark.parametrize("h,w", [(400, 100), (100, 400), (37, 211), (300, 300), (1, 999)])
def test_content_box_is_where_geometry_puts_the_picture(preset, h, w):
    prep = Preprocess(preset=preset, size=64)
    top, left, nh, nw = prep.content_box(h, w)
    geo = prep.geometry(np.ones((h, w), np.float32))[0]
    inside = torch.zeros_like(geo, dtype=torch.bool)
    inside[top : top + nh, left : left + nw] = True
    assert torch.all(geo[inside] > 0.99) and torch.all(geo[~inside] == 0)
    if preset != "paper":  # a uniform picture has no bone/background contrast: 'bone' keeps all of it
        assert max(nh, nw) == 64 and abs(nh / nw - h / w) < 2 / min(nh, nw)


def test_walk_files_is_sorted_skips_hidden_and_does_not_follow_folder_links(tmp_path):
    from kneeosteo.data.scan import walk_files
    from kneeosteo.inference.inputs import collect_inputs

    for rel in ("b.png", "a.txt", ".DS_Store", "sub/c.png", ".hidden/d.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    os.symlink(tmp_path, tmp_path / "sub" / "loop", target_is_directory=True)
    assert [p.relative_to(tmp_path).as_posix() for p in walk_files(tmp_path)] == ["a.txt", "b.png", "sub/c.png"]
    # the command line's folder inputs are the same walk, minus the files no reader would try
    assert collect_inputs([tmp_path])[0] == [tmp_path / "b.png", tmp_path / "sub" / "c.png"]


def test_preprocess_key_changes_with_every_parameter():
    base = Preprocess()
    variants = [
        Preprocess(preset="robust"),
        Preprocess(size=256),
        Preprocess(mean=(0.5, 0.5, 0.5)),
        Preprocess(std=(0.5, 0.5, 0.5)),
        Preprocess(clahe=True),
    ]
    keys = [base.key()] + [v.key() for v in variants]
    assert len(set(keys)) == len(keys)
    assert Preprocess().key() == base.key()
    with pytest.raises(ValueError, match="preset"):
        Preprocess(preset="fancy")


def test_clahe_changes_the_output():
    img = (0.3 + 0.1 * g.picture(200, 160, variant=1)).astype(np.float32)  # low contrast
    plain, eq = Preprocess().geometry(img), Preprocess(clahe=True).geometry(img)
    assert plain.shape == eq.shape
    assert (eq - plain).abs().max() > 0.05
    assert float(eq.std()) > float(plain.std())  # contrast was increased


# --------------------------------------------------------------------------- KOP (optional)

# kop_scan: conftest's, KOP scanned once per session


@pytest.fixture(scope="module")
def kop_manifest(kop):
    with open(kop / "MANIFEST.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    groups = defaultdict(list)
    for row in rows:
        groups[row["sha256"]].append(row)
    dup = [sorted(r["file"] for r in grp) for grp in groups.values() if len(grp) > 1]
    conflicts = [
        sorted(r["file"] for r in grp) for grp in groups.values() if len(grp) > 1 and len({r["label"] for r in grp}) > 1
    ]
    return rows, dup, conflicts


def test_kop_audit_finds_the_duplicates_the_manifest_implies(kop_scan, kop_manifest, fast_shortcut):
    rows, dup, conflicts = kop_manifest
    assert len(kop_scan.records) == len(rows) and kop_scan.unreadable == []
    assert dup and conflicts  # the manifest does contain byte-identical files under both labels
    a = build_audit(kop_scan)
    found = [({m["path"] for m in grp["members"]}, grp["conflict"]) for grp in a["exact_duplicates"]["list"]]
    for grp in dup:  # identical bytes => identical pixels: every manifest group is found
        assert any(set(grp) <= members for members, _ in found), grp
    for grp in conflicts:
        assert any(set(grp) <= members and conflict for members, conflict in found), grp
    # exactly the groups the manifest implies, as docs/cli.md (`audit`) states: 17 groups of 34 files, 10
    # of them filed under both labels (identical pixels in different bytes would be more)
    ex = a["exact_duplicates"]
    assert (ex["groups"], ex["files_involved"], ex["label_conflicts"]) == (len(dup), sum(map(len, dup)), len(conflicts))
    assert (ex["groups"], ex["files_involved"], ex["label_conflicts"]) == (17, 34, 10)
    assert a["shortcut_metadata_only"]["accuracy"] is not None


def test_kop_paper_split(kop_scan, kop_manifest):
    _, _, conflicts = kop_manifest
    doc = make_split(kop_scan, "paper", seed=0)
    where = _partition_of(doc)
    assert len(doc["test"]) == PAPER_TEST_SIZE
    cid = {r.path: r.content_id for r in kop_scan.records}
    assert len({cid[p] for p in doc["test"]}) == PAPER_TEST_SIZE  # 72 distinct pictures
    parts_of = defaultdict(set)
    for p, part in where.items():
        parts_of[cid[p]].add(part)
    assert all(len(s) == 1 for s in parts_of.values())
    excluded = {e["path"]: e["reason"] for e in doc["excluded"]}
    for grp in conflicts:
        for p in grp:
            assert p not in where and "label conflict" in excluded[p], p


def test_kop_split_keeps_every_near_duplicate_cluster_of_the_audit_on_one_side(kop_scan):
    """The audit's near-duplicate clusters (pHash <= 6 bits, README "audit": 22 on KOP), each wholly
    in one partition of the paper split (every seed `reproduce` uses) and in one test fold of the
    k-fold protocol: exact duplicates alone would leave 8 of them straddling partitions."""
    clusters = dup_mod.near_duplicate_clusters(kop_scan.records)
    assert len(clusters) == 22
    docs = [make_split(kop_scan, "paper", seed=s) for s in range(5)]
    docs += [{**fold, "seed": "kfold"} for fold in make_split(kop_scan, "kfold", seed=0)["folds"]]
    for doc in docs:
        where = _partition_of(doc)
        straddling = [sorted({where[r.path] for r in c if r.path in where}) for c in clusters]
        straddling = [(c[0].path, parts) for c, parts in zip(clusters, straddling) if len(parts) > 1]
        assert not straddling, f"seed {doc['seed']}: {len(straddling)} clusters straddle partitions: {straddling[:3]}"
        assert sum(any(r.path in where for r in c) for c in clusters) >= 20  # most clusters are in the split at all


# --------------------------------------------------------------------------- decodes per run


def test_each_image_is_decoded_once_when_preparing_from_a_split_file(tmp_path, monkeypatch):
    """`train --split` on a cold cache: prepare needs the content id (scan memo) and the pixels;
    one decode gives both. Counted by wrapping read_image where the data layer calls it."""
    from kneeosteo.data import scan as scan_mod
    from kneeosteo.features import prepare as prepare_mod
    from kneeosteo.features.cache import TensorCache

    ds = g.make_dataset(tmp_path / "d", n_per_class=3, size=48)
    decoded: Counter = Counter()
    real = scan_mod.read_image

    def counting(path, *a, **k):
        decoded[Path(path).name] += 1
        return real(path, *a, **k)

    monkeypatch.setattr(scan_mod, "read_image", counting)
    monkeypatch.setattr(prepare_mod, "read_image", counting)
    items = [(p.relative_to(ds.root).as_posix(), int(lab == "osteoporosis")) for p, lab in ds.items]
    names = {p.name for p, _ in ds.items}

    prep = Preprocess(size=32)
    outputs = {}

    def run(cache_root, clear=True):
        if clear:
            decoded.clear()
        out = prepare_mod.prepare(
            items, ds.root, prep, TensorCache(cache_root), augment=AugmentParams(copies=2), workers=1
        )
        assert len(out) == 3 * len(items)
        outputs[cache_root.name] = out.grey
        return dict(decoded)

    assert run(tmp_path / "t1") == {n: 1 for n in names}  # cold: was 2 (describe_file, then pixels)
    assert run(tmp_path / "t1") == {}  # warm: nothing decoded
    # `train` without --split, cold: the scan decodes for ids and pHashes and hands each image to
    # precache (input + the augmentation's small copy), so prepare decodes nothing: once in all
    monkeypatch.setenv("KNEEOSTEO_CACHE", str(tmp_path / "cold"))
    decoded.clear()
    cache = TensorCache(tmp_path / "t2")
    scan_dataset(ds.root, on_image=lambda info, img: prepare_mod.precache(info["content_id"], img.pixels, prep, cache))
    assert run(tmp_path / "t2", clear=False) == {n: 1 for n in names}
    # and the tensors are the ones a direct decode gives (augmented copies included)
    assert torch.equal(outputs["t1"], outputs["t2"])


# --------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_users_usual_permissions(tmp_path, umask, mode):
    before = os.umask(umask)
    try:
        assert atomic.current_umask() == umask
        atomic.write_text(tmp_path / "a.json", "{}")
        atomic.write_bytes(tmp_path / "sub" / "b.bin", b"x")
        with atomic.atomic_path(tmp_path / "c.pt") as tmp:
            tmp.write_bytes(b"y")
    finally:
        os.umask(before)
    for name in ("a.json", "sub/b.bin", "c.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_umask_without_proc_is_read_once_and_restored(monkeypatch):
    def no_proc(*a, **k):
        raise FileNotFoundError("/proc/self/status")

    monkeypatch.setattr(atomic, "open", no_proc, raising=False)  # as on macOS
    atomic._umask_by_setting.cache_clear()
    before = os.umask(0o027)
    try:
        assert atomic.current_umask() == 0o027 and atomic.new_file_mode() == 0o640
        assert os.umask(0o027) == 0o027  # left as it was
    finally:
        os.umask(before)
        atomic._umask_by_setting.cache_clear()


def test_importing_the_data_layer_changes_no_global_state():
    code = (
        "import os; os.umask = None; from PIL import Image; limit = Image.MAX_IMAGE_PIXELS; "
        "import kneeosteo.utils.atomic, kneeosteo.data.scan, kneeosteo.data.reader; "
        "assert Image.MAX_IMAGE_PIXELS == limit"
    )
    subprocess.run([sys.executable, "-c", code], check=True)  # os.umask called at import: TypeError
