"""What the knee localiser costs per film: ``find_knees`` alone, and the ``knee`` preset's input
(find + cut + resample to 448 px) against the ``paper`` (224 px) and ``robust`` presets, on
decoded films held in memory (decoding is ``bench_loading``'s).

    python -m benchmarks.bench_knee DATA [--films N]     # KOP: the first N films (default 60)
    python -m benchmarks.bench_knee --quick              # generated knee films, a smoke run

Prints milliseconds per film (median and 95th percentile over films, each film timed as the
best of 3 calls) and the load average before and after: numbers from a loaded machine are upper
bounds. Not part of ``benchmarks.run`` (yet).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks.common import imagegen, loadavg, percentile  # noqa: E402


def films(argv: list[str]) -> list[np.ndarray]:
    if "--quick" in argv:
        g = imagegen()
        return [g.knee_film(240 + 40 * i, 480, (120 + 20 * i, 200), 90) for i in range(4)]
    from kneeosteo.data.reader import read_image

    data = Path(argv[0])
    n = int(argv[argv.index("--films") + 1]) if "--films" in argv else 60
    paths = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:n]
    return [read_image(p).pixels for p in paths]


def per_film_ms(fn, pixels: list[np.ndarray]) -> list[float]:
    out = []
    for p in pixels:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            fn(p)
            best = min(best, time.perf_counter() - t0)
        out.append(1000 * best)
    return out


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    from kneeosteo.data.knee import find_knees
    from kneeosteo.data.preprocess import Preprocess

    pixels = films(argv)
    before = loadavg()
    cases = {
        "find_knees": find_knees,
        "preset knee 448": Preprocess("knee", 448).knee_views,
        "preset paper 224": Preprocess("paper", 224),
        "preset robust 224": Preprocess("robust", 224),
    }
    print(f"{len(pixels)} films, load average before {before}")
    for name, fn in cases.items():
        ms = per_film_ms(fn, pixels)
        print(f"{name:>18}: median {percentile(ms, 50):7.1f} ms, p95 {percentile(ms, 95):7.1f} ms per film")
    print(f"load average after {loadavg()}")


if __name__ == "__main__":
    main(sys.argv[1:])
