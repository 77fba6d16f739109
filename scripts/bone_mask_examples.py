"""Show what the shortcut probes hide: the package's label-free bone mask on KOP films.

Usage: python scripts/bone_mask_examples.py DATA OUT_PNG [NAME ...]
       python scripts/bone_mask_examples.py --preset DATA OUT_PNG [NAME ...]

Writes one picture: per film (rows) the radiograph with the mask's outline in red, probe (a)'s
view (bone hidden) and probe (b)'s view (only the bone). With ``--preset``: what a model trained
with ``preprocess = bone`` is shown instead: the network input for the film, and for probe (a)'s
and probe (b)'s views (the preset finds the bone region again on each view). Prints the share of the film the mask
covers for every readable image of DATA (median and range), the figure docs/shortcut.md quotes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

from kneeosteo.data.bone import bone_mask, occlude
from kneeosteo.data.preprocess import Preprocess
from kneeosteo.data.reader import read_image, to_uint8
from kneeosteo.data.scan import scan_dataset
from kneeosteo.utils.atomic import atomic_path

ROW_HEIGHT = 256


def panel(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    grey = to_uint8(pixels)
    outlined = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(outlined, contours, -1, (0, 0, 255), max(2, grey.shape[0] // 150))
    views = [outlined] + [
        cv2.cvtColor(to_uint8(occlude(pixels, mask, k)), cv2.COLOR_GRAY2BGR) for k in ("hide_bone", "only_bone")
    ]
    scale = ROW_HEIGHT / grey.shape[0]
    size = (max(1, round(grey.shape[1] * scale)), ROW_HEIGHT)
    return np.hstack([cv2.resize(v, size, interpolation=cv2.INTER_AREA) for v in views])


def preset_panel(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    prep = Preprocess("bone", ROW_HEIGHT)
    film = cv2.resize(
        to_uint8(pixels),
        (max(1, round(pixels.shape[1] * ROW_HEIGHT / pixels.shape[0])), ROW_HEIGHT),
        interpolation=cv2.INTER_AREA,
    )
    inputs = [
        to_uint8(prep.geometry(v)[0].numpy())
        for v in (pixels, occlude(pixels, mask, "hide_bone"), occlude(pixels, mask, "only_bone"))
    ]
    return np.hstack([cv2.cvtColor(v, cv2.COLOR_GRAY2BGR) for v in [film, *inputs]])


def main(data: str, out: str, *names: str, preset: bool = False) -> None:
    scan = scan_dataset(Path(data))
    shares, rows = [], []
    by_name = {Path(r.path).stem: r for r in scan.records}
    for r in scan.records:
        shares.append(float(bone_mask(read_image(Path(data) / r.path).pixels).mean()))
    for name in names or ("normal_0014", "normal_0096", "osteoporosis_0055", "osteoporosis_0113"):
        rec = by_name[name]
        px = read_image(Path(data) / rec.path).pixels
        rows.append((preset_panel if preset else panel)(px, bone_mask(px)))
    width = max(r.shape[1] for r in rows)
    sheet = np.vstack([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
    ok, png = cv2.imencode(".png", sheet)
    with atomic_path(out) as tmp:
        tmp.write_bytes(png.tobytes())
    s = np.array(shares)
    print(
        f"{len(s)} images: mask covers median {np.median(s):.2f} of the film (range {s.min():.2f}-{s.max():.2f}); wrote {out}"
    )


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--preset"]
    if len(args) < 2:
        sys.exit(__doc__)
    main(*args, preset="--preset" in sys.argv[1:])
