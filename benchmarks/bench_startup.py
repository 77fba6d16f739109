"""Start-up cost of the command line (issue 29): `kneeosteo --help`, and `kneeosteo predict` on
one film with the default engine, each in a fresh process, as a user waits for them.

    python benchmarks/bench_startup.py [--image FILM] [--repeats 5] [--out docs/results/benchmarks/startup.json]

Each command runs ``--repeats`` times in a new interpreter (``python -m kneeosteo ...``, this
checkout first on the path); reported: wall time (median, min, max) and the peak resident set of
the process (``ru_maxrss`` from ``os.wait4``, so the child's own peak, not this script's). One
untimed ``predict`` first fills the cache (the default engine exports the model to ONNX on first
use), so the timed runs are what a user sees from the second film on. One more run of each
command reports which heavy libraries it imported. Without ``--image`` a generated 8-bit PNG
knee-like film (tests/imagegen.py) is used. Run it on an otherwise idle machine: the load average
is recorded, and figures taken under load are not valid.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_startup.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, imagegen, section, write_results  # noqa: E402

HEAVY = (
    "torch",
    "torchvision",
    "onnxruntime",
    "onnx",
    "sklearn",
    "scipy",
    "statsmodels",
    "matplotlib",
    "cv2",
    "crepes",
    "pandas",
    "timm",
)
PROBE = (
    "import runpy, sys, atexit, json\n"
    "atexit.register(lambda: print('MODULES ' + json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)),"
    " file=sys.stderr))\n"
    "sys.argv = ['kneeosteo', *sys.argv[1:]]\n"
    "runpy.run_module('kneeosteo', run_name='__main__')\n"
)


def _env(cache: Path) -> dict:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, "KNEEOSTEO_CACHE": str(cache)}


def run_once(argv: list[str], env: dict) -> dict:
    """One fresh process: wall seconds, its peak RSS (MB) and exit code."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "code": proc.returncode, "stderr": err}


def measure(args: list[str], env: dict, repeats: int) -> dict:
    runs = [run_once([sys.executable, "-m", "kneeosteo", *args], env) for _ in range(repeats)]
    bad = [r for r in runs if r["code"] != 0]
    if bad:
        raise SystemExit(f"kneeosteo {' '.join(args)} failed: {bad[0]['stderr'].strip()[-500:]}")
    probe = run_once([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], env)
    line = [x for x in probe["stderr"].splitlines() if x.startswith("MODULES ")]
    secs = [r["seconds"] for r in runs]
    return {
        "command": "kneeosteo " + " ".join(args),
        "repeats": repeats,
        "wall_s_median": round(statistics.median(secs), 3),
        "wall_s_min": round(min(secs), 3),
        "wall_s_max": round(max(secs), 3),
        "peak_rss_mb_max": round(max(r["peak_rss_mb"] for r in runs), 1),
        "imports": json.loads(line[-1][len("MODULES ") :]) if line else None,
    }


def markdown(doc: dict) -> str:
    rows = ["| command | wall s (median, min-max) | peak RSS MB | heavy libraries imported |", "|---|---|---|---|"]
    for r in doc["commands"]:
        imports = ", ".join(r["imports"] or []) or "-"
        rows.append(
            f"| `{r['command'].replace(doc['image'], 'FILM')}` | {r['wall_s_median']} "
            f"({r['wall_s_min']}-{r['wall_s_max']}) | {r['peak_rss_mb_max']} | {imports} |"
        )
    return (
        f"# Start-up ({doc['started']}, load average {doc['loadavg_start']} -> {doc['loadavg_end']})\n\n"
        + "\n".join(rows)
        + "\n"
    )


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", type=Path, default=None, help="the film to predict (default: a generated PNG)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "benchmarks" / "startup.json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kneeosteo-startup-") as tmp:
        image = args.image or imagegen().png_grey8(Path(tmp) / "knee.png")
        env = _env(Path(tmp) / "cache")
        doc: dict = {"image": str(image), "python": sys.version.split()[0], "cpus": os.cpu_count()}
        warm = run_once([sys.executable, "-m", "kneeosteo", "predict", str(image)], env)  # fills the ONNX cache
        if warm["code"] != 0:
            raise SystemExit(f"predict failed: {warm['stderr'].strip()[-500:]}")
        with section(doc):
            doc["commands"] = [
                measure(["--help"], env, args.repeats),
                measure(["predict", str(image)], env, args.repeats),
            ]
    return write_results(args.out, doc, markdown)


if __name__ == "__main__":
    main()
