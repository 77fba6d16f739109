"""Results in the PACS (issue 34): a live Orthanc with its DICOMweb plugin on 127.0.0.1, started
per module on free ports with a temporary storage folder and a password; `kneeosteo pacs`
against it with the session's tiny run. Skips without Orthanc, its DICOMweb plugin or
dciodvfy (fails under CI=true: .ci/run installs them)."""

from __future__ import annotations

import http.server
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import imagegen as g
import orthancrun
from conftest import require
from kneeosteo.errors import DataError
from kneeosteo.interfaces.cli import main

DCIODVFY = shutil.which("dciodvfy")
USER, PASSWORD = "radiology-ai", "pw-Zq81-never-printed"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A running Orthanc (tests/orthancrun.py): ``.url`` (its DICOMweb root), ``.rest``, ``.client``."""
    require(orthancrun.missing() is None, orthancrun.missing() or "")
    try:
        with orthancrun.running_orthanc(tmp_path_factory.mktemp("orthanc"), USER, PASSWORD) as server:
            yield server
    except RuntimeError as exc:  # it did not start: a failure, not a skip
        pytest.fail(str(exc))


@pytest.fixture
def creds(monkeypatch):
    monkeypatch.setenv("KNEEOSTEO_PACS_USER", USER)
    monkeypatch.setenv("KNEEOSTEO_PACS_PASSWORD", PASSWORD)


def _film(
    folder: Path,
    name: str,
    array: np.ndarray,
    study: str,
    series: str,
    body_part: str | None = "KNEE",
    patient: str = "PAT-34",
    modality: str = "DX",
) -> Path:
    import pydicom

    p = g.dicom(
        folder / f"{name}.dcm", bits=8, array=array, size=array.shape[::-1], patient_id=patient, study_uid=study
    )
    ds = pydicom.dcmread(p)
    ds.SeriesInstanceUID = series
    ds.PatientName = "Test^Knee"
    ds.Modality = modality
    if body_part:
        ds.BodyPartExamined = body_part
    ds.save_as(p, enforce_file_format=True)
    return p


def _upload(orthanc, paths) -> None:
    import pydicom

    orthanc.client.store_instances([pydicom.dcmread(p) for p in paths])


def _study(orthanc, tmp_path, tag: str, knee: int = 2, blank: int = 1, chest: int = 1):
    """A study in Orthanc: ``knee`` generated films in a KNEE DX series plus ``blank`` uniform
    ones (out of domain), and ``chest`` films in a CHEST series."""
    from pydicom.uid import generate_uid

    study, knee_series, chest_series = generate_uid(), generate_uid(), generate_uid()
    films = [
        _film(tmp_path / tag, f"knee{i}", g.dataset_image(i, ("normal", "osteoporosis")[i % 2]), study, knee_series)
        for i in range(knee)
    ]
    films += [
        _film(tmp_path / tag, f"blank{i}", np.full((64, 64), 90, np.uint8), study, knee_series) for i in range(blank)
    ]
    films += [
        _film(tmp_path / tag, f"chest{i}", g.dataset_image(10 + i, "normal"), study, chest_series, body_part="CHEST")
        for i in range(chest)
    ]
    _upload(orthanc, films)
    return SimpleNamespace(uid=study, knee_series=knee_series, chest_series=chest_series, films=films)


def _ours(orthanc, study: str) -> dict[str, list]:
    """The kneeosteo objects in ``study``: {"SR": [datasets], "OT": [...]}, read back over WADO-RS."""
    out: dict[str, list] = {"SR": [], "OT": []}
    for s in orthanc.client.search_for_series(study, fields=["Manufacturer"]):
        if s.get("00080070", {}).get("Value", [""])[0] != "kneeosteo":
            continue
        series = s["0020000E"]["Value"][0]
        for inst in orthanc.client.search_for_instances(study, series):
            ds = orthanc.client.retrieve_instance(study, series, inst["00080018"]["Value"][0])
            out[ds.Modality].append(ds)
    return out


def _dciodvfy_errors(ds, folder: Path) -> list[str]:
    require(DCIODVFY is not None, "dciodvfy is not installed (apt-get install dicom3tools)")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    res = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def round_trip(orthanc, tiny, tmp_path_factory):
    """One study pushed and one `kneeosteo pacs` pass over it (the run's outputs captured)."""
    tmp = tmp_path_factory.mktemp("pacs-rt")
    study = _study(orthanc, tmp, "rt")
    mp = pytest.MonkeyPatch()
    mp.setenv("KNEEOSTEO_PACS_USER", USER)
    mp.setenv("KNEEOSTEO_PACS_PASSWORD", PASSWORD)
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
            main(["pacs", orthanc.url, "--run", str(tiny.run), "--state", str(tmp / "state")])
    finally:
        mp.undo()
    return SimpleNamespace(
        study=study, code=exc.value.code, out=out.getvalue(), err=err.getvalue(), state=tmp / "state", tmp=tmp
    )


def test_the_pass_stores_an_sr_per_knee_film_and_a_map_per_in_domain_one(round_trip, orthanc, tiny):
    from kneeosteo.inference.dicom_out import read_sr
    from kneeosteo.run import RunDir

    rt = round_trip
    assert rt.code == 0, rt.err
    ours = _ours(orthanc, rt.study.uid)
    model_id = RunDir.open(tiny.run).model_id
    results = {r.source_sop_uid: r for r in map(read_sr, ours["SR"])}
    import pydicom

    sources = {pydicom.dcmread(p).SOPInstanceUID: p.stem for p in rt.study.films}
    knee = {uid for uid, stem in sources.items() if not stem.startswith("chest")}
    assert set(results) == knee  # one SR per knee film, none for the chest series
    for sr in ours["SR"]:  # the private coding scheme is declared
        assert [d.CodingSchemeDesignator for d in sr.CodingSchemeIdentificationSequence] == ["99KNEEOSTEO"]
    for uid, r in results.items():
        assert r.model_id == model_id
        if sources[uid].startswith("blank"):  # out of domain: says so, no finding, no probability
            assert r.status == "out_of_domain" and r.finding is None and r.probability is None
        else:
            assert r.status in ("ok", "uncertain") and r.finding in ("normal", "osteoporosis")
            assert 0.0 <= r.probability <= 1.0
    assert len(ours["OT"]) == 2  # heat maps of the two in-domain films only
    for sc in ours["OT"]:
        assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"] and sc.BurnedInAnnotation == "YES"
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in knee
    for ds in ours["SR"] + ours["OT"]:  # patient and study copied from the source, nothing invented
        assert ds.StudyInstanceUID == rt.study.uid and ds.PatientID == "PAT-34" and str(ds.PatientName) == "Test^Knee"
        assert not str(ds.get("PatientBirthDate", ""))
    uids = [ds.SOPInstanceUID for ds in ours["SR"] + ours["OT"]] + [
        ds.SeriesInstanceUID for ds in ours["SR"] + ours["OT"]
    ]
    assert len(set(uids)) == len(uids) and not set(uids) & set(sources)  # every UID new
    assert f"study {rt.study.uid} series {rt.study.chest_series}: body part CHEST, not a knee; skipped" in rt.err
    assert "3 films stored" in rt.out and "1 out of domain" in rt.out


def test_the_sr_read_back_from_orthanc_carries_probability_and_model_id(round_trip, orthanc, tiny):
    """Straight from Orthanc's DICOMweb metadata (not our reader): the numbers a viewer shows."""
    from kneeosteo.run import RunDir

    model_id = RunDir.open(tiny.run).model_id
    ours = _ours(orthanc, round_trip.study.uid)
    texts = []

    def walk(items):
        for it in items:
            name = it.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in it else ""
            if it.ValueType == "NUM":
                texts.append((name, float(it.MeasuredValueSequence[0].NumericValue)))
            elif it.ValueType == "TEXT":
                texts.append((name, str(it.TextValue)))
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    with_probability = 0
    for sr in ours["SR"]:
        texts.clear()
        walk(sr.ContentSequence)
        assert ("Algorithm Name", f"kneeosteo model {model_id}") in texts
        probs = [v for n, v in texts if n == "Calibrated probability of the positive class"]
        assert len(probs) <= 1 and all(0 <= p <= 1 for p in probs)
        with_probability += len(probs)
    assert with_probability == 2  # the two in-domain films; the out-of-domain one has none


def test_every_object_written_passes_dciodvfy(round_trip, orthanc):
    ours = _ours(orthanc, round_trip.study.uid)
    assert len(ours["SR"]) == 3 and len(ours["OT"]) == 2
    for ds in ours["SR"] + ours["OT"]:
        assert _dciodvfy_errors(ds, round_trip.tmp / "dciodvfy") == [], ds.SOPClassUID.name


def test_a_second_pass_stores_no_duplicate(round_trip, orthanc, tiny, creds, capsys):
    before = orthanc.rest("/statistics")["CountInstances"]
    code, out, err = _run(
        [
            "pacs",
            orthanc.url,
            "--run",
            str(tiny.run),
            "--state",
            str(round_trip.state),
            "--study",
            round_trip.study.uid,
        ],
        capsys,
    )
    assert code == 0, err
    assert orthanc.rest("/statistics")["CountInstances"] == before
    assert "0 films stored" in out and "3 already in the PACS" in out


def test_a_lost_state_folder_still_stores_no_duplicate(round_trip, orthanc, tiny, creds, capsys, tmp_path):
    """The PACS, not this machine's memory, says which films are done."""
    before = orthanc.rest("/statistics")["CountInstances"]
    code, out, err = _run(
        [
            "pacs",
            orthanc.url,
            "--run",
            str(tiny.run),
            "--state",
            str(tmp_path / "fresh"),
            "--study",
            round_trip.study.uid,
        ],
        capsys,
    )
    assert code == 0, err
    assert orthanc.rest("/statistics")["CountInstances"] == before


def test_the_password_appears_nowhere(round_trip):
    assert PASSWORD not in round_trip.out + round_trip.err
    for f in round_trip.state.rglob("*"):
        if f.is_file():
            assert PASSWORD.encode() not in f.read_bytes(), f


@pytest.mark.parametrize("failure", ["crash", "http500"])
def test_a_pass_stopped_halfway_loses_nothing_and_the_next_finishes(
    failure, orthanc, tiny, creds, capsys, tmp_path, monkeypatch
):
    """The SR STOW of the first film fails (a kill, or Orthanc answering 500) after its heat map
    was stored: the results wait in the outbox, and the next pass stores each film's SR and map
    exactly once."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    study = _study(orthanc, tmp_path, "crash", knee=2, blank=0, chest=0)
    real = DICOMwebClient.store_instances
    calls = []

    def flaky(self, datasets, *a, **kw):
        calls.append(datasets[0].Modality)
        if len(calls) == 2:  # the first film's SR, after its SC went in
            if failure == "crash":
                raise KeyboardInterrupt
            response = requests.Response()
            response.status_code, response.reason = 500, "Internal Server Error"
            raise requests.exceptions.HTTPError("500 Server Error", response=response)
        return real(self, datasets, *a, **kw)

    monkeypatch.setattr(DICOMwebClient, "store_instances", flaky)
    state = tmp_path / "state"
    args = ["pacs", orthanc.url, "--run", str(tiny.run), "--state", str(state), "--study", study.uid]
    code, out, err = _run(args, capsys)
    if failure == "crash":  # Ctrl-C (or a kill) in the middle of the STOW
        assert code == 130, err
    else:
        assert code == 1 and "answered HTTP 500" in err and "next pass sends them" in err and "Traceback" not in err
        assert PASSWORD not in out + err
    assert calls == ["OT", "SR"]
    assert len(_ours(orthanc, study.uid)["SR"]) == 0  # nothing claims the film is done
    monkeypatch.setattr(DICOMwebClient, "store_instances", real)
    code, out, err = _run(args, capsys)
    assert code == 0, err
    ours = _ours(orthanc, study.uid)
    assert len(ours["SR"]) == 2 and len(ours["OT"]) == 2, out + err  # the first film's map: stored once
    assert "1 from the outbox" in out
    assert not any((state / "outbox").rglob("*.dcm"))


def test_a_second_pass_on_the_same_state_while_one_runs_stops_with_one_line(orthanc, tiny, creds, capsys, tmp_path):
    import fcntl

    state = tmp_path / "state"
    state.mkdir()
    with open(state / ".lock", "w") as held:  # what a running pass holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, out, err = _run(["pacs", orthanc.url, "--run", str(tiny.run), "--state", str(state)], capsys)
    assert code == 1 and "another `kneeosteo pacs` pass is using" in err
    code, out, err = _run(
        ["pacs", orthanc.url, "--run", str(tiny.run), "--state", str(state), "--study", "1.2.3"], capsys
    )
    assert code == 0, err  # released: the next pass runs


def test_a_series_too_large_is_named_and_nothing_is_fetched(orthanc, tiny, creds, capsys, tmp_path):
    study = _study(orthanc, tmp_path, "huge", knee=3, blank=0, chest=0)
    code, out, err = _run(
        [
            "pacs",
            orthanc.url,
            "--run",
            str(tiny.run),
            "--state",
            str(tmp_path / "s"),
            "--max-instances",
            "2",
            "--study",
            study.uid,
        ],
        capsys,
    )
    assert code == 0, err
    assert f"series {study.knee_series}: 3 films, more than --max-instances 2" in err
    assert _ours(orthanc, study.uid) == {"SR": [], "OT": []}


def test_films_a_reference_or_the_reader_cannot_take_are_named_and_the_rest_goes_on(
    orthanc, tiny, creds, capsys, tmp_path
):
    """A film without SOPClassUID (Orthanc's REST API takes it, STOW-RS would not) and one that
    declares 60000 x 60000 pixels: each named, nothing stored for it, not even fetched for the
    second; the good film of the same series gets its SR."""
    import pydicom

    study = _study(orthanc, tmp_path, "bad", knee=1, blank=0, chest=0)
    names = {}
    for bad in ("no_class", "huge"):
        ds = pydicom.dcmread(study.films[0])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        if bad == "no_class":
            del ds.SOPClassUID
        else:
            ds.Rows = ds.Columns = 60000
        ds.save_as(tmp_path / f"{bad}.dcm", enforce_file_format=True)
        assert orthanc.upload((tmp_path / f"{bad}.dcm").read_bytes())["Status"] == "Success"
        names[bad] = ds.SOPInstanceUID
    code, out, err = _run(
        ["pacs", orthanc.url, "--run", str(tiny.run), "--state", str(tmp_path / "s"), "--study", study.uid], capsys
    )
    assert code == 0, err
    assert f"film {names['no_class']}: the DICOM lacks SOPClassUID" in err
    assert f"film {names['huge']}: declares 60000 x 60000 pixels" in err and "not fetched" in err
    assert "1 films stored" in out and "2 films and 0 series skipped" in out
    ours = _ours(orthanc, study.uid)
    assert len(ours["SR"]) == 1 and len(ours["OT"]) <= 1


def test_a_wrong_password_is_one_line(orthanc, tiny, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("KNEEOSTEO_PACS_USER", USER)
    monkeypatch.setenv("KNEEOSTEO_PACS_PASSWORD", "not-the-password")
    code, out, err = _run(["pacs", orthanc.url, "--run", str(tiny.run), "--state", str(tmp_path / "s")], capsys)
    assert code == 1 and "HTTP 401" in err and "check the credentials" in err and "not-the-password" not in err


def test_credentials_from_a_file_and_never_in_the_url(orthanc, tiny, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("KNEEOSTEO_PACS_USER", raising=False)
    monkeypatch.delenv("KNEEOSTEO_PACS_PASSWORD", raising=False)
    (tmp_path / "pacs.cred").write_text(f"{USER}:{PASSWORD}\n")
    code, out, err = _run(
        [
            "pacs",
            orthanc.url,
            "--run",
            str(tiny.run),
            "--state",
            str(tmp_path / "s"),
            "--credentials",
            str(tmp_path / "pacs.cred"),
            "--study",
            "1.2.3.4",
        ],
        capsys,
    )
    assert code == 0, err
    url = orthanc.url.replace("http://", f"http://{USER}:{PASSWORD}@")
    code, out, err = _run(["pacs", url, "--run", str(tiny.run)], capsys)
    assert code == 2 and "not in the URL" in err and PASSWORD not in err


def test_a_pacs_that_is_down_is_one_line(tiny, creds, capsys, tmp_path):
    code, out, err = _run(
        [
            "pacs",
            f"http://127.0.0.1:{orthancrun.free_port()}/dicom-web",
            "--run",
            str(tiny.run),
            "--state",
            str(tmp_path / "s"),
            "--timeout",
            "5",
        ],
        capsys,
    )
    assert code == 1 and "cannot reach it" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1


def test_a_pacs_that_never_answers_is_one_line_after_the_timeout(tiny, creds, capsys, tmp_path):
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        t0 = time.monotonic()
        code, out, err = _run(
            [
                "pacs",
                f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web",
                "--run",
                str(tiny.run),
                "--state",
                str(tmp_path / "s"),
                "--timeout",
                "0.5",
            ],
            capsys,
        )
    assert code == 1 and "no answer within --timeout 0.5 s" in err and "Traceback" not in err
    assert time.monotonic() - t0 < 30  # three tries of 0.5 s and two waits, plus loading the model


def test_a_pacs_answering_500_is_one_line_and_nothing_is_stored(tiny, creds, capsys, tmp_path):
    class Broken(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(500)
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code, out, err = _run(
            [
                "pacs",
                f"http://127.0.0.1:{server.server_address[1]}/dicom-web",
                "--run",
                str(tiny.run),
                "--state",
                str(tmp_path / "s"),
            ],
            capsys,
        )
    finally:
        server.shutdown()
    assert code == 1 and "answered HTTP 500" in err and "Traceback" not in err
    assert not any((tmp_path / "s").rglob("*.dcm"))


def test_a_film_without_the_tags_a_reference_needs_is_named(tmp_path):
    """The writers refuse it (one line naming what is missing); the pass names it and goes on
    (the same check, kneeosteo/interfaces/pacs.py)."""
    import pydicom

    from kneeosteo.inference.dicom_out import check_reference, new_uid, structured_report
    from kneeosteo.run import RunDir
    from kneeosteo.trust import TrustedPrediction

    ds = pydicom.dcmread(g.dicom(tmp_path / "f.dcm", bits=8))  # no StudyInstanceUID, no SeriesInstanceUID
    with pytest.raises(DataError, match="lacks StudyInstanceUID, SeriesInstanceUID"):
        check_reference(ds, "f.dcm")
    t = TrustedPrediction("ok", 0.7, 0.6, "osteoporosis", ("osteoporosis",), float("nan"), float("nan"))
    with pytest.raises(DataError, match="nothing was written"):
        structured_report(ds, t, RunDir.bundled().info, 0.5, series_uid=new_uid(), sop_uid=new_uid())


def test_predict_dicom_out_writes_an_sr_per_dicom_film_with_the_csv_numbers(tiny, capsys, tmp_path):
    """`predict --dicom-out`: the SR carries the CSV row's probability; a heat map for the in-domain
    film only; a PNG is named (no patient or study to report into); everything passes dciodvfy."""
    import csv

    import pydicom
    from pydicom.uid import generate_uid

    from kneeosteo.inference.dicom_out import read_sr

    study = generate_uid()
    good = _film(tmp_path / "in", "good", g.dataset_image(3, "osteoporosis"), study, generate_uid())
    blank = _film(tmp_path / "in", "blank", np.full((64, 64), 90, np.uint8), study, generate_uid())
    png = g.png_grey8(tmp_path / "in" / "plain.png", array=g.dataset_image(4, "normal"))
    code, out, err = _run(
        [
            "predict",
            str(good),
            str(blank),
            str(png),
            "--run",
            str(tiny.run),
            "--out",
            str(tmp_path / "preds.csv"),
            "--dicom-out",
            str(tmp_path / "dcm"),
            "--threshold",
            "0.3",
        ],
        capsys,
    )
    assert code == 0, err
    assert f"{png}: not a DICOM file" in err
    rows = {Path(r["path"]).stem: r for r in csv.DictReader(open(tmp_path / "preds.csv"))}
    uid = {name: pydicom.dcmread(p).SOPInstanceUID for name, p in (("good", good), ("blank", blank))}
    assert sorted(p.name for p in (tmp_path / "dcm").iterdir()) == sorted(
        [f"{uid['good']}.sr.dcm", f"{uid['good']}.sc.dcm", f"{uid['blank']}.sr.dcm"]
    )
    sr = read_sr(pydicom.dcmread(tmp_path / "dcm" / f"{uid['good']}.sr.dcm"))
    assert sr.source_sop_uid == uid["good"] and sr.status == rows["good"]["status"]
    assert abs(sr.probability - float(rows["good"]["probability"])) < 1e-6
    nums = {}

    def walk(items):
        for it in items:
            if it.ValueType == "NUM":
                nums[it.ConceptNameCodeSequence[0].CodeMeaning] = float(it.MeasuredValueSequence[0].NumericValue)
            walk(it.get("ContentSequence", []))

    walk(pydicom.dcmread(tmp_path / "dcm" / f"{uid['good']}.sr.dcm").ContentSequence)
    assert nums["Decision threshold on the probability"] == 0.3 == float(rows["good"]["threshold"])
    assert abs(nums["Uncalibrated model probability"] - float(rows["good"]["raw_probability"])) < 1e-6
    ood = read_sr(pydicom.dcmread(tmp_path / "dcm" / f"{uid['blank']}.sr.dcm"))
    assert rows["blank"]["status"] == ood.status == "out_of_domain" and ood.probability is None
    for f in (tmp_path / "dcm").iterdir():
        assert _dciodvfy_errors(pydicom.dcmread(f), tmp_path / "v") == [], f.name


@pytest.mark.parametrize("module", ["highdicom", "dicomweb_client"])
def test_without_the_pacs_extra_it_is_one_line(module, tiny, capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    code, out, err = _run(
        ["pacs", "http://127.0.0.1:9/dicom-web", "--run", str(tiny.run), "--state", str(tmp_path / "s")], capsys
    )
    assert code == 1 and "pip install 'kneeosteo[pacs]'" in err and "Traceback" not in err
    if module == "highdicom":
        png = g.png_grey8(tmp_path / "a.png")
        code, out, err = _run(["predict", str(png), "--dicom-out", str(tmp_path / "d")], capsys)
        assert code == 1 and "pip install 'kneeosteo[pacs]'" in err


def test_a_long_model_id_survives_the_sr_whole(tmp_path):
    """A later pass recognises its own SRs by the model id in them: a long run-folder name must
    not be cut (SH/LO limits apply to codes and descriptions, not to the SR's TEXT items)."""
    from dataclasses import replace

    import pydicom
    from pydicom.uid import generate_uid

    from kneeosteo.inference.dicom_out import new_uid, read_sr, structured_report
    from kneeosteo.run import RunDir
    from kneeosteo.trust import TrustedPrediction

    info = replace(
        RunDir.bundled().info,
        model_id="a-site-calibrated-run-folder-with-a-long-descriptive-name-" * 2 + "0123456789ab",
    )
    src = pydicom.dcmread(_film(tmp_path, "f", g.dataset_image(0, "normal"), generate_uid(), generate_uid()))
    t = TrustedPrediction("ok", 0.7, 0.6, "osteoporosis", ("osteoporosis",), float("nan"), float("nan"))
    sr = structured_report(src, t, info, 0.5, series_uid=new_uid(), sop_uid=new_uid())
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    back = read_sr(pydicom.dcmread(tmp_path / "sr.dcm"))
    assert back.model_id == info.model_id and back.source_sop_uid == src.SOPInstanceUID
    assert _dciodvfy_errors(pydicom.dcmread(tmp_path / "sr.dcm"), tmp_path / "v") == []


# --------------------------------------------------------------------------- --dicom-manifest

PATIENTS = {  # the manifest's rows for the non-DICOM films: every value copied exactly, or empty
    "knee": {
        "PatientID": "MRN-0042",
        "PatientName": "Doe^Jane^Q",
        "PatientBirthDate": "19580214",
        "PatientSex": "F",
        "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.11111111111111111111",
        "AccessionNumber": "ACC-77",
        "StudyDate": "20260301",
        "StudyTime": "093015",
        "Laterality": "L",
    },
    "second": {  # the same study; optional values left blank stay empty, never filled in
        "PatientID": "MRN-0042",
        "PatientName": "Doe^Jane^Q",
        "PatientBirthDate": "",
        "PatientSex": "",
        "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.11111111111111111111",
        "AccessionNumber": "",
        "StudyDate": "",
        "StudyTime": "",
        "Laterality": "",
    },
    "blank": {
        "PatientID": "MRN-0099",
        "PatientName": "Roe^Richard",
        "PatientBirthDate": "19700101",
        "PatientSex": "M",
        "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.22222222222222222222",
        "AccessionNumber": "ACC-78",
        "StudyDate": "20260302",
        "StudyTime": "",
        "Laterality": "R",
    },
    "bad": {  # an impossible birth date: the film is named and skipped, nothing guessed
        "PatientID": "MRN-0100",
        "PatientName": "Poe^Edgar",
        "PatientBirthDate": "19901301",
        "PatientSex": "M",
        "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.33333333333333333333",
        "AccessionNumber": "",
        "StudyDate": "",
        "StudyTime": "",
        "Laterality": "",
    },
}


def _write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def from_manifest(tiny, tmp_path_factory):
    """`predict --dicom-out --dicom-manifest` over a grey PNG, a JPEG of the same study, a uniform
    PNG (out of domain), a PNG whose row is invalid, a PNG not in the manifest, and a DICOM film."""
    import contextlib
    import io

    from PIL import Image
    from pydicom.uid import generate_uid

    tmp = tmp_path_factory.mktemp("manifest")
    films = {
        "knee": g.png_grey8(tmp / "in" / "knee.png", array=g.dataset_image(3, "osteoporosis")),
        "second": tmp / "in" / "second.jpg",
        "blank": g.png_grey8(tmp / "in" / "blank.png", array=np.full((64, 64), 90, np.uint8)),
        "bad": g.png_grey8(tmp / "in" / "bad.png", array=g.dataset_image(5, "normal")),
        "missing": g.png_grey8(tmp / "in" / "missing.png", array=g.dataset_image(6, "normal")),
    }
    Image.fromarray(g.dataset_image(4, "normal")).save(films["second"], format="JPEG", quality=95)
    dicom = _film(tmp / "in", "film", g.dataset_image(7, "osteoporosis"), generate_uid(), generate_uid())
    # relative paths, from the manifest's folder; extra columns are ignored
    rows = [{"path": f"in/{films[k].name}", "note": "x", **v} for k, v in PATIENTS.items()]
    # a DICOM input keeps its own patient and study: its row here is not read
    rows.append({**rows[0], "path": f"in/{dicom.name}", "PatientID": "NOT-THE-DICOM-ONE"})
    manifest = _write_manifest(tmp / "patients.csv", rows)
    args = ["predict", *map(str, films.values()), str(dicom), "--run", str(tiny.run)]
    args += ["--out", str(tmp / "preds.csv"), "--dicom-out", str(tmp / "dcm"), "--dicom-manifest", str(manifest)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        main(args)
    return SimpleNamespace(
        tmp=tmp,
        films=films,
        dicom=dicom,
        manifest=manifest,
        code=exc.value.code,
        out=out.getvalue(),
        err=err.getvalue(),
    )


def _objects(folder: Path) -> dict[str, list]:
    import pydicom

    out: dict[str, list] = {"image": [], "sr": [], "sc": []}
    for f in sorted(folder.iterdir()):
        out[f.name.split(".")[-2]].append(pydicom.dcmread(f))
    return out


def test_a_film_from_a_manifest_gets_its_image_an_sr_referencing_it_and_a_map(from_manifest):
    """Known answers: each listed film becomes a Secondary Capture holding its pixels exactly (8 bit
    to 16: x257), with the manifest's patient and study copied exactly (blank ones empty), derived
    and marked research use; the SR and the map reference that image's SOP Instance UID and carry
    the same patient and study; the SR holds the CSV row's probability."""
    import csv

    import pydicom
    from PIL import Image

    from kneeosteo.inference.dicom_out import RESEARCH_USE, read_sr

    m = from_manifest
    assert m.code == 0, m.err
    objs = _objects(m.tmp / "dcm")
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(m.tmp / "preds.csv"))}
    src_dicom = pydicom.dcmread(m.dicom)
    wrapped = objs["image"]
    assert len(wrapped) == 3  # knee, second, blank; not bad, missing, nor the DICOM film
    by_uid = {ds.SOPInstanceUID: ds for ds in wrapped}
    srs = {read_sr(ds).source_sop_uid: ds for ds in objs["sr"]}
    scs = {ds.SourceImageSequence[0].ReferencedSOPInstanceUID: ds for ds in objs["sc"]}
    # every wrapped image has its SR; the DICOM film keeps its own (its UID, its patient)
    assert set(srs) == set(by_uid) | {src_dicom.SOPInstanceUID}
    own = srs[src_dicom.SOPInstanceUID]
    assert (own.PatientID, own.StudyInstanceUID) == (src_dicom.PatientID, src_dicom.StudyInstanceUID)
    seen_names = set()
    for ds in wrapped:
        name = next(
            k
            for k, v in PATIENTS.items()
            if k != "bad"
            and ds.PatientID == v["PatientID"]
            and str(ds.get("AccessionNumber", "")) == v["AccessionNumber"]
        )
        seen_names.add(name)
        want = PATIENTS[name]
        film = np.asarray(Image.open(m.films[name]).convert("L"))
        assert ds.pixel_array.dtype == np.uint16 and np.array_equal(ds.pixel_array, film.astype(np.uint16) * 257)
        assert ds.Modality == "OT" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] and "research use only" in ds.SeriesDescription
        assert RESEARCH_USE in ds.DerivationDescription
        sr = srs[ds.SOPInstanceUID]
        row = rows[m.films[name].name]
        assert read_sr(sr).status == row["status"]
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
        assert evidence.SeriesInstanceUID == ds.SeriesInstanceUID
        copies = [ds, sr] + ([scs[ds.SOPInstanceUID]] if ds.SOPInstanceUID in scs else [])
        for obj in copies:
            for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID"):
                assert str(obj.get(keyword, "") or "") == want[keyword], (name, obj.Modality, keyword)
            for keyword in ("AccessionNumber", "StudyDate", "StudyTime"):
                assert keyword in obj and str(obj.get(keyword) or "") == want[keyword], (name, obj.Modality, keyword)
        assert str(ds.Laterality or "") == want["Laterality"]
        if row["status"] == "out_of_domain":
            assert ds.SOPInstanceUID not in scs and read_sr(sr).probability is None
        else:
            assert abs(read_sr(sr).probability - float(row["probability"])) < 1e-6
            assert ds.SOPInstanceUID in scs
    assert seen_names == {"knee", "second", "blank"}
    assert rows["blank.png"]["status"] == "out_of_domain" and rows["knee.png"]["status"] != "out_of_domain"
    made = [m.films[k].name for k in ("knee", "second", "blank")] + [m.dicom.name]
    assert len(objs["sc"]) == sum(rows[n]["status"] != "out_of_domain" for n in made)


def test_every_object_has_new_uids(from_manifest):
    """Series and SOP instance UIDs are new and never reused: all distinct, none the manifest's
    study UID or the DICOM film's; the two films of one study share the study, not a series."""
    import pydicom

    objs = [ds for group in _objects(from_manifest.tmp / "dcm").values() for ds in group]
    src = pydicom.dcmread(from_manifest.dicom)
    studies = {v["StudyInstanceUID"] for v in PATIENTS.values()} | {src.StudyInstanceUID}
    uids = [ds.SOPInstanceUID for ds in objs] + [ds.SeriesInstanceUID for ds in objs]
    assert len(set(uids)) == len(uids) == 2 * len(objs)
    assert not set(uids) & (studies | {src.SOPInstanceUID, src.SeriesInstanceUID})
    same_study = [ds for ds in objs if ds.StudyInstanceUID == PATIENTS["knee"]["StudyInstanceUID"]]
    assert len({ds.SeriesInstanceUID for ds in same_study}) == len(same_study) >= 4


def test_a_bad_row_and_a_film_missing_from_the_manifest_are_named_and_get_nothing(from_manifest):
    m = from_manifest
    lines = m.err.splitlines()
    assert (
        f"{m.manifest} row 5 ({m.films['bad']}): PatientBirthDate '19901301' is not a date YYYYMMDD; "
        "no DICOM output for it" in lines
    )
    assert f"{m.films['missing']}: not a DICOM file and not in the --dicom-manifest; no DICOM output" in lines
    patients = {ds.PatientID for group in _objects(m.tmp / "dcm").values() for ds in group}
    assert PATIENTS["bad"]["PatientID"] not in patients and "Traceback" not in m.err
    assert len(patients) == 3  # the manifest's two patients and the DICOM film's; no empty or invented one


def test_every_object_from_a_manifest_passes_dciodvfy(from_manifest):
    for kind, group in _objects(from_manifest.tmp / "dcm").items():
        for ds in group:
            assert _dciodvfy_errors(ds, from_manifest.tmp / "dciodvfy") == [], (kind, ds.PatientID)


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"PatientID": ""}, "PatientID is empty"),
        ({"PatientName": "  "}, "PatientName is empty"),
        ({"StudyInstanceUID": "1.2.03.x"}, "StudyInstanceUID '1.2.03.x' is not a valid DICOM UID"),
        ({"PatientSex": "female"}, "PatientSex 'female' is not M, F or O"),
        ({"StudyDate": "2026-03-01"}, "StudyDate '2026-03-01' is not a date YYYYMMDD"),
        ({"StudyTime": "256000"}, "StudyTime '256000' is not a time HHMMSS"),
        ({"AccessionNumber": "A" * 17}, "AccessionNumber '" + "A" * 17 + "' longer than 16 characters"),
        ({"PatientID": "a\\b"}, "holds a backslash"),
        ({"Laterality": "B"}, "Laterality 'B' is not R or L"),
    ],
)
def test_the_manifest_names_each_invalid_value_with_its_row(tmp_path, change, problem):
    from kneeosteo.inference.dicom_out import manifest_key, read_dicom_manifest

    good = {"path": "ok.png", **PATIENTS["knee"]}
    rows = [good, {**good, "path": "sub/b.png", **change}]
    table = read_dicom_manifest(_write_manifest(tmp_path / "p.csv", rows))
    assert table[manifest_key(tmp_path / "ok.png")].problem is None
    assert table[manifest_key(tmp_path / "ok.png")].values["PatientName"] == "Doe^Jane^Q"
    bad = table[manifest_key(tmp_path / "sub" / "b.png")]
    assert bad.where == f"{tmp_path / 'p.csv'} row 3" and problem in bad.problem and bad.values == {}


