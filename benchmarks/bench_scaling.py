"""Issue 18's measurements: past one machine.

    python -m benchmarks.bench_scaling cluster [--sizes 100000 1000000]   # near-duplicate clustering alone
    python -m benchmarks.bench_scaling archive [--n 20000]                # scan -> audit -> split on generated files
    python -m benchmarks.bench_scaling grid [--data DIR --quick]          # reproduce: local vs --ray, same tables?
    python -m benchmarks.bench_scaling predict [--inputs DIR]             # predict: --workers 2 vs --ray

Each writes ``docs/results/benchmarks/scaling_<name>.json`` (appending a run) and rebuilds
``docs/results/benchmarks/scaling.md``, which ``benchmarks/report.py`` puts into RESULTS.md. Every
figure carries the load average at its start and end: on a shared machine a timing is an upper
bound, and rows taken with a load average above the CPU count are labelled "under load".
Peak RSS is each measured process's own high-water mark (``ru_maxrss`` of the child, or VmHWM).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, imagegen, loadavg, now_iso, proc_status_kb

RESULTS = REPO / "docs" / "results" / "benchmarks"
PY = sys.executable


def _under_load(start: list[float], end: list[float]) -> bool:
    cpus = os.cpu_count() or 1
    return max((start or [0])[0], (end or [0])[0]) > 0.5 * cpus


def _append(name: str, doc: dict) -> None:
    path = RESULTS / f"scaling_{name}.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    runs.append(doc)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    render()


def _run_child(cmd: list[str], env: dict | None = None) -> dict:
    """Like _timed, but the peak RSS is this child's alone: run through a tiny waiter process."""
    waiter = (
        "import os,resource,subprocess,sys,time,json;t=time.perf_counter();"
        "p=subprocess.run(sys.argv[1:],capture_output=True,text=True);"
        "ru=resource.getrusage(resource.RUSAGE_CHILDREN);"
        "print(json.dumps({'rc':p.returncode,'wall_s':round(time.perf_counter()-t,2),"
        "'peak_rss_mb':round(ru.ru_maxrss/1024,1),'stdout_tail':p.stdout[-1500:],'stderr_tail':p.stderr[-1500:]}))"
    )
    la0 = loadavg()
    p = subprocess.run([PY, "-c", waiter, *map(str, cmd)], capture_output=True, text=True, env=env, cwd=REPO)
    doc = json.loads(p.stdout.strip().splitlines()[-1])
    doc.update(cmd=" ".join(map(str, cmd)), loadavg_start=la0, loadavg_end=loadavg())
    return doc


