"""A bounded load test of `kneeosteo serve`: N requests from C concurrent clients over loopback.

It starts the app in this process on a 127.0.0.1 port the OS picks, sends the requests with
httpx (no retries: a 503 is counted, it is the pool shedding load as designed), stops by itself
after ``--time-limit`` seconds at most, and writes ``load_test.json`` plus one row of
``load_test.md`` with p50/p99 latency, counts by status and the machine. Nothing is asserted here;
tests/test_web.py runs a small version and checks that every request was answered 200 or 503.

    python benchmarks/load_test.py --run RUN            # 200 requests, 20 clients
    python benchmarks/load_test.py                      # the bundled model
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results" / "benchmarks"


def synthetic_radiograph(size: int = 512, seed: int = 0) -> bytes:
    """A greyscale PNG with smooth structure and noise, so decoding and resizing do real work."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = 0.25 + 0.3 * np.exp(-((x - 0.5) ** 2) / 0.02) + rng.normal(0, 0.05, (size, size))
    buf = io.BytesIO()
    Image.fromarray(np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _stats(latencies: list[float]) -> dict | None:
    if not latencies:
        return None
    a = np.asarray(latencies) * 1000.0
    return {
        "n": len(a),
        "p50_ms": round(float(np.percentile(a, 50)), 1),
        "p99_ms": round(float(np.percentile(a, 99)), 1),
        "max_ms": round(float(a.max()), 1),
    }


async def _drive(base: str, endpoint: str, body: bytes, requests: int, clients: int, time_limit: float):
    """[(status code or exception name, seconds)] for every request that was sent."""
    import httpx

    results: list[tuple[object, float]] = []
    shares = [requests // clients + (i < requests % clients) for i in range(clients)]

    async def client(http, n):
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                r = await http.post(endpoint, files={"file": ("knee.png", body, "image/png")})
                results.append((r.status_code, time.perf_counter() - t0))
            except httpx.HTTPError as exc:  # a dropped connection or a timeout
                results.append((type(exc).__name__, time.perf_counter() - t0))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=time_limit, limits=limits, trust_env=False) as http:
        try:
            await asyncio.wait_for(asyncio.gather(*(client(http, n) for n in shares if n)), time_limit)
        except asyncio.TimeoutError:
            pass  # the unsent rest is reported as not answered
    return results


def run_load_test(
    run: str | os.PathLike | None = None,
    requests: int = 200,
    clients: int = 20,
    workers: int = 2,
    queue: int = 16,
    endpoint: str = "/api/predict",
    time_limit: float = 180.0,
    image: bytes | None = None,
) -> dict:
    """Serve ``run`` (None: the bundled model) on loopback and load it; returns the result dict."""
    import torch

    from kneeosteo.interfaces.web import WebSettings, create_app, serve_in_thread

    load_before = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None  # others' work skews it
    threads = max(1, (os.cpu_count() or 1) // workers)  # as `kneeosteo serve` does
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        app = create_app(WebSettings(run=Path(run) if run else None, workers=workers, queue=queue))
        body = image if image is not None else synthetic_radiograph()
        with serve_in_thread(app, host="127.0.0.1") as base:
            t0 = time.perf_counter()
            got = asyncio.run(_drive(base, endpoint, body, requests, clients, time_limit))
            wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)
    counts = Counter(str(s) for s, _ in got)
    answered = [t for s, t in got if isinstance(s, int)]
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model_id": app.state.service.info.model_id,
        "endpoint": endpoint,
        "requests": requests,
        "clients": clients,
        "workers": workers,
        "queue": queue,
        "image_bytes": len(body),
        "time_limit_s": time_limit,
        "sent": len(got),
        "not_sent": requests - len(got),
        "status_counts": dict(sorted(counts.items())),
        "all_answered_200_or_503": len(got) == requests and set(counts) <= {"200", "503"},
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(got) / wall, 1) if wall else None,
        "latency": {
            "all_answered": _stats(answered),
            "200": _stats([t for s, t in got if s == 200]),
            "503": _stats([t for s, t in got if s == 503]),
        },
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": threads,
            "load_average_1m_before": load_before,
        },
    }


def write_results(result: dict, out: str | os.PathLike = RESULTS, label: str = "") -> tuple[Path, Path]:
    """``out/load_test.json`` (this run) and a new row in ``out/load_test.md`` (all runs)."""
    from kneeosteo.utils.atomic import write_json, write_text

    out = Path(out)
    js, md = out / "load_test.json", out / "load_test.md"
    write_json(js, {**result, "label": label})
    header = (
        "# `kneeosteo serve` load test\n\nWritten by `benchmarks/load_test.py`; latencies in ms, "
        "measured by the clients over loopback; 503 = the bounded pool shedding load.\n\n"
        "| date (UTC) | model | endpoint | requests x clients | workers+queue | statuses | p50 all | p99 all "
        "| p50 200 | p99 200 | req/s | cpus (load) | platform |\n|" + "---|" * 13 + "\n"
    )
    text = md.read_text() if md.is_file() else header
    lat, ok = result["latency"]["all_answered"] or {}, result["latency"]["200"] or {}
    statuses = ", ".join(f"{k}: {v}" for k, v in result["status_counts"].items())
    row = (
        f"| {result['date']} | {result['model_id']}{' (' + label + ')' if label else ''} | {result['endpoint']} "
        f"| {result['requests']} x {result['clients']} | {result['workers']}+{result['queue']} | {statuses} "
        f"| {lat.get('p50_ms', '-')} | {lat.get('p99_ms', '-')} | {ok.get('p50_ms', '-')} | {ok.get('p99_ms', '-')} "
        f"| {result['throughput_rps']} | {result['machine']['cpu_count']} ({result['machine']['load_average_1m_before']}) "
        f"| {result['machine']['platform']} |\n"
    )
    write_text(md, text + row)
    return js, md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="run folder (default: the bundled model)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--queue", type=int, default=16)
    ap.add_argument("--endpoint", default="/api/predict", choices=["/api/predict", "/api/explain"])
    ap.add_argument("--time-limit", type=float, default=180.0, help="seconds; then it stops")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--label", default="", help="a note for the markdown row, e.g. 'tiny test model'")
    args = ap.parse_args(argv)
    result = run_load_test(
        args.run, args.requests, args.clients, args.workers, args.queue, args.endpoint, args.time_limit
    )
    js, md = write_results(result, args.out, args.label)
    print(json.dumps({k: result[k] for k in ("status_counts", "latency", "wall_s", "throughput_rps")}, indent=2))
    print(f"wrote {js} and {md}")
    return 0 if result["all_answered_200_or_503"] else 1


if __name__ == "__main__":
    sys.exit(main())
