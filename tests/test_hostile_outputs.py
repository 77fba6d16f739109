"""Hostile pass on outputs and new surfaces (issue 28): each test failed on the code before its fix.

Never destroy what we did not create: an ``--out`` that exists and is not an output of ours is
refused before any work, an output that is also an input is refused, new folders get the user's
usual permissions; optional dependencies are checked before work starts."""

from __future__ import annotations

import importlib.util
import stat
import sys

import pytest

import imagegen as g
from conftest import require
from kneeosteo.interfaces.cli import main


def _main(argv) -> int:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    return exc.value.code


def _pyarrow():
    require(importlib.util.find_spec("pyarrow") is not None, "pyarrow is not installed: pip install 'kneeosteo[ray]'")


def _rows(n: int):
    from kneeosteo.inference.predictor import Prediction

    return [
        Prediction(f"img{i}.png", f"{i:064x}", "ok", 0.2, 0.2, "normal", ("normal",), 1.0, 2.0, True, 0.5, "m")
        for i in range(n)
    ]


# -- row 1: an output path that exists and is not ours is refused, never deleted -------------------


def test_an_input_folder_named_like_the_output_is_refused_and_kept(tmp_path, capsys):
    folder = tmp_path / "f.parquet"
    folder.mkdir()
    a, b = g.png_grey8(folder / "a.png"), g.jpeg_grey(folder / "b.jpeg")
    assert _main(["predict", folder, "--out", folder]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "is also an input" in err
    assert a.is_file() and b.is_file()


@pytest.mark.parametrize("name", ["keep.parquet", "keep.csv", "keep.json"])
def test_an_existing_folder_of_the_users_is_refused_before_any_work(tmp_path, capsys, name):
    out = tmp_path / name
    (out / "sub").mkdir(parents=True)
    (out / "sentinel.txt").write_text("mine")
    img = g.png_grey8(tmp_path / "x.png")
    assert _main(["predict", img, "--out", out]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "exists and is" in err and "nothing was changed" in err
    assert (out / "sentinel.txt").read_text() == "mine" and (out / "sub").is_dir()


@pytest.mark.parametrize(
    "name, text", [("notes.csv", "patient,comment\n1,keep me\n"), ("notes.json", '{"mine": true}\n')]
)
def test_a_file_of_the_users_is_refused_and_kept(tmp_path, capsys, name, text):
    out = tmp_path / name
    out.write_text(text)
    assert _main(["predict", g.png_grey8(tmp_path / "x.png"), "--out", out]) == 1
    assert "not a" in capsys.readouterr().err and out.read_text() == text


def test_a_manifest_that_is_also_the_output_is_refused(tmp_path, capsys):
    g.png_grey8(tmp_path / "x.png")
    manifest = tmp_path / "list.csv"
    manifest.write_text("path\nx.png\n")
    assert _main(["predict", manifest, "--out", manifest]) == 1
    assert "is also an input" in capsys.readouterr().err and manifest.read_text() == "path\nx.png\n"


def test_the_writer_refuses_a_foreign_folder_even_when_it_appears_during_the_run(tmp_path):
    _pyarrow()
    from kneeosteo.errors import OutputError
    from kneeosteo.inference.output import PredictionWriter

    out = tmp_path / "p.parquet"
    with pytest.raises(OutputError):
        with PredictionWriter(out) as w:
            w.write(_rows(3))
            out.mkdir()
            (out / "thesis.docx").write_text("years of work")
    assert (out / "thesis.docx").read_text() == "years of work"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_our_own_outputs_are_still_replaced_with_the_usual_permissions(tmp_path):
    _pyarrow()
    import pyarrow.parquet as pq

    from kneeosteo.inference.output import PredictionWriter, write_predictions
    from kneeosteo.inference.predictor import PredictionResult
    from kneeosteo.utils.atomic import new_file_mode, new_folder_mode

    out = tmp_path / "p.parquet"
    for n in (5, 2):  # the second run replaces the first (our own part files)
        with PredictionWriter(out, shard_rows=2) as w:
            w.write(_rows(n))
    assert pq.read_table(out).num_rows == 2 and [p.name for p in out.iterdir()] == ["part-00000.parquet"]
    assert stat.S_IMODE(out.stat().st_mode) == new_folder_mode() != 0o700
    assert stat.S_IMODE((out / "part-00000.parquet").stat().st_mode) == new_file_mode()
    for name in ("p.csv", "p.json"):
        for _ in range(2):
            write_predictions(PredictionResult(_rows(2), []), tmp_path / name)
    (tmp_path / "empty.csv").touch()  # an empty file holds nothing to lose
    write_predictions(PredictionResult(_rows(1), []), tmp_path / "empty.csv")
    assert (tmp_path / "empty.csv").read_text().startswith("path,content_id,")


# -- row 11: an optional dependency is checked before work starts ----------------------------------


def test_parquet_without_pyarrow_is_refused_before_the_model_is_loaded(tmp_path, capsys, monkeypatch):
    from kneeosteo.inference import Predictor

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError, as when not installed
    monkeypatch.setattr(Predictor, "__init__", lambda *a, **k: pytest.fail("the model was loaded first"))
    assert _main(["predict", g.png_grey8(tmp_path / "x.png"), "--out", tmp_path / "p.parquet"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "needs pyarrow" in err


# -- row 10: a regression run's JSON is JSON -------------------------------------------------------


def test_predict_json_has_no_nan_or_infinity(tmp_path):
    import json

    from kneeosteo.inference.output import write_predictions
    from kneeosteo.inference.predictor import Prediction, PredictionResult

    nan, inf = float("nan"), float("inf")
    row = Prediction(
        "a.png",
        "0" * 64,
        "ok",
        nan,
        nan,
        "osteopenia",
        (),
        None,
        None,
        True,
        0.5,
        "m",
        probabilities={"normal": nan},
        value=-1.7,
        interval_low=-inf,
        interval_high=inf,
    )
    out = write_predictions(PredictionResult([row]), tmp_path / "p.json")

    def strict(name):
        raise ValueError(f"not JSON: {name}")

    got = json.loads(out.read_text(), parse_constant=strict)["predictions"][0]
    assert (got["probability"], got["raw_probability"], got["interval_low"], got["interval_high"]) == (None,) * 4
    assert got["probabilities"] == {"normal": None} and got["value"] == -1.7
