"""Start-up cost of the command line (issue 29): `kneeosteo --help`, and `kneeosteo predict` on
one film with the default engine, each in a fresh process, as a user waits for them.

    python benchmarks/bench_startup.py [--image FILM] [--repeats 5] [--paths avx2,native]
        [--compare ../main] [--out docs/results/benchmarks/startup.json]

Each command runs ``--repeats`` times in a new interpreter (``python -m kneeosteo ...``, this
checkout first on the path); reported: wall time (median, min, max) and the peak resident set of
the process (``ru_maxrss`` from ``os.wait4``, so the child's own peak, not this script's). One
untimed ``predict`` first fills the cache (the default engine exports the model to ONNX on first
use), so the timed runs are what a user sees from the second film on. One more run of each
command reports which heavy libraries it imported. Without ``--image`` a generated 8-bit PNG
knee-like film (tests/imagegen.py) is used.

``--paths``: the compute paths to measure, each a set of environment variables: ``avx2``
(``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``: a CPU without AVX-512, the target's) and
``native`` (neither set). ``--compare DIR``: another checkout (e.g. ``main`` before a change),
measured in the same run with its own cache, its runs interleaved with this checkout's so that a
change in load hits both alike. Run it on an otherwise idle machine: the load average is recorded,
and figures taken under load are not valid.
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

PATHS = {  # compute path -> the environment that selects it (None: unset)
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "native": {"ATEN_CPU_CAPABILITY": None, "ONEDNN_MAX_CPU_ISA": None},
}
HEAVY = (
    "torch",
    "torchvision",
    "onnxruntime",
    "onnx",
    "sklearn",
    "scipy",
    "scipy.stats",
    "pydicom",
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


def _env(root: Path, cache: Path, path: str) -> dict:
    env = {**os.environ, "KNEEOSTEO_CACHE": str(cache)}
    env["PYTHONPATH"] = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for key, value in PATHS[path].items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _revision(root: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or "?"
    except OSError:
        return "?"


def run_once(argv: list[str], env: dict, cwd: Path = REPO) -> dict:
    """One fresh process: wall seconds, its peak RSS (MB) and exit code."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "code": proc.returncode, "stderr": err}


def summarise(args: list[str], runs: list[dict], probe: dict) -> dict:
    bad = [r for r in runs if r["code"] != 0]
    if bad:
        raise SystemExit(f"kneeosteo {' '.join(args)} failed: {bad[0]['stderr'].strip()[-500:]}")
    line = [x for x in probe["stderr"].splitlines() if x.startswith("MODULES ")]
    secs = [r["seconds"] for r in runs]
    return {
        "command": "kneeosteo " + " ".join(args),
        "repeats": len(runs),
        "wall_s_median": round(statistics.median(secs), 3),
        "wall_s_min": round(min(secs), 3),
        "wall_s_max": round(max(secs), 3),
        "peak_rss_mb_max": round(max(r["peak_rss_mb"] for r in runs), 1),
        "imports": json.loads(line[-1][len("MODULES ") :]) if line else None,
    }


def measure(targets: list[dict], args: list[str], repeats: int) -> list[dict]:
    """``args`` run ``repeats`` times for every target (checkout x path), interleaved, then once
    more each for the imports."""
    runs: list[list[dict]] = [[] for _ in targets]
    for _ in range(repeats):
        for t, out in zip(targets, runs):
            out.append(run_once([sys.executable, "-m", "kneeosteo", *args], t["env"], t["root"]))
    rows = []
    for t, out in zip(targets, runs):
        probe = run_once([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], t["env"], t["root"])
        rows.append({"checkout": t["label"], "path": t["path"], **summarise(args, out, probe)})
    return rows


def markdown(doc: dict) -> str:
    rows = [
        "| checkout | path | command | wall s (median, min-max) | peak RSS MB | heavy libraries imported |",
        "|---|---|---|---|---|---|",
    ]
    for r in doc["commands"]:
        imports = ", ".join(r["imports"] or []) or "-"
        rows.append(
            f"| {r['checkout']} | {r['path']} | `{r['command'].replace(doc['image'], 'FILM')}` | {r['wall_s_median']} "
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
    ap.add_argument("--paths", default="avx2,native", help=f"comma-separated, of {', '.join(PATHS)}")
    ap.add_argument("--compare", type=Path, action="append", default=[], help="another checkout to measure too")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "benchmarks" / "startup.json")
    args = ap.parse_args(argv)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in PATHS]
    if unknown or not paths:
        ap.error(f"--paths: choose from {', '.join(PATHS)}")
    roots = [REPO, *(c.resolve() for c in args.compare)]
    with tempfile.TemporaryDirectory(prefix="kneeosteo-startup-") as tmp:
        image = (args.image or imagegen().png_grey8(Path(tmp) / "knee.png")).resolve()
        doc: dict = {"image": str(image), "python": sys.version.split()[0], "cpus": os.cpu_count(), "paths": {}}
        targets = []
        for i, root in enumerate(roots):
            label = f"{root.name} ({_revision(root)})" + (" [this checkout]" if i == 0 else "")
            for path in paths:
                env = _env(root, Path(tmp) / f"cache-{i}", path)
                doc["paths"][path] = {k: v for k, v in PATHS[path].items()}
                targets.append({"root": root, "label": label, "path": path, "env": env})
        for t in targets:  # fills each checkout's ONNX cache
            warm = run_once([sys.executable, "-m", "kneeosteo", "predict", str(image)], t["env"], t["root"])
            if warm["code"] != 0:
                raise SystemExit(f"predict failed in {t['label']}: {warm['stderr'].strip()[-500:]}")
        with section(doc):
            doc["commands"] = measure(targets, ["--help"], args.repeats) + measure(
                targets, ["predict", str(image)], args.repeats
            )
    return write_results(args.out, doc, markdown)


if __name__ == "__main__":
    main()
