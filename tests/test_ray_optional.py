"""Ray stays optional: without it `--ray` is one line naming the extra; `--ray`'s address is
checked; manifests and the streaming writers work with or without Ray."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import require
from kneeosteo.errors import ConfigError
from kneeosteo.interfaces.cli import main, ray_flag


@pytest.mark.parametrize(
    "args", [["predict", "IMG", "--ray", "--out", "p.parquet"], ["reproduce", "DATA", "--ray", "--out", "OUT"]]
)
def test_ray_missing_is_one_line_naming_the_extra(args, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as when not installed
    args = [str(tmp_path / a) if a in ("IMG", "DATA", "OUT") else a for a in args]
    (tmp_path / "IMG").write_bytes(b"")
    (tmp_path / "DATA").mkdir()
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and len(err.splitlines()) == 1
    assert "pip install 'kneeosteo[ray]'" in err


def test_bare_ray_means_a_local_instance_and_a_folder_is_not_an_address():
    assert ray_flag(["predict", "in/", "--ray"]) == ["predict", "in/", "--ray=local"]
    assert ray_flag(["predict", "--ray", "in/", "--out", "p.csv"]) == [
        "predict",
        "--ray=local",
        "in/",
        "--out",
        "p.csv",
    ]
    assert ray_flag(["predict", "in/", "--ray", "--out", "p.csv"])[2] == "--ray=local"
    assert ray_flag(["reproduce", "d", "--ray", "head:6379"]) == ["reproduce", "d", "--ray", "head:6379"]
    assert ray_flag(["reproduce", "d", "--ray", "auto"])[2:] == ["--ray", "auto"]


def test_a_bad_address_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", str(tmp_path), "--out", str(tmp_path / "o"), "--ray=http://x"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "not a Ray address" in err


def test_predict_ray_refuses_json_output(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(tmp_path), "--ray", "--out", str(tmp_path / "p.json")])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err


def test_manifest_entries_are_read_like_command_line_files(tmp_path):
    from kneeosteo.inference.inputs import collect_inputs

    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.png").write_bytes(b"x")
    (tmp_path / "list.csv").write_text(f"id,path\n1,a.png\n2,{tmp_path / 'd'}\n3,gone.png\n")
    files, errors = collect_inputs([tmp_path / "list.csv", tmp_path / "a.png"])  # a.png twice: read once
    assert files == [tmp_path / "a.png", tmp_path / "d" / "b.png"]
    assert [(e.path, e.reason) for e in errors] == [(str(tmp_path / "gone.png"), "no such file or directory")]
    (tmp_path / "empty.csv").write_text("")
    assert [e.reason for e in collect_inputs([tmp_path / "empty.csv"])[1]] == ["manifest lists no files"]


def _predictions(n: int):
    from kneeosteo.inference.predictor import Prediction

    return [
        Prediction(
            f"img{i}.png",
            f"{i:064x}",
            "ok",
            i / n,
            i / n,
            "normal",
            ("normal",) if i % 2 else (),
            None if i % 3 else 1.5,
            None if i % 3 else 2.0,
            bool(i % 2),
            0.5,
            "m",
        )
        for i in range(n)
    ]


def test_parquet_writer_shards_and_reads_back_every_row(tmp_path):
    require(importlib.util.find_spec("pyarrow") is not None, "pyarrow is not installed: pip install 'kneeosteo[ray]'")
    import pyarrow.parquet as pq

    from kneeosteo.inference.output import PredictionWriter

    rows = _predictions(23)
    out = tmp_path / "p.parquet"
    for _ in range(2):  # the second run replaces the first
        with PredictionWriter(out, shard_rows=10) as w:
            for i in range(0, 23, 4):
                w.write(rows[i : i + 4])
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    t = pq.read_table(out).to_pylist()
    assert [r["path"] for r in t] == [p.path for p in rows]
    assert [r["domain_score"] for r in t] == [p.domain_score for p in rows]
    assert [tuple(r["prediction_set"]) for r in t] == [p.prediction_set for p in rows]
    assert not list(tmp_path.glob(".*"))  # no temporaries left


def test_a_failed_stream_leaves_the_previous_output(tmp_path):
    from kneeosteo.inference.output import PredictionWriter

    out = tmp_path / "p.csv"
    with PredictionWriter(out) as w:
        w.write(_predictions(3))
    before = out.read_bytes()
    with pytest.raises(RuntimeError):
        with PredictionWriter(out) as w:
            w.write(_predictions(5))
            raise RuntimeError("worker lost")
    assert out.read_bytes() == before and not list(tmp_path.glob(".*"))


def test_address_check():
    from kneeosteo.utils.ray_cluster import check_address

    assert check_address(None) == "local"
    for good in ("auto", "10.0.0.1:6379", "ray://head:10001"):
        assert check_address(good) == good
    for bad in ("in/", "http://x:1", "head"):
        with pytest.raises(ConfigError):
            check_address(bad)
