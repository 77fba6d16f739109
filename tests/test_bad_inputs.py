"""Bad input, end to end: one data folder mixing good radiographs with every kind of bad file,
through `audit`, `split`, `train`, `predict` and the web API, plus the data sets that are wrong
as a whole (a class folder without images, one class only, a split naming missing files).

Each file has one documented outcome (docs/reliability.md): *read* (used like any image),
*unreadable* (reported by name with the reason, the rest processed), *skipped* (not an image
suffix: a warning in a scan, an error line when named explicitly), or *ignored* (a symlinked
folder, never followed). The web API decides by content, not by name, so its column differs for
a PNG named .txt (200). The test prints the tally docs/reliability.md reports.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import imagegen as g
from kneeosteo.data import audit as audit_mod
from kneeosteo.data.scan import scan_dataset
from kneeosteo.data.shortcut import metadata_only_accuracy
from kneeosteo.data.split import load_split
from kneeosteo.interfaces.cli import main
from kneeosteo.run import RunDir
from kneeosteo.training import trainer

CAFE = os.fsdecode(b"caf\xe9.png")  # a Latin-1 file name: not valid UTF-8
# path -> (writer, outcome, words in the reason, web status)
CORPUS = {
    "normal/zero_byte.png": (g.zero_byte, "unreadable", "empty", 422),
    "normal/truncated.jpg": (g.truncated_jpeg, "unreadable", "truncated", 422),
    "osteoporosis/truncated.png": (g.truncated_png, "unreadable", "truncated", 422),
    "normal/png_named.jpg": (functools.partial(g.png_grey8, variant=11), "read", "", 200),
    "osteoporosis/jpeg_named.png": (functools.partial(g.jpeg_grey, variant=12), "read", "", 200),
    "normal/png_named.txt": (functools.partial(g.png_grey8, variant=13), "skipped", "not an image file", 200),
    "normal/text.png": (g.text_as_png, "unreadable", "not a recognised image format", 415),
    "osteoporosis/one_by_one.png": (g.one_by_one, "read", "", 200),
    "normal/bomb.png": (g.bomb_png, "unreadable", "decompression bomb", 422),
    "osteoporosis/grey16.png": (functools.partial(g.png_grey16, variant=14), "read", "", 200),
    "normal/rgba.png": (functools.partial(g.png_rgba, variant=15), "read", "", 200),
    "osteoporosis/palette.png": (functools.partial(g.png_palette, variant=16), "read", "", 200),
    "normal/cmyk.jpg": (functools.partial(g.jpeg_cmyk, variant=17), "read", "", 200),
    "osteoporosis/animated.gif": (functools.partial(g.gif_animated, variant=18), "read", "", 200),
    "normal/exif_rotated.jpg": (functools.partial(g.jpeg_exif_rotated, variant=19), "read", "", 200),
    "osteoporosis/no_pixels.dcm": (
        functools.partial(g.dicom, pixel_data=False),
        "unreadable",
        "DICOM has no pixel data",
        422,
    ),
    "normal/mono1.dcm": (functools.partial(g.dicom, photometric="MONOCHROME1", variant=20), "read", "", 200),
    f"normal/{CAFE}": (functools.partial(g.png_grey8, variant=21), "read", "", 200),
    "osteoporosis/self_loop.png": (
        lambda p: os.symlink(p.name, p) or p,
        "unreadable",
        "Too many levels of symbolic links",
        None,
    ),
    "normal/loop": (lambda p: os.symlink("..", p, target_is_directory=True), "ignored", "", None),
}
GOOD_PER_CLASS = 10
TALLY: dict[str, Counter] = {}


def _main(argv) -> int:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    return exc.value.code


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return list(csv.DictReader(fh))


def _tally(interface: str, outcome: str) -> None:
    TALLY.setdefault(interface, Counter())[outcome] += 1


def _names(outcome: str) -> set[str]:
    return {k for k, v in CORPUS.items() if v[1] == outcome}


@pytest.fixture(scope="module")
def ws(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("bad")
    data = g.make_dataset(root / "data", n_per_class=GOOD_PER_CLASS, size=64).root
    good = {p.relative_to(data).as_posix() for p in data.rglob("*.png")}
    for rel, (write, *_rest) in CORPUS.items():
        write(data / rel)
    empty = g.make_dataset(root / "empty_class", n_per_class=4, size=64).root
    for p in (empty / "osteoporosis").iterdir():
        p.unlink()
    (empty / "osteoporosis" / "readme.txt").write_text("the scans are on the other disk")
    single = g.make_dataset(root / "single_class", n_per_class=4, size=64).root
    for p in (single / "normal").iterdir():
        p.unlink()
    (single / "normal").rmdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KNEEOSTEO_CACHE", str(root / "cache"))
        mp.setattr(audit_mod, "metadata_only_accuracy", functools.partial(metadata_only_accuracy, repeats=1))
        yield SimpleNamespace(
            root=root, data=data, good=good, readable=good | _names("read"), empty=empty, single=single
        )


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextmanager
def _warnings_logged():
    """The WARNING messages logged while the block runs (module fixtures have no caplog)."""
    handler, root = _Collect(), logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.messages
    finally:
        root.removeHandler(handler)


@pytest.fixture(scope="module")
def split_doc(ws):
    with _warnings_logged() as warned:
        assert (
            _main(["split", ws.data, "--out", ws.root / "split.json", "--test-size", "8", "--val-fraction", "0.2"]) == 0
        )
    doc = json.loads((ws.root / "split.json").read_text())
    doc["_warned"] = "\n".join(warned)  # what the command said, for the tally (not part of the file)
    return doc


@pytest.fixture(scope="module")
def run(ws, split_doc):
    """One epoch on the corpus, with a split that also names two files that do not exist."""
    doc = {
        **split_doc,
        "train": split_doc["train"] + ["normal/ghost.png"],
        "test": split_doc["test"] + ["osteoporosis/gone.png"],
    }
    (ws.root / "split_missing.json").write_text(json.dumps(doc))
    (ws.root / "cfg.toml").write_text('image_size = 64\ncopies = 1\nepochs = 1\nbatch_size = 8\ndevice = "cpu"\n')
    used: dict[str, list[str]] = {}
    real = trainer.prepare

    def recording(items, *a, label="", **kw):  # the files each partition's tensors were made from
        out = real(items, *a, label=label, **kw)
        used.setdefault(label, []).extend(out.paths)
        return out

    with pytest.MonkeyPatch.context() as mp, _warnings_logged() as warned:
        mp.setattr(trainer, "prepare", recording)
        code = _main(
            [
                "train",
                ws.data,
                "--split",
                ws.root / "split_missing.json",
                "--config",
                ws.root / "cfg.toml",
                "--out",
                ws.root / "run",
            ]
        )
    return SimpleNamespace(code=code, path=ws.root / "run", used=used, warned="\n".join(warned))


# --------------------------------------------------------------------------- the mixed folder


def test_audit_reports_every_bad_file_by_name_and_reads_the_rest(ws, caplog):
    assert _main(["audit", ws.data, "--out", ws.root / "audit"]) == 0
    warned = "\n".join(r.getMessage() for r in caplog.records)
    doc = json.loads((ws.root / "audit" / "audit.json").read_text())
    unreadable = {u["path"]: u["reason"] for u in doc["unreadable"]}
    skipped = {s["path"] for s in doc["skipped_not_images"]}
    assert doc["files_read"] == len(ws.readable)
    assert set(unreadable) == _names("unreadable") and skipped == _names("skipped")
    assert "loop/" not in warned + json.dumps(doc)  # the folder link is never followed
    for rel, (_, outcome, words, _) in CORPUS.items():
        if outcome == "unreadable":
            assert words in unreadable[rel], (rel, unreadable[rel])
        if outcome in ("unreadable", "skipped"):
            assert str(ws.data / rel) in warned, rel
        seen = (
            "reported by name with the reason"
            if rel in unreadable and str(ws.data / rel) in warned
            else "skipped with a warning"
            if rel in skipped and str(ws.data / rel) in warned
            else "not followed"
            if rel + "/" not in warned + json.dumps(doc) and not (ws.data / rel).is_file()
            else "read and counted"
        )
        _tally("audit", seen)


def test_split_uses_every_readable_file_and_warns_about_the_rest(ws, split_doc):
    parts = [p for k in ("train", "val", "test") for p in split_doc[k]]
    assert len(parts) == len(set(parts))
    assert set(parts) | {e["path"] for e in split_doc["excluded"]} == ws.readable
    assert split_doc["excluded"] == []  # every corpus picture is distinct
    warned = split_doc["_warned"]
    for rel, (_, outcome, *_rest) in CORPUS.items():
        inside = rel + "/"
        if rel in parts:
            seen = "assigned to a partition"
        elif str(ws.data / rel) in warned:
            seen = "left out, named in a warning"
        elif not any(p.startswith(inside) for p in parts) and inside not in warned:
            seen = "not followed"  # a folder link: nothing under it was used or mentioned
        else:
            seen = "left out silently"
        _tally("split", seen)
        expected = {"read": "assigned to a partition", "ignored": "not followed"}.get(
            outcome, "left out, named in a warning"
        )
        assert seen == expected, (rel, seen)


def test_train_on_the_corpus_with_missing_split_entries(ws, split_doc, run, caplog):
    assert run.code == 0
    metrics = json.loads((run.path / "metrics.json").read_text())
    preds = _rows(run.path / "predictions.csv")
    assert sorted(r["path"] for r in preds) == sorted(split_doc["test"])
    assert metrics["n"] == len(split_doc["test"])
    record = RunDir(run.path).config.record
    assert record["split_sizes"] == {k: len(split_doc[k]) for k in ("train", "val", "test")}  # ghosts dropped
    used = {p for paths in run.used.values() for p in paths}
    assert set(run.used) == {"train", "val", "test"} and used == set(
        split_doc["train"] + split_doc["val"] + split_doc["test"]
    )
    for rel, (_, outcome, *_rest) in CORPUS.items():
        seen = "trained or tested on" if rel in used else "not in the split"
        _tally("train", seen)
        assert seen == ("trained or tested on" if outcome == "read" else "not in the split"), rel
    # the warnings the run printed: the same loader, with the log captured here
    sets = load_split(ws.root / "split_missing.json", ws.data)
    assert sets.missing == ["normal/ghost.png", "osteoporosis/gone.png"]
    for name in sets.missing:
        assert f"split names {name}, which does not exist" in caplog.text
        said = f"split names {name}, which does not exist" in run.warned  # what the train command itself logged
        _tally(
            "train (split names a missing file)",
            "warning naming it; trained on the rest" if said and name not in used else "not warned or used",
        )


def test_predict_names_every_bad_file_and_predicts_the_rest(ws, run, tmp_path, capsys):
    files = [ws.data / rel for rel in sorted(CORPUS) if CORPUS[rel][1] != "ignored"]
    files += sorted(ws.data / rel for rel in ws.good)
    assert _main(["predict", "--run", run.path, *files, "--out", tmp_path / "p.csv"]) == 0
    err = capsys.readouterr().err.splitlines()
    rows = _rows(tmp_path / "p.csv")
    assert {Path(r["path"]).relative_to(ws.data).as_posix() for r in rows} == ws.readable
    assert all(0.0 <= float(r["probability"]) <= 1.0 for r in rows)
    reported = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in err if ": " in line}
    for rel, (_, outcome, words, _) in CORPUS.items():
        if outcome == "ignored":
            continue
        predicted = {r["path"] for r in rows}
        if outcome == "read":
            _tally("predict", "predicted" if str(ws.data / rel) in predicted else "missing")
            continue
        reason = reported[str(ws.data / rel)]
        if rel.endswith("self_loop.png"):  # pathlib's exists() swallows ELOOP: it may read as missing
            assert reason in ("no such file or directory", "cannot read file (Too many levels of symbolic links)")
        else:
            assert words in reason, (rel, reason)
        _tally("predict", "error line naming the file" if str(ws.data / rel) not in predicted else "predicted anyway")


def test_predict_over_a_folder_with_a_symlink_loop(ws, run, tmp_path, capsys):
    code = _main(["predict", "--run", run.path, ws.data / "osteoporosis", "--out", tmp_path / "p.csv"])
    assert code == 0
    assert len(_rows(tmp_path / "p.csv")) == sum(r.startswith("osteoporosis/") for r in ws.readable)
    assert "self_loop.png: cannot read file (Too many levels of symbolic links)" in capsys.readouterr().err


def test_web_api_answers_every_bad_upload_with_a_reason(ws, run):
    from fastapi.testclient import TestClient

    from kneeosteo.interfaces.web import WebSettings, create_app

    with TestClient(create_app(WebSettings(run=run.path, workers=1))) as client:
        for rel, (_, _outcome, words, status) in CORPUS.items():
            if status is None:  # a symlink is a file-system object, not something one uploads
                continue
            name = os.fsencode(Path(rel).name).decode("latin-1")  # what a browser would send
            r = client.post("/api/predict", files={"file": (name, (ws.data / rel).read_bytes())})
            assert r.status_code == status, (rel, r.status_code, r.text)
            if status == 200:
                assert 0.0 <= r.json()["probability"] <= 1.0
                _tally("web API", "200 with a probability")
            else:
                detail = r.json()["detail"]
                assert detail.startswith(f"{name}: "), detail
                if status == 422:
                    assert words in detail, (rel, detail)
                _tally("web API", f"{status} naming the upload, with the reason")


# --------------------------------------------------------------------------- wrong data sets


def test_a_class_folder_without_images(ws, tmp_path, capsys, caplog):
    assert _main(["audit", ws.empty, "--out", tmp_path / "audit"]) == 0
    assert "class folder 'osteoporosis' holds no readable image" in caplog.text
    capsys.readouterr()
    for argv in (
        ["split", ws.empty, "--out", tmp_path / "s.json"],
        ["train", ws.empty, "--config", ws.root / "cfg.toml", "--out", tmp_path / "run"],
    ):
        assert _main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "needs images in both classes" in err and str(ws.empty) in err, err
    _tally("class folder without images", "audit: warning; split/train: one-line error")


def test_a_single_class_data_set(ws, tmp_path, capsys):
    assert _main(["audit", ws.single, "--out", tmp_path / "audit"]) == 0
    assert json.loads((tmp_path / "audit" / "audit.json").read_text())["files_read"] == 4
    for argv in (
        ["split", ws.single, "--out", tmp_path / "s.json"],
        ["train", ws.single, "--config", ws.root / "cfg.toml", "--out", tmp_path / "run"],
    ):
        capsys.readouterr()
        assert _main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "expected exactly two class folders" in err, err
    _tally("single-class data set", "audit: counts; split/train: one-line error")


_HEADS = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"II*\x00", bytes(128) + b"DICM"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    files=st.lists(
        st.tuples(
            st.sampled_from(_HEADS),
            st.binary(max_size=512),
            st.sampled_from([".png", ".jpg", ".dcm", ".tif", ".txt", ""]),
        ),
        max_size=6,
    )
)
def test_random_bytes_through_the_scan_are_each_accounted_for_once(tmp_path_factory, files):
    """The reader's own fuzz test (test_reader.py) one level up: a data folder of random files
    never stops the scan, and every file ends up read, unreadable or skipped, exactly once."""
    root = tmp_path_factory.mktemp("fuzz")
    g.png_grey8(root / "normal" / "good.png")
    (root / "osteoporosis").mkdir()
    for i, (head, body, suffix) in enumerate(files):
        (root / ("normal", "osteoporosis")[i % 2] / f"f{i}{suffix}").write_bytes(head + body)
    scan = scan_dataset(root, use_cache=False, workers=1)
    seen = [r.path for r in scan.records] + [u["path"] for u in scan.unreadable] + [s["path"] for s in scan.skipped]
    assert sorted(seen) == sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# what each interface must have done with the corpus, from the table above (the tally itself is
# built from what the tests observed)
def _expected_tally() -> dict[str, Counter]:
    n = Counter(v[1] for v in CORPUS.values())
    bad = n["unreadable"] + n["skipped"]
    web = Counter(v[3] for v in CORPUS.values() if v[3] is not None)
    return {
        "audit": Counter(
            {
                "read and counted": n["read"],
                "reported by name with the reason": n["unreadable"],
                "skipped with a warning": n["skipped"],
                "not followed": n["ignored"],
            }
        ),
        "split": Counter(
            {"assigned to a partition": n["read"], "left out, named in a warning": bad, "not followed": n["ignored"]}
        ),
        "train": Counter({"trained or tested on": n["read"], "not in the split": bad + n["ignored"]}),
        "train (split names a missing file)": Counter({"warning naming it; trained on the rest": 2}),
        "predict": Counter({"predicted": n["read"], "error line naming the file": bad}),
        "web API": Counter(
            {
                ("200 with a probability" if code == 200 else f"{code} naming the upload, with the reason"): k
                for code, k in web.items()
            }
        ),
        "class folder without images": Counter({"audit: warning; split/train: one-line error": 1}),
        "single-class data set": Counter({"audit: counts; split/train: one-line error": 1}),
    }


def test_zz_the_tally_is_what_was_observed():
    """Runs last in this module (definition order). Every interface's tally, built from the
    outcomes the tests above captured, is the one the corpus table promises; it is printed for
    docs/reliability.md."""
    inputs = len(CORPUS) + 2 * GOOD_PER_CLASS
    print(f"\nbad-input corpus: {len(CORPUS)} bad files + {2 * GOOD_PER_CLASS} good ones = {inputs} inputs")
    for interface, counts in TALLY.items():
        print(f"  {interface}: " + ", ".join(f"{n} {what}" for what, n in counts.items()))
    assert TALLY == _expected_tally()
