"""Build the image sets behind the "Trusting a prediction" figures (docs/trust.md), from KOP and a run's
split: the shifted "site" halves (site A to calibrate on, site B to score), four variants of the
KOP test images for the domain check, and the generated non-knee corpus.

    python scripts/trust_measurements.py RUN KOP OUT
    kneeosteo predict OUT/variants/rotated --run RUN --out rotated.csv      # count `status`
    kneeosteo calibrate RUN OUT/siteA --out RUN-siteA && kneeosteo evaluate RUN-siteA OUT/siteB

Only images the run never trained on (its validation and test parts) go into the sites.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from imagegen import non_knee_corpus  # noqa: E402


def site_look(img: Image.Image) -> Image.Image:
    """Another site's films: gamma 0.7, then contrast 0.8 about mid-grey (saved as JPEG by the caller)."""
    a = np.asarray(img, dtype=np.float64) / 255
    a = np.clip(0.5 + 0.8 * (a**0.7 - 0.5), 0, 1)
    return Image.fromarray((a * 255).round().astype(np.uint8))


def main(run: Path, kop: Path, out: Path) -> None:
    split = json.loads((run / "split.json").read_text())
    held = sorted(split["val"] + split["test"])
    rng = np.random.default_rng(0)
    load = lambda p: Image.open(kop / p).convert("L")  # noqa: E731
    for cls in ("normal", "osteoporosis"):  # alternate images of each class: site A, site B
        for i, p in enumerate(q for q in held if q.startswith(cls + "/")):
            target = out / ("siteA" if i % 2 == 0 else "siteB") / cls / (Path(p).stem + ".jpg")
            target.parent.mkdir(parents=True, exist_ok=True)
            site_look(load(p)).save(target, quality=70)
    variants = {
        "reencoded": (lambda im: im, 60),
        "resized": (
            lambda im: im.resize((max(1, im.width // 2), max(1, im.height // 2)), Image.Resampling.BILINEAR),
            90,
        ),
        "rotated": (
            lambda im: im.rotate(float(rng.uniform(-8, 8)), resample=Image.Resampling.BILINEAR, fillcolor=0),
            90,
        ),
        "contrast": (site_look, 90),
    }
    for name, (f, quality) in variants.items():
        for p in split["test"]:
            target = out / "variants" / name / (Path(p).stem + ".jpg")
            target.parent.mkdir(parents=True, exist_ok=True)
            f(load(p)).save(target, quality=quality)
    print(f"{len(non_knee_corpus(out / 'junk'))} non-knee images (pydicom's are read in place); sets under {out}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*(Path(a) for a in sys.argv[1:]))
