"""Data loading: decode + preprocess (read_image + the paper's Preprocess to 224 px) per format.

Generated radiograph-sized files (the tests' generator: gradient + disc + noise, so JPEG/PNG
compression does real work) in JPEG (8-bit grey, quality 95), PNG 8-bit, PNG 16-bit and DICOM
(16-bit, uncompressed Explicit VR LE), plus KOP as shipped when it is there. Each is read
serially (0 workers), with a torch DataLoader with 2 worker processes, and with 2 threads
(what ``prepare`` and ``predict`` use: the decoders release the GIL).
"""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.common import imagegen, section

FORMATS = ("jpeg", "png8", "png16", "dicom")


def make_files(root: Path, n: int, width: int, height: int) -> dict[str, list[Path]]:
    g = imagegen()
    rng = np.random.default_rng(0)
    out: dict[str, list[Path]] = {f: [] for f in FORMATS}
    for i in range(n):
        pic = np.clip(g.picture(width, height, variant=i) + rng.normal(0, 0.03, (height, width)), 0, 1)
        a8 = np.rint(pic * 255).astype(np.uint8)
        a16 = np.rint(pic * 65535).astype(np.uint16)
        from PIL import Image

        p = root / f"img{i:03d}.jpg"
        Image.fromarray(a8).save(p, format="JPEG", quality=95)
        out["jpeg"].append(p)
        out["png8"].append(g.png_grey8(root / f"img{i:03d}.png", array=a8))
        out["png16"].append(g.png_grey16(root / f"img{i:03d}_16.png", array=a16))
        out["dicom"].append(g.dicom(root / f"img{i:03d}.dcm", array=a16, bits=16))
    return out


class _DecodeSet:
    """A map-style Dataset: path -> preprocessed (3, S, S) tensor (picklable for workers)."""

    def __init__(self, files, size: int = 224):
        self.files = [str(f) for f in files]
        self.size = size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return _decode(self.files[i], self.size)


def _decode(path, size: int = 224):
    from kneeosteo.data.preprocess import Preprocess
    from kneeosteo.data.reader import read_image

    return Preprocess("paper", size)(read_image(path).pixels)


def _serial(files, size):
    for f in files:
        _decode(f, size)


def _threads(files, size, workers):
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda f: _decode(f, size), files))


def _dataloader(files, size, workers):
    from torch.utils.data import DataLoader

    # torch threads inside each worker: 1 (DataLoader's default), so 2 workers use 2 cores
    loader = DataLoader(
        _DecodeSet(files, size), batch_size=8, num_workers=workers, multiprocessing_context="fork" if workers else None
    )
    for _ in loader:
        pass


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def run_section(quick: bool = False, kop: Path | None = None, workers: int = 2, log=print) -> dict:
    n, (w, h), repeats = (4, (256, 512), 1) if quick else (24, (1024, 2048), 2)
    size = 64 if quick else 224
    doc: dict = {
        "settings": {
            "images_per_format": n,
            "width": w,
            "height": h,
            "preprocess": f"paper, {size} px",
            "workers": workers,
            "repeats": repeats,
            "timing": "best of repeats",
        },
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="kneeosteo-bench-load-") as tmp, section(doc):
        files = make_files(Path(tmp), n, w, h)
        sets = {f: files[f] for f in FORMATS}
        if kop is not None and Path(kop).is_dir():
            from kneeosteo.data.reader import is_candidate

            kfiles = sorted(
                p for p in Path(kop).rglob("*") if p.is_file() and is_candidate(p) and p.suffix.lower() != ".md"
            )
            sets[f"{Path(kop).name} (as shipped)"] = kfiles[:: max(1, len(kfiles) // (3 if quick else 96))][
                : 3 if quick else 96
            ]
        for fmt, fs in sets.items():
            mp = sum(_megapixels(f) for f in fs)
            mb = sum(f.stat().st_size for f in fs) / 2**20
            row = {
                "format": fmt,
                "images": len(fs),
                "megapixels_per_image": round(mp / len(fs), 2),
                "mb_per_image": round(mb / len(fs), 2),
            }
            _serial(fs[:1], size)  # warm imports / plugins
            for mode, fn in (
                # each timed at once, before fs changes
                ("serial", lambda: _serial(fs, size)),  # noqa: B023
                (f"threads{workers}", lambda: _threads(fs, size, workers)),  # noqa: B023
                (f"dataloader{workers}", lambda: _dataloader(fs, size, workers)),  # noqa: B023
            ):
                s = _time(fn, repeats)
                row[f"{mode}_images_per_s"] = round(len(fs) / s, 2)
                row[f"{mode}_ms_per_image"] = round(1e3 * s / len(fs), 2)
            log(f"  loading: {fmt}: serial {row['serial_images_per_s']} img/s")
            doc["rows"].append(row)
    return doc


def _megapixels(path: Path) -> float:
    from kneeosteo.data.reader import read_image

    px = read_image(path).pixels
    return px.shape[0] * px.shape[1] / 1e6
