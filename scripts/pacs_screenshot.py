"""docs/pacs.png: Orthanc's own web view (Orthanc Explorer) of a study after `kneeosteo pacs`.

Two KOP films (one per class; generated films without KOP, which the bundled model calls out of
domain: SRs only) go into a fresh Orthanc as one knee study; one `kneeosteo pacs` pass with the
bundled model stores their SRs and heat maps; headless Chromium (Debian's, driven by Playwright)
shoots the study page (its series: the films, the SRs, the heat maps) and the first heat map's
preview, side by side.

    python scripts/pacs_screenshot.py [--out docs/pacs.png]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
KOP = (REPO / ".." / "shared" / "datasets" / "kop").resolve()
CHROMIUM = Path("/usr/bin/chromium")
USER, PASSWORD = "screenshot", "screenshot-pw"


def films(folder: Path) -> list[Path]:
    import numpy as np
    import pydicom
    from pydicom.uid import generate_uid

    import imagegen as g
    from kneeosteo.data.reader import read_image, to_uint8

    study, series = generate_uid(), generate_uid()
    arrays = []
    for cls in ("normal", "osteoporosis"):
        found = sorted((KOP / cls).glob("*")) if KOP.is_dir() else []
        arrays.append(
            to_uint8(read_image(found[0]).pixels)
            if found
            else np.rint(np.clip(g.picture(1024, 1024, variant=len(arrays)), 0, 1) * 255).astype(np.uint8)
        )
    out = []
    for i, a in enumerate(arrays):
        p = g.dicom(
            folder / f"knee{i}.dcm", bits=8, array=a, size=a.shape[::-1], patient_id="DEMO-001", study_uid=study
        )
        ds = pydicom.dcmread(p)
        ds.SeriesInstanceUID, ds.BodyPartExamined, ds.PatientName = series, "KNEE", "Demo^Knee"
        ds.StudyDescription, ds.SeriesDescription, ds.InstanceNumber = "Knee radiographs", "Knee AP", i + 1
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "pacs.png")
    args = ap.parse_args(argv)
    import pydicom
    from PIL import Image
    from playwright import sync_api

    import orthancrun
    from kneeosteo.interfaces.pacs import Credentials, run_pacs

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = films(tmp / "films")
        with orthancrun.running_orthanc(tmp / "orthanc", USER, PASSWORD) as server:
            server.client.store_instances([pydicom.dcmread(p) for p in paths])
            done = run_pacs(server.url, state=tmp / "state", credentials=Credentials(USER, PASSWORD))
            print(done.summary())
            study = server.rest("/studies")[0]
            heat = [
                s
                for s in server.rest(f"/studies/{study}/series")
                if s["MainDicomTags"].get("SeriesDescription", "").startswith("kneeosteo heat map")
            ]
            with sync_api.sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
                ctx = browser.new_context(
                    viewport={"width": 900, "height": 760}, http_credentials={"username": USER, "password": PASSWORD}
                )
                page = ctx.new_page()
                page.goto(f"{server.base}/app/explorer.html#study?uuid={study}")
                page.wait_for_selector("#list-series li a", timeout=20_000)
                page.wait_for_timeout(500)
                page.screenshot(path=str(tmp / "study.png"))
                shots = [Image.open(tmp / "study.png").convert("RGB")]
                if heat:
                    instance = heat[0]["Instances"][0]
                    page.goto(f"{server.base}/instances/{instance}/preview")
                    page.screenshot(path=str(tmp / "sc.png"))
                    sc = Image.open(tmp / "sc.png").convert("RGB")
                    sc.thumbnail((760, 760))
                    shots.append(sc)
                browser.close()
        w = sum(s.width for s in shots) + 10 * (len(shots) - 1)
        h = max(s.height for s in shots)
        sheet = Image.new("RGB", (w, h), "white")
        x = 0
        for s in shots:
            sheet.paste(s, (x, 0))
            x += s.width + 10
        args.out.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(args.out, optimize=True)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
