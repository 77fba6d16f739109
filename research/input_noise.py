"""How far does +-1 grey level of noise on the network input move a run's answers? (a limit the docs state)

The same measure as ``benchmarks.bench_inference.int8_accuracy``'s reference row, for any run,
the knee-region preset included: each test film of the run's own split is preprocessed as
``predict`` does (a knee run: one input per knee found), uniform noise of +-1 grey level (1/255 of
the [0, 1] range, divided by the channel's normalising std) is added to the normalised input
(seeded), and the film's raw P(positive) (a knee run: the mean over its knees) is compared with
the noise-free one, torch fp32. Films on which no knee is found are counted and left out.

    python research/input_noise.py DATA [--run RUN] [--out docs/results/research/INPUT_NOISE.json]

Prints the largest and mean change of P and the label flips at the run's threshold. Fits nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from kneeosteo.data.reader import read_image
from kneeosteo.run import RunDir
from kneeosteo.utils.atomic import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--run", type=Path, default=None, help="default: the bundled model")
    ap.add_argument("--out", type=Path, default=Path("docs/results/research/INPUT_NOISE.json"))
    args = ap.parse_args()
    run = RunDir.open(args.run)
    prep = run.config.preprocess
    model = run.load_model("cpu").eval()
    split = json.loads(run.split_file.read_text())
    gen = torch.Generator().manual_seed(0)
    std = torch.tensor(prep.std, dtype=torch.float32).view(3, 1, 1)
    clean, noisy, no_knee = [], [], []
    with torch.inference_mode():
        for rel in sorted(split["test"]):
            _, views = prep.knee_views(read_image(args.data / rel).pixels)
            if not views:
                no_knee.append(rel)
                continue
            x = torch.stack(views)
            xn = x + (torch.rand(x.shape, generator=gen) - 0.5) * 2 * (1 / 255) / std
            clean.append(float(torch.sigmoid(model(images=x).float()).mean()))
            noisy.append(float(torch.sigmoid(model(images=xn).float()).mean()))
    p, q = np.array(clean), np.array(noisy)
    t = float(run.config.threshold)
    out = {
        "model": run.model_id,
        "preset": prep.preset,
        "image_size": prep.size,
        "films": int(p.size),
        "no_knee_found": no_knee,
        "threshold": t,
        "max_abs_dp": float(np.max(np.abs(q - p))),
        "mean_abs_dp": float(np.mean(np.abs(q - p))),
        "label_flips": int(((p >= t) != (q >= t)).sum()),
        "note": "torch fp32; +-1 grey level uniform noise on the normalised input, seed 0; a film's P is its knees' mean",
    }
    print(
        f"{out['model']}: {out['films']} test films ({len(no_knee)} without a knee): |dP| max {out['max_abs_dp']:.3f}, "
        f"mean {out['mean_abs_dp']:.4f}; {out['label_flips']} labels flip at {t:g}"
    )
    write_json(args.out, out)  # atomic, the package's writer
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
