"""What the domain check of a knee-region run accepts (issue 32's third target).

The issue asks that the domain check accept >= 95% of the reference films and of two-knee films
built from KOP, and still reject every non-knee input of the test suite. This script measures the
three on one run (a ``--preprocess knee`` run, e.g. a cell of the held-out grid, whose test films
are the reference films, so none of them fitted its domain check):

- ``reference``: every distinct film of the reference manifest, as it is;
- ``two_knee``: consecutive pairs of those films (sorted by path) side by side at the same height,
  the second mirrored left-right, as on a standing two-knee film;
- ``non_knee``: ``tests/imagegen.non_knee_corpus`` (noise, blank, documents, photo-like scenes, a
  screenshot, pydicom's CT and MR samples).

    python research/knee_domain.py DATA --run RUN --reference DATA/tscores.csv \\
        [--out docs/results/research/KNEE_DOMAIN.json]

Prints one line per case (accepted, ok, the refusal reasons) and writes the numbers. Nothing is
fitted or chosen here. Not a package feature; prediction is the package's (``Predictor``, torch).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from imagegen import non_knee_corpus  # noqa: E402
from kneeosteo.data.reader import read_image  # noqa: E402
from kneeosteo.data.reference import read_reference  # noqa: E402
from kneeosteo.inference import Predictor  # noqa: E402


def two_knee(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a`` and ``b`` mirrored, side by side at ``a``'s height."""
    h = a.shape[0]
    b = cv2.resize(b, (round(b.shape[1] * h / b.shape[0]), h), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(np.hstack([a, b[:, ::-1]]))


def refusing_checks(reason: str) -> set[str]:
    """The checks named in one film's refusal, without their figures or the knee they concern:
    "left knee: features unlike the training images (distance 183 > 95.7); 2 bone regions side by
    side (...)" -> {"features unlike the training images", "2 bone regions side by side"}."""
    for side in ("left", "right", "single"):
        reason = reason.replace(f"{side} knee: ", "")
    # "; " separates checks, except inside a check's parentheses (the orientation check's figures)
    return {part.split(" (")[0].strip() for part in re.split(r"; (?![^()]*\))", reason) if part.strip()}


def summary(verdicts) -> dict:
    accepted = [v for v in verdicts if v.status != "out_of_domain"]
    reasons = Counter(
        check for v in verdicts if v.status == "out_of_domain" for check in refusing_checks(v.status_reason or "")
    )
    return {
        "n": len(verdicts),
        "accepted": len(accepted),
        "accepted_share": round(len(accepted) / max(len(verdicts), 1), 4),
        "ok": sum(v.status == "ok" for v in verdicts),
        "refusal_reasons": dict(reasons),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--reference", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("docs/results/research/KNEE_DOMAIN.json"))
    args = ap.parse_args()
    ref = read_reference(args.reference, args.data)
    films = sorted(ref.files)
    pix = {p: read_image(args.data / p).pixels.astype(np.float32) for p in films}
    cases = {
        "reference": [pix[p] for p in films],
        "two_knee": [two_knee(pix[a], pix[b]) for a, b in zip(films[0::2], films[1::2])],
    }
    with tempfile.TemporaryDirectory() as tmp:
        cases["non_knee"] = [read_image(p).pixels.astype(np.float32) for p in non_knee_corpus(Path(tmp))]
    predictor = Predictor(args.run, engine="torch", batch_size=8)
    out = {"run": str(args.run), "model": predictor.model_id, "cases": {}}
    for name, images in cases.items():
        out["cases"][name] = summary(predictor.predict_trusted(images))
        c = out["cases"][name]
        print(f"{name}: accepted {c['accepted']} of {c['n']} (ok {c['ok']}); refused for {c['refusal_reasons']}")
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
