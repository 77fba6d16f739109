"""The default model's two time targets (issue 13): training on KOP with `--precision fp32` within
30 minutes, and prediction within 1 s per image, on this machine's cores.

    python benchmarks/bench_default_model.py --data ../shared/datasets/kop [--split S] [--images 24]
        [--out docs/results/benchmarks/default_model.json]

Training runs `kneeosteo train DATA --config configs/default_model.toml --split S --precision fp32`
in a fresh process with a cold feature cache (its own temporary KNEEOSTEO_CACHE), timed end to end
(decode, features, epochs, scoring with the shortcut probes). Prediction times `kneeosteo predict`'s
engine (``Predictor``, ONNX Runtime fp32 by default and PyTorch fp32) on KOP test images, one image
per call, after a warm-up: what a user waits for per image. Run it on an otherwise idle machine;
the load average is recorded. For a CPU without bf16, cap PyTorch's ISA first:
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` (recorded in the result).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_default_model.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, latency_stats, section, write_json  # noqa: E402
from benchmarks.machine import describe  # noqa: E402


def train_once(data: Path, split: Path, out: Path, cache: Path) -> dict:
    env = {**os.environ, "KNEEOSTEO_CACHE": str(cache)}
    cmd = [
        sys.executable,
        "-m",
        "kneeosteo",
        "train",
        str(data),
        "--config",
        str(REPO / "configs" / "default_model.toml"),
        "--split",
        str(split),
        "--out",
        str(out),
        "--precision",
        "fp32",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    from kneeosteo.run import RunDir

    rd = RunDir.open(out)
    return {
        "command": " ".join(cmd[2:]),
        "wall_seconds": round(seconds, 1),
        "prepare_seconds": rd.config.record.get("prepare_seconds"),
        "epochs_run": rd.config.record.get("epochs_run"),
        "best_epoch": rd.config.record.get("best_epoch"),
        "autocast": rd.config.record.get("autocast"),
    }


def predict_times(run: Path, files: list[Path]) -> dict:
    from kneeosteo.data.reader import read_image
    from kneeosteo.inference.predictor import Predictor

    out = {}
    for engine in ("auto", "torch"):
        p = Predictor(run, engine=engine)
        pixels = [read_image(f).pixels for f in files]
        p.predict_pixels(pixels[:1])  # warm-up (ONNX export on first use is not per-image time)
        per_image = []
        for f in files:  # what `kneeosteo predict FILE` costs per image once the model is loaded: decode + model
            t = time.perf_counter()
            p.predict_pixels([read_image(f).pixels])
            per_image.append(time.perf_counter() - t)
        out[p.engine] = latency_stats(per_image, 1)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "kop"))
    ap.add_argument("--split", default=None, help="split file (default: the bundled model's, the seed-0 paper split)")
    ap.add_argument("--images", type=int, default=24, help="test images to time prediction on")
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "benchmarks" / "default_model.json"))
    args = ap.parse_args(argv)
    data = Path(args.data)
    split = Path(args.split) if args.split else REPO / "kneeosteo" / "assets" / "default_model" / "split.json"
    doc: dict = {
        "machine": describe(),
        "isa_cap": {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")},
    }
    with tempfile.TemporaryDirectory(prefix="kneeosteo-bench-default-") as tmp:
        tmp = Path(tmp)
        with section(doc.setdefault("training", {})) as t:
            t.update(train_once(data, split, tmp / "run", tmp / "cache"))
        test = json.loads(split.read_text())["test"][: args.images]
        with section(doc.setdefault("prediction", {})) as p:
            os.environ["KNEEOSTEO_CACHE"] = str(tmp / "cache")
            p["images"] = len(test)
            p["per_image"] = predict_times(tmp / "run", [data / f for f in test])
    write_json(Path(args.out), doc)
    print(json.dumps({k: doc[k] for k in ("training", "prediction")}, indent=1))


if __name__ == "__main__":
    main()
