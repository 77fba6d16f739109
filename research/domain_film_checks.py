"""What the domain check accepts of films turned, flipped, doubled or drowned in noise (issue 28 row 6).

The bundled model, its own split: the cases are built from KOP's *test* films (never used to set
anything; the noise limit and the bone-column rule were set on training films), and every KOP film
is predicted as it is, to measure how many ordinary films are still accepted:

- ``rot180``: the first 20 osteoporosis test films turned 180 degrees;
- ``flipud``: the same 20 films mirrored top to bottom;
- ``side_by_side``: 20 pairs of osteoporosis test films side by side (same height);
- ``noise0.1`` / ``noise0.2``: the first 20 normal test films plus Gaussian noise of that sigma
  (grey levels in [0, 1]), clipped;
- ``ordinary``: every KOP film unchanged (test partition and all films reported apart: the
  training films are what the check was fitted on).

    python research/domain_film_checks.py DATA [--run RUN] [--out docs/results/research/DOMAIN_FILM_CHECKS.json] [--limit N]

``--run``: another run than the bundled model (its own split's test films build the cases).

Prints one line per case (accepted, and how many of those were ``ok``) and writes the numbers.
Not a package feature; prediction is the package's (``Predictor``, torch fp32).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from kneeosteo.data.reader import read_image
from kneeosteo.inference import Predictor
from kneeosteo.run import RunDir


def side_by_side(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    h = min(a.shape[0], b.shape[0])
    resize = lambda x: cv2.resize(x, (round(x.shape[1] * h / x.shape[0]), h), interpolation=cv2.INTER_AREA)  # noqa: E731
    return np.hstack([resize(a), resize(b)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/results/research/DOMAIN_FILM_CHECKS.json"))
    ap.add_argument("--limit", type=int, default=None, help="ordinary films: only this many (a quick look)")
    ap.add_argument("--run", type=Path, default=None, help="the run to measure (default: the bundled model)")
    args = ap.parse_args()
    run = RunDir.open(args.run)
    split = json.loads(run.split_file.read_text())
    test = sorted(split["test"])
    label = lambda p: p.split("/")[0]  # noqa: E731
    osteo = [p for p in test if label(p) == "osteoporosis"][:20]
    normal = [p for p in test if label(p) == "normal"][:20]
    pix = lambda p: read_image(args.data / p).pixels.astype(np.float32)  # noqa: E731
    rng = np.random.default_rng(0)
    cases = {
        "rot180": [np.ascontiguousarray(pix(p)[::-1, ::-1]) for p in osteo],
        "flipud": [np.ascontiguousarray(pix(p)[::-1]) for p in osteo],
        "side_by_side": [side_by_side(pix(osteo[k]), pix(osteo[(k + 1) % len(osteo)])) for k in range(len(osteo))],
        "noise0.1": [np.clip(pix(p) + rng.normal(0, 0.1, pix(p).shape), 0, 1).astype(np.float32) for p in normal],
        "noise0.2": [np.clip(pix(p) + rng.normal(0, 0.2, pix(p).shape), 0, 1).astype(np.float32) for p in normal],
    }
    predictor = Predictor(args.run, engine="torch", batch_size=8)
    out = {"model": predictor.model_id, "cases": {}}
    for name, images in cases.items():
        t0 = time.time()
        verdicts = predictor.predict_trusted(images)
        accepted = [v for v in verdicts if v.status != "out_of_domain"]
        out["cases"][name] = {
            "n": len(verdicts),
            "accepted": len(accepted),
            "ok": sum(v.status == "ok" for v in verdicts),
            "labels_when_accepted": dict(Counter(v.label for v in accepted)),
        }
        print(
            f"{name}: accepted {len(accepted)} of {len(verdicts)} (ok {out['cases'][name]['ok']}; labels "
            f"{out['cases'][name]['labels_when_accepted']}) [{time.time() - t0:.0f} s]",
            flush=True,
        )
    films = sorted(
        str(p.relative_to(args.data)) for p in args.data.glob("*/*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")
    )
    films = films[: args.limit] if args.limit else films
    result = predictor.predict([args.data / f for f in films], progress=False)
    status = {str(Path(r.path).relative_to(args.data)): r.status for r in result.predictions}
    for part, names in (("test", set(test)), ("train", set(split["train"])), ("all", set(films))):
        got = [status[f] for f in films if f in names and f in status]
        out["cases"][f"ordinary_{part}"] = {
            "n": len(got),
            "accepted": sum(s != "out_of_domain" for s in got),
            "ok": sum(s == "ok" for s in got),
        }
        c = out["cases"][f"ordinary_{part}"]
        print(f"ordinary films ({part}): accepted {c['accepted']} of {c['n']} (ok {c['ok']})", flush=True)
    refused = Counter(r.status for r in result.predictions)
    out["ordinary_statuses"] = dict(refused)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