def test_two_rows_for_one_film_skip_it(tmp_path):
    from kneeosteo.inference.dicom_out import manifest_key, read_dicom_manifest

    rows = [{"path": "a.png", **PATIENTS["knee"]}, {"path": str(tmp_path / "a.png"), **PATIENTS["blank"]}]
    row = read_dicom_manifest(_write_manifest(tmp_path / "p.csv", rows))[manifest_key(tmp_path / "a.png")]
    assert row.where.endswith("rows 2 and 3") and "two rows for one film" in row.problem


def test_a_manifest_without_a_required_column_or_without_dicom_out_is_one_line(tiny, capsys, tmp_path):
    png = g.png_grey8(tmp_path / "a.png", array=g.dataset_image(3, "normal"))
    rows = [{"path": "a.png", **{k: v for k, v in PATIENTS["knee"].items() if k != "StudyInstanceUID"}}]
    manifest = _write_manifest(tmp_path / "p.csv", rows)
    code, out, err = _run(
        [
            "predict",
            str(png),
            "--run",
            str(tiny.run),
            "--dicom-out",
            str(tmp_path / "d"),
            "--dicom-manifest",
            str(manifest),
        ],
        capsys,
    )
    assert code == 1 and "no StudyInstanceUID column, which the DICOM manifest needs" in err
    assert len(err.strip().splitlines()) == 1 and not out
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())  # refused before the images
    code, out, err = _run(["predict", str(png), "--run", str(tiny.run), "--dicom-manifest", str(manifest)], capsys)
    assert code == 2 and "--dicom-manifest" in err and "--dicom-out" in err
