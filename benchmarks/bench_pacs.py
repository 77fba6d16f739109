"""Results in the PACS (issue 34): films per minute from Orthanc to a stored SR, and what writing
DICOM costs against writing CSV.

    python benchmarks/bench_pacs.py [--films 20] [--run RUN] [--data KOP] [--out docs/results/benchmarks/pacs.json]

1. **Orthanc -> stored SR**: ``--films`` knee films (KOP's, each wrapped in a DX DICOM with its
   own study, when ``--data`` or ../shared/datasets/kop is there; else generated 1024 x 1024
   films) are stored in a fresh Orthanc (tests/orthancrun.py: Debian's orthanc + orthanc-dicomweb);
   then one timed ``kneeosteo pacs`` pass (QIDO, WADO, the reader, the verdict, Grad-CAM for
   in-domain films, SR and SC, STOW) over them, with the model already loaded. films/min =
   films / wall * 60; the share of out-of-domain films (no map, so cheaper) is recorded too.
2. **DICOM against CSV**, per film, on the same films read from disk: the verdict and its CSV row
   (what ``predict --out preds.csv`` does) against the verdict plus Grad-CAM, the heat map, the SC
   and the SR written to files (what each film costs ``pacs`` beyond the network).

The model is the bundled one unless ``--run``. Timings mean something on an idle machine only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_pacs.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks.common import REPO, TESTS, imagegen, section, write_results  # noqa: E402

KOP = (REPO / ".." / "shared" / "datasets" / "kop").resolve()


def make_films(folder: Path, n: int, data: Path | None) -> list[Path]:
    """``n`` DX knee films, one study each (KOP's pixels when ``data`` is there)."""
    from pydicom.uid import generate_uid

    from kneeosteo.data.reader import IMAGE_SUFFIXES, read_image, to_uint8

    g = imagegen()
    sources = sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[::7][:n] if data else []
    films = []
    for i in range(n):
        if i < len(sources):
            a = to_uint8(read_image(sources[i]).pixels)
        else:
            a = np.rint(np.clip(g.picture(1024, 1024, variant=i), 0, 1) * 255).astype(np.uint8)
        p = g.dicom(
            folder / f"film{i:03d}.dcm",
            bits=8,
            array=a,
            size=a.shape[::-1],
            patient_id=f"BENCH{i:03d}",
            study_uid=generate_uid(),
        )
        import pydicom

        ds = pydicom.dcmread(p)
        ds.SeriesInstanceUID, ds.BodyPartExamined, ds.PatientName = generate_uid(), "KNEE", "Bench^Film"
        ds.save_as(p, enforce_file_format=True)
        films.append(p)
    return films


def per_film_costs(explainer, films: list[Path], out: Path) -> dict:
    """Seconds per film: verdict + CSV row, and verdict + Grad-CAM + SC + SR files."""
    import pydicom

    from kneeosteo.data.reader import read_image
    from kneeosteo.inference.dicom_out import heatmap_rgb, new_uid, secondary_capture, structured_report
    from kneeosteo.utils.csvfile import csv_stream

    images = [read_image(p) for p in films]
    datasets = [pydicom.dcmread(p) for p in films]
    t0 = time.perf_counter()
    with csv_stream(out / "preds.csv", ("path", "status", "probability", "label", "model")) as write:
        for p, img in zip(films, images):
            t = explainer.verdict(img.pixels)
            write([(str(p), t.status, f"{t.probability:.6f}", t.label, explainer.info.model_id)])
    csv_s = (time.perf_counter() - t0) / len(films)
    parts = {"verdict": 0.0, "gradcam": 0.0, "heatmap_and_sc": 0.0, "sr": 0.0}
    for ds, img in zip(datasets, images):
        t0 = time.perf_counter()
        t = explainer.verdict(img.pixels)
        t1 = time.perf_counter()
        ex = explainer.explain(img.pixels)  # every film, in domain or not: the full cost of a map
        t2 = time.perf_counter()
        sc = secondary_capture(
            ds, heatmap_rgb(img.pixels, ex.gradcam, "bench"), series_uid=new_uid(), sop_uid=new_uid()
        )
        sc.save_as(out / "sc.dcm", enforce_file_format=True)
        t3 = time.perf_counter()
        sr = structured_report(ds, t, explainer.info, explainer.threshold, series_uid=new_uid(), sop_uid=new_uid())
        sr.save_as(out / "sr.dcm", enforce_file_format=True)
        t4 = time.perf_counter()
        for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[k] += v / len(films)
    dicom_s = sum(parts.values())
    return {
        "csv_seconds_per_film": round(csv_s, 4),
        "dicom_seconds_per_film": round(dicom_s, 4),
        "dicom_parts_seconds_per_film": {k: round(v, 4) for k, v in parts.items()},
        "dicom_over_csv": round(dicom_s / csv_s, 2) if csv_s else None,
    }


def run(films: int = 20, run_dir: str | None = None, data: Path | None = None) -> dict:
    sys.path.insert(0, str(TESTS))
    import orthancrun
    from kneeosteo.inference.explain import Explainer
    from kneeosteo.interfaces.pacs import Credentials, run_pacs

    why = orthancrun.missing()
    if why:
        raise SystemExit(f"bench_pacs: {why}")
    doc: dict = {
        "films": films,
        "model": "bundled" if run_dir is None else str(run_dir),
        "data": str(data) if data else "generated 1024 x 1024",
    }
    explainer = Explainer(run_dir)
    doc["model_id"] = explainer.info.model_id
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_films(tmp / "films", films, data)
        with orthancrun.running_orthanc(tmp / "orthanc", "bench", "bench-pw") as server:
            import pydicom

            for p in paths:
                server.client.store_instances([pydicom.dcmread(p)])
            with section(doc.setdefault("orthanc_to_sr", {})) as s:
                t0 = time.perf_counter()
                done = run_pacs(
                    server.url,
                    state=tmp / "state",
                    credentials=Credentials("bench", "bench-pw"),
                    explainer=explainer,
                    echo=lambda line: None,
                )
                wall = time.perf_counter() - t0
                s.update(
                    stored=done.stored,
                    out_of_domain=done.out_of_domain,
                    objects=done.objects,
                    seconds=round(wall, 2),
                    films_per_minute=round(done.stored / wall * 60, 1),
                )
        (tmp / "costs").mkdir()
        with section(doc.setdefault("dicom_vs_csv", {})) as s:
            s.update(per_film_costs(explainer, paths, tmp / "costs"))
    return doc


def markdown(doc: dict) -> str:
    o, c = doc["orthanc_to_sr"], doc["dicom_vs_csv"]
    p = c["dicom_parts_seconds_per_film"]
    return "\n".join(
        [
            f"# Results in the PACS ({doc['films']} films, {doc['data']}, model {doc['model_id']})",
            "",
            f"Orthanc -> stored SR: {o['stored']} films in {o['seconds']} s = **{o['films_per_minute']} films/min** "
            f"({o['out_of_domain']} out of domain: SR only; {o['objects']} objects stored); load "
            f"{o['loadavg_start']} -> {o['loadavg_end']}",
            "",
            "| per film | seconds |",
            "|---|---|",
            f"| verdict + CSV row | {c['csv_seconds_per_film']} |",
            f"| verdict + Grad-CAM + SC + SR files | {c['dicom_seconds_per_film']} |",
            f"| of which verdict | {p['verdict']} |",
            f"| of which Grad-CAM | {p['gradcam']} |",
            f"| of which heat map + SC | {p['heatmap_and_sc']} |",
            f"| of which SR | {p['sr']} |",
            f"| DICOM / CSV | {c['dicom_over_csv']}x |",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--films", type=int, default=20)
    ap.add_argument("--run", default=None, help="Run folder (default: the bundled model).")
    ap.add_argument(
        "--data",
        type=Path,
        default=KOP if KOP.is_dir() else None,
        help="Class folders whose films are used (default: KOP when present, else generated films).",
    )
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "benchmarks" / "pacs.json")
    args = ap.parse_args(argv)
    return write_results(args.out, run(args.films, args.run, args.data), markdown)


if __name__ == "__main__":
    main()