# ------------------------------------------------------------------------------------ clustering
def planted_hashes(n: int, seed: int = 0):
    """n hash records: random 64-bit pHashes with 2% planted near copies (0-6 bits from an
    earlier record), 0.5% at 7-8 bits (not near), chains of three, and 0.5% exact copies by content."""
    import numpy as np

    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    k = n // 50
    src, dst = rng.integers(0, n // 2, size=k), rng.integers(n // 2, n, size=k)
    bits = rng.integers(0, 7, size=k)
    bits[: k // 4] = rng.integers(7, 9, size=k // 4)
    flips = np.zeros(k, dtype=np.uint64)
    for b in range(9):  # each planted copy flips `bits` distinct random bits
        pos = rng.integers(0, 64, size=k).astype(np.uint64)
        add = (bits > b) & ((flips >> pos) & np.uint64(1) == 0)
        flips[add] |= np.uint64(1) << pos[add]
    h[dst] = h[src] ^ flips
    cids = [f"{i:064x}" for i in range(n)]
    for i, j in zip(rng.integers(0, n, size=n // 200).tolist(), rng.integers(0, n, size=n // 200).tolist()):
        cids[j] = cids[i]
    return [f"{int(v):016x}" for v in h], cids


def cluster_one(n: int) -> dict:
    import numpy as np

    from kneeosteo.data.duplicates import component_labels, index_plan

    hexes, cids = planted_hashes(n)
    rss_before = proc_status_kb("VmRSS")
    la0, t0 = loadavg(), time.perf_counter()
    labels = component_labels(cids, hexes, 6)
    wall = time.perf_counter() - t0
    sizes = np.bincount(labels)
    return {
        "n": n,
        "threshold": 6,
        "plan": list(index_plan(len(set(hexes)), 6)[:2]),
        "cluster_s": round(wall, 2),
        "rss_before_mb": round(rss_before / 1024, 1),
        "peak_rss_mb": round(proc_status_kb("VmHWM") / 1024, 1),
        "components": int(len(sizes)),
        "clusters_2plus": int((sizes > 1).sum()),
        "largest": int(sizes.max()),
        "loadavg_start": la0,
        "loadavg_end": loadavg(),
    }


def bench_cluster(sizes: list[int]) -> dict:
    doc = {"date": now_iso(), "cpus": os.cpu_count(), "results": []}
    for n in sizes:
        p = subprocess.run(
            [PY, "-m", "benchmarks.bench_scaling", "cluster-one", str(n)],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=True,
        )
        doc["results"].append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(doc["results"][-1], flush=True)
    _append("cluster", doc)
    return doc


# ------------------------------------------------------------------------------ archive end to end
def make_archive(root: Path, n: int, size: int = 48, seed: int = 0) -> Path:
    """n small greyscale PNG/JPEG files in two class folders; 1% are re-encoded near copies."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    last: dict[str, Path] = {}
    for label in ("normal", "osteoporosis"):
        (root / label).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        label = ("normal", "osteoporosis")[i % 2]
        if i % 100 == 99:  # a near copy of the previous file of the same class: re-encoded, slightly brighter
            arr = np.clip(np.asarray(Image.open(last[label])).astype(int) + 3, 0, 255).astype(np.uint8)
        else:
            a, b, c, d = rng.uniform(-1, 1, 4)
            arr = 128 + 60 * np.sin(6 * a * xx + 5 * b * yy + c) * np.cos(4 * d * xx - 3 * a * yy)
            arr = np.clip(arr + rng.normal(0, 6, arr.shape), 0, 255).astype(np.uint8)
        path = root / label / f"{label}_{i:06d}.{'png' if i % 3 else 'jpg'}"
        Image.fromarray(arr, "L").save(path, quality=92) if path.suffix == ".jpg" else Image.fromarray(arr, "L").save(
            path
        )
        if i % 100 != 99:
            last[label] = path
    return root


def bench_archive(n: int, keep: Path | None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="kneeosteo-archive-"))
    data = keep or work / "data"
    t0 = time.perf_counter()
    if not (data / "normal").is_dir():
        make_archive(data, n)
    gen_s = time.perf_counter() - t0
    env = {**os.environ, "KNEEOSTEO_CACHE": str(work / "cache"), "PYTHONPATH": str(REPO)}
    kneeo = [PY, "-m", "kneeosteo"]
    doc = {"date": now_iso(), "cpus": os.cpu_count(), "n_files": n, "generate_s": round(gen_s, 1), "steps": {}}
    doc["steps"]["audit (cold scan)"] = _run_child(kneeo + ["audit", data, "--out", work / "audit"], env)
    doc["steps"]["audit (warm scan memo)"] = _run_child(kneeo + ["audit", data, "--out", work / "audit2"], env)
    doc["steps"]["split (warm scan memo)"] = _run_child(kneeo + ["split", data, "--out", work / "split.json"], env)
    for name, step in doc["steps"].items():
        print(name, {k: step[k] for k in ("rc", "wall_s", "peak_rss_mb", "loadavg_start", "loadavg_end")}, flush=True)
        if step["rc"] != 0:
            print(step["stderr_tail"], file=sys.stderr)
    audit = json.loads((work / "audit" / "audit.json").read_text()) if (work / "audit" / "audit.json").is_file() else {}
    doc["audit_summary"] = {k: audit.get(k) for k in ("files_read", "distinct_images")}
    doc["audit_summary"]["near_clusters"] = (audit.get("near_duplicates") or {}).get("clusters")
    shutil.rmtree(work, ignore_errors=True)
    _append("archive", doc)
    return doc


# ----------------------------------------------------------------------------- reproduce: grid
def _table_without_time(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in r.items() if k not in ("seconds", "time_s")} for r in csv.DictReader(fh)]


def bench_grid(data: Path | None, quick: bool, extra: list[str], local_threads: int | None = None) -> dict:
    """`reproduce` twice into fresh folders, locally and on a local Ray instance; same tables?

    Ray cells use one thread each (--cpus-per-cell 1), so the tables are bit-identical to a local
    run with one thread (``local_threads=1``); today's local run uses every core in one cell."""
    work = Path(tempfile.mkdtemp(prefix="kneeosteo-grid-"))
    if data is None:  # the tiny generated grid the tests use: seconds, not the real target
        data = imagegen().make_dataset(work / "data", n_per_class=12, size=48, seed=3).root
        extra = extra or [
            "--seeds",
            "2",
            "--test-size",
            "6",
            "--epochs",
            "2",
            "--models",
            "hybrid-efficientnet_lite0,fc-efficientnet_lite0,am-only",
        ]
    args = [PY, "-m", "kneeosteo", "reproduce", data] + (["--quick"] if quick else []) + list(extra)
    doc = {"date": now_iso(), "cpus": os.cpu_count(), "data": str(data), "args": " ".join(map(str, args[3:]))}
    doc["local_threads"] = local_threads or "default (all cores)"
    for name, more in (("local", []), ("ray", ["--ray"])):
        env = {**os.environ, "KNEEOSTEO_CACHE": str(work / f"cache-{name}"), "PYTHONPATH": str(REPO)}
        if name == "local" and local_threads:
            env["OMP_NUM_THREADS"] = str(local_threads)
        doc[name] = _run_child(args + ["--out", work / name] + more, env)
        print(
            name, {k: doc[name][k] for k in ("rc", "wall_s", "peak_rss_mb", "loadavg_start", "loadavg_end")}, flush=True
        )
    tables = [work / n / "table1.csv" for n in ("local", "ray")]
    doc["same_table_apart_from_time"] = all(t.is_file() for t in tables) and (
        _table_without_time(tables[0]) == _table_without_time(tables[1])
    )
    doc["ray_over_local"] = round(doc["ray"]["wall_s"] / doc["local"]["wall_s"], 3)
    print("same tables:", doc["same_table_apart_from_time"], "ray/local:", doc["ray_over_local"])
    shutil.rmtree(work, ignore_errors=True)
    _append("grid", doc)
    return doc


# ------------------------------------------------------------------------------- predict
def bench_predict(inputs: Path | None, n: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="kneeosteo-predict-"))
    if inputs is None:
        inputs = make_archive(work / "inputs", n, size=256)
    env = {**os.environ, "KNEEOSTEO_CACHE": str(work / "cache"), "PYTHONPATH": str(REPO)}
    kneeo = [PY, "-m", "kneeosteo", "predict", inputs]
    doc = {"date": now_iso(), "cpus": os.cpu_count(), "inputs": str(inputs)}
    _run_child(kneeo[:-1] + [next(Path(inputs).rglob("*.png")), "--out", work / "warm.csv"], env)  # the ONNX export
    for name, more in (("workers2", ["--workers", "2"]), ("ray", ["--ray"])):
        doc[name] = _run_child(kneeo + ["--out", work / f"{name}.csv"] + more, env)
        rows = sum(1 for _ in open(work / f"{name}.csv")) - 1 if (work / f"{name}.csv").is_file() else 0
        doc[name]["rows"] = rows
        doc[name]["images_per_s_incl_start"] = round(rows / doc[name]["wall_s"], 2) if rows else None
        print(name, {k: doc[name][k] for k in ("rc", "wall_s", "peak_rss_mb", "rows", "loadavg_start")}, flush=True)
    files = [work / f"{n}.csv" for n in ("workers2", "ray")]
    doc["identical_rows"] = all(f.is_file() for f in files) and files[0].read_bytes() == files[1].read_bytes()
    print("identical rows:", doc["identical_rows"])
    shutil.rmtree(work, ignore_errors=True)
    _append("predict", doc)
    return doc


# ------------------------------------------------------------------------------- report
def _la(d: dict) -> str:
    s, e = d.get("loadavg_start") or [], d.get("loadavg_end") or []
    tag = " **under load**" if _under_load(s, e) else ""
    return f"{s[0] if s else '?'} -> {e[0] if e else '?'}{tag}"


def render() -> Path:
    lines = [
        "Written by `python -m benchmarks.bench_scaling` (issue 18). Load average: the 1-minute figure "
        f"at the start -> end of each row, on {os.cpu_count()} CPUs; rows marked **under load** shared the "
        "cores with other work, so their times are upper bounds.",
        "",
    ]
    runs = lambda name: (  # noqa: E731
        json.loads((RESULTS / f"scaling_{name}.json").read_text())["runs"]
        if (RESULTS / f"scaling_{name}.json").is_file()
        else []
    )
    c = runs("cluster")
    if c:
        lines += [
            "### Near-duplicate clustering alone (`component_labels`, threshold 6, generated hash records)",
            "",
            "| date | records | plan (blocks, equal) | wall s | peak RSS MB (process) | RSS before MB | clusters >= 2 | largest | load avg |",
            "|---|---:|---|---:|---:|---:|---:|---:|---|",
        ]
        for run in c:
            for r in run["results"]:
                lines.append(
                    f"| {run['date'][:16]} | {r['n']:,} | {r['plan'][0]}, {r['plan'][1]} | {r['cluster_s']} | "
                    f"{r['peak_rss_mb']} | {r['rss_before_mb']} | {r['clusters_2plus']:,} | {r['largest']} | {_la(r)} |"
                )
        lines.append("")
    a = runs("archive")
    if a:
        lines += [
            "### Archive end to end (generated 48-px PNG/JPEG files, `kneeosteo audit` then `split`)",
            "",
            "| date | files | step | exit | wall s | peak RSS MB | load avg |",
            "|---|---:|---|---:|---:|---:|---|",
        ]
        for run in a:
            for name, s in run["steps"].items():
                lines.append(
                    f"| {run['date'][:16]} | {run['n_files']:,} | {name} | {s['rc']} | {s['wall_s']} | "
                    f"{s['peak_rss_mb']} | {_la(s)} |"
                )
        lines.append("")
    g = runs("grid")
    if g:
        lines += [
            "### `reproduce`: local vs `--ray` (local Ray instance)",
            "",
            "| date | arguments | local threads | local wall s | ray wall s | ray / local | same tables (time column aside) | load avg (local; ray) |",
            "|---|---|---|---:|---:|---:|---|---|",
        ]
        for r in g:
            lines.append(
                f"| {r['date'][:16]} | `{r['args']}` | {r.get('local_threads', '?')} | {r['local']['wall_s']} | {r['ray']['wall_s']} | "
                f"{r['ray_over_local']} | {r['same_table_apart_from_time']} | {_la(r['local'])}; {_la(r['ray'])} |"
            )
        lines.append("")
    p = runs("predict")
    if p:
        lines += [
            "### `predict`: `--workers 2` vs `--ray` (whole command, start-up included)",
            "",
            "| date | images | workers 2: wall s (img/s) | ray: wall s (img/s) | identical rows | load avg (workers; ray) |",
            "|---|---:|---|---|---|---|",
        ]
        for r in p:
            w, y = r["workers2"], r["ray"]
            lines.append(
                f"| {r['date'][:16]} | {w['rows']} | {w['wall_s']} ({w['images_per_s_incl_start']}) | "
                f"{y['wall_s']} ({y['images_per_s_incl_start']}) | {r['identical_rows']} | {_la(w)}; {_la(y)} |"
            )
        lines.append("")
    out = RESULTS / "scaling.md"
    out.write_text("\n".join(lines).rstrip() + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("cluster").add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    sub.add_parser("cluster-one").add_argument("n", type=int)
    ar = sub.add_parser("archive")
    ar.add_argument("--n", type=int, default=20_000)
    ar.add_argument("--data", type=Path, default=None, help="reuse (or create and keep) the generated folder here")
    gr = sub.add_parser("grid")
    gr.add_argument("--data", type=Path, default=None, help="default: a tiny generated data set")
    gr.add_argument("--quick", action="store_true")
    gr.add_argument(
        "--local-threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS of the local run (1: bit-identical to Ray's cells)",
    )
    gr.add_argument("extra", nargs="*", help="more reproduce arguments (after --)")
    pr = sub.add_parser("predict")
    pr.add_argument("--inputs", type=Path, default=None, help="default: generated 256-px files")
    pr.add_argument("--n", type=int, default=400)
    sub.add_parser("render")
    a = ap.parse_args(argv)
    if a.what == "cluster":
        bench_cluster(a.sizes)
    elif a.what == "cluster-one":
        print(json.dumps(cluster_one(a.n)))
    elif a.what == "archive":
        bench_archive(a.n, a.data)
    elif a.what == "grid":
        bench_grid(a.data, a.quick, a.extra, a.local_threads)
    elif a.what == "predict":
        bench_predict(a.inputs, a.n)
    else:
        print(render())


if __name__ == "__main__":
    main()
